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
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from tests.helpers import sharded_load_args  # noqa: E402


@pytest.fixture(autouse=True)
def _no_process_group_left_behind():
    """A test that ran a Trainer in this process (a one-process mixed-precision run starts a 1-rank
    group; the planner a fake one) must not leave a default process group to the next test's forked
    ranks, which start their own."""
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A debug model saved as an HF checkpoint in several shard files (+ index)."""
    from moonlight.hf import save_hf
    from moonlight.model import Moonlight

    torch.manual_seed(0)
    model = Moonlight(sharded_load_args())
    model.init_weights()
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.router.expert_bias.normal_()
    path = str(tmp_path_factory.mktemp("ckpt") / "hf")
    save_hf(model, path, max_shard_size="300KB")  # several shard files + index
    return path
