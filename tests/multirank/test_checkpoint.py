"""Checkpointer resharding across process counts: 2 FSDP ranks to one plain process and back, and
pipeline-like stages on 2 ranks (each holding other layers) merged by global name into one process,
with the HF export gathered to rank 0."""

import torch

from moonlight.checkpoint.export import export_hf
from moonlight.checkpoint.format import read_meta
from moonlight.checkpoint.state import Checkpointer
from moonlight.train.build import load_initial_weights
from tests.dist import run_ranks
from tests.helpers import (
    FakeLoader,
    assert_sd_equal,
    build,
    build_opt,
    cfg,
    flat_optim,
    fsdp_wrap,
    full_sd,
    pack_state,
    train,
)
from tests.helpers import build_opt_parts, checkpoint_fake_step, checkpoint_split


# ---------------------------------------------------------------------------------- multi-rank


def _unpack(results):
    import io

    return [torch.load(io.BytesIO(r), weights_only=False) for r in results]


def _fsdp_save_worker(rank, world, folder):
    model = fsdp_wrap(build()[0])
    opts, scheds = build_opt(model)
    loader = FakeLoader()
    train(model, opts, scheds, loader, 2, seed=1 + rank)  # different data per rank, as in DP
    Checkpointer(cfg(), folder, [model], opts, scheds, loader, parallelism={"dp_shard": world}).save(2)
    return pack_state((full_sd(model), flat_optim(model, opts), torch.rand(3)))


def _fsdp_load_worker(rank, world, folder, hf_out, hf_in):
    model = fsdp_wrap(build(seed=11)[0])
    opts, scheds = build_opt(model)
    loader = FakeLoader()
    ck = Checkpointer(cfg(), folder, [model], opts, scheds, loader)
    step = ck.load()
    out = dict(
        step=step,
        model=full_sd(model),
        optim=flat_optim(model, opts),
        rand=torch.rand(3),
        consumed=loader.consumed,
        lr=scheds.get_last_lr(),
    )
    export_hf([model], hf_out)
    # initial HF load into sharded parameters
    fresh = fsdp_wrap(build(seed=12)[0])
    load_initial_weights(Checkpointer(cfg(folder="fresh"), folder, [fresh], None, None, None), hf_in)
    out["hf_loaded"] = full_sd(fresh)
    return pack_state(out)


def test_fsdp2_two_ranks_to_one_and_back(tmp_path):
    a = tmp_path / "a"
    saved = _unpack(run_ranks(_fsdp_save_worker, 2, str(a)))
    assert_sd_equal(saved[0][0], saved[1][0])
    meta = read_meta(str(a / "checkpoint" / "step-2"))
    assert meta["world_size"] == 2 and meta["parallelism"] == {"dp_shard": 2}
    # 2 FSDP ranks -> 1 plain process
    model, opts, scheds = build(seed=9)
    loader = FakeLoader()
    assert Checkpointer(cfg(), a, [model], opts, scheds, loader).load() == 2
    assert_sd_equal(full_sd(model), saved[0][0])
    assert_sd_equal(flat_optim(model, opts), saved[0][1])
    assert loader.consumed == 8
    assert torch.equal(torch.rand(3), saved[0][2])  # rank 0's RNG

    # 1 plain process -> 2 FSDP ranks (and 2 -> 2 with per-rank RNG)
    b = tmp_path / "b"
    train(model, opts, scheds, loader, 1, seed=5)
    Checkpointer(cfg(), b, [model], opts, scheds, loader).save(3)
    hf_in = tmp_path / "hf_in"
    export_hf([model], hf_in)
    loaded = _unpack(run_ranks(_fsdp_load_worker, 2, str(b), str(tmp_path / "hf_out"), str(hf_in)))
    for r in loaded:
        assert r["step"] == 3 and r["consumed"] == 12 and r["lr"] == scheds.get_last_lr()
        assert_sd_equal(r["model"], full_sd(model))
        assert_sd_equal(r["optim"], flat_optim(model, opts))
        assert_sd_equal(r["hf_loaded"], full_sd(model))
    from tests.helpers import read_safetensors_dir

    assert_sd_equal(read_safetensors_dir(tmp_path / "hf_out"), read_safetensors_dir(hf_in))
    again = _unpack(run_ranks(_fsdp_save_worker, 2, str(tmp_path / "c")))
    reload = _unpack(run_ranks(_fsdp_load_worker, 2, str(tmp_path / "c"), str(tmp_path / "hf_c"), str(hf_in)))
    for r in range(2):
        assert torch.equal(reload[r]["rand"], again[r][2])  # each rank gets its own RNG back


def _pp_save_worker(rank, world, folder, hf_out):
    ref = build()[0]
    part = checkpoint_split(ref, [(0, 2), (2, 4)])[rank]
    opts, scheds = build_opt_parts([part])
    checkpoint_fake_step([part], opts, seed=rank)
    ck = Checkpointer(cfg(), folder, [part], opts, scheds, None, parallelism={"pp": 2})
    ck.save(1)
    export_hf([part], hf_out)
    return pack_state((full_sd(part), flat_optim(part, opts)))


def test_pipeline_stages_on_two_ranks_to_one(tmp_path):
    """Each rank holds different layers (pipeline-like): the checkpoint merges them by global FQN and
    the HF export gathers them to rank 0."""
    res = _unpack(run_ranks(_pp_save_worker, 2, str(tmp_path), str(tmp_path / "hf")))
    model, opts, scheds = build(seed=3)
    assert Checkpointer(cfg(), tmp_path, [model], opts, scheds, None).load() == 1
    assert_sd_equal(full_sd(model), {**res[0][0], **res[1][0]})
    assert_sd_equal(flat_optim(model, opts), {**res[0][1], **res[1][1]})
    from moonlight.hf import load_hf

    assert_sd_equal(full_sd(load_hf(tmp_path / "hf", kernels="torch")), full_sd(model))
