import os

# The suite is the CPU suite on every machine: a GPU machine's GPUs are hidden (forked gloo ranks,
# CPU tensors through the Triton interpreter) unless MOONLIGHT_TEST_GPU=1, which
# benchmarks/gpu_suite.sh sets for the tests that run on the GPU (real Triton on CUDA tensors, the
# CUDA sync count, the side-stream overlap). Both before anything initializes CUDA or imports a kernel.
if os.environ.get("MOONLIGHT_TEST_GPU", "") in ("", "0"):
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
if os.environ.get("CUDA_VISIBLE_DEVICES") == "" or not os.path.exists("/dev/nvidia0"):
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
