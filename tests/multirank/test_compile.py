"""training.compile = true on 2 gloo ranks: the compiled trainer's losses equal eager's under FSDP, FSDP
with expert parallel (DTensor expert weights) and context parallel (key all-gather and chunk masks inside
the compiled blocks)."""

import pytest
import torch

from tests.dist import run_ranks
from tests.helpers import compile_run, compile_trainer


def _fsdp_losses(rank, world, folder, extra):
    trainer = compile_trainer(folder, "--checkpoint.enable=false", "--parallelism.dp_shard=2", *extra)
    return compile_run(trainer, 2)[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "parallelism",
    [[], ["--parallelism.ep=2"], ["--parallelism.cp=2", "--parallelism.dp_shard=1"]],
    ids=["fsdp2", "fsdp2_ep2", "cp2"],
)
def test_compiled_fsdp_steps_equal_eager(tmp_path, parallelism):
    """ep2: the expert weights are DTensors on the ep mesh, which local_tensor must unwrap under compile too;
    cp2: the key all-gather and the chunk masks of context parallel inside the compiled blocks."""
    eager = run_ranks(_fsdp_losses, 2, str(tmp_path / "eager"), parallelism)[0]
    compiled = run_ranks(
        _fsdp_losses,
        2,
        str(tmp_path / "compiled"),
        parallelism + ["--training.compile=true", "--training.compile_backend=aot_eager"],
    )[0]
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-5, atol=0)
