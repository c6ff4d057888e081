"""checkpoint.async_mode = "async" on 2 FSDP ranks: the save staged at step 2 is written while training
goes on (collectives on the default group meanwhile), and a fresh model resumes it exactly."""

import torch

from moonlight.checkpoint.state import Checkpointer
from tests.dist import run_ranks
from tests.helpers import FakeLoader, build, build_opt, cfg, fsdp_wrap, pack_state, train
from tests.helpers import ASYNC_CHECKPOINT, async_checkpoint_assert_same, async_checkpoint_snapshot


def _fsdp_async_worker(rank, world, folder):
    model = fsdp_wrap(build()[0])
    opts, scheds = build_opt(model)
    loader = FakeLoader()
    ck = Checkpointer(cfg(**ASYNC_CHECKPOINT), folder, [model], opts, scheds, loader, parallelism={"dp_shard": world})
    train(model, opts, scheds, loader, 2, seed=1 + rank)
    ck.save(2)
    at_save = async_checkpoint_snapshot(model, opts, loader)
    train(model, opts, scheds, loader, 2, seed=1 + rank)  # collectives on the default group meanwhile
    ck.wait()
    fresh = fsdp_wrap(build(seed=9)[0])
    fopts, fscheds = build_opt(fresh)
    floader = FakeLoader()
    step = Checkpointer(cfg(**ASYNC_CHECKPOINT), folder, [fresh], fopts, fscheds, floader).load()
    return pack_state((step, at_save, async_checkpoint_snapshot(fresh, fopts, floader)))


def test_async_save_on_two_fsdp_ranks_resumes_exactly(tmp_path):
    import io

    for r in run_ranks(_fsdp_async_worker, 2, str(tmp_path)):
        step, at_save, restored = torch.load(io.BytesIO(r), weights_only=False)
        assert step == 2
        async_checkpoint_assert_same(restored, at_save)
