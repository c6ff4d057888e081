import os

# The Triton interpreter must be selected before any kernel module is imported; on a GPU
# machine the real compiler is used, unless CUDA_VISIBLE_DEVICES="" hides the GPUs (the CPU suite
# on a GPU machine: compiled Triton takes no CPU tensors).
_visible = os.environ.get("CUDA_VISIBLE_DEVICES")
if _visible == "" or (_visible is None and not os.path.exists("/dev/nvidia0")):
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")


import pytest  # noqa: E402
import torch.distributed as dist  # noqa: E402


@pytest.fixture(autouse=True)
def _no_process_group_left_behind():
    """A test that ran a Trainer in this process (a one-process mixed-precision run starts a 1-rank
    group; the planner a fake one) must not leave a default process group to the next test's forked
    ranks, which start their own."""
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
