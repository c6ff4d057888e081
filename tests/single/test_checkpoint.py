"""Checkpointer in one process: round trips, retention (interval, force, keep_latest_k), atomicity
under SIGKILL and disk-full, clear errors for partial directories and other model args, no save of
non-finite weights, two pipeline parts in one process, and an HF export transformers loads with our
logits."""

import errno
import multiprocessing as mp
import os
import signal
import time

import pytest
import torch

from moonlight import ModelArgs
from moonlight.checkpoint.export import export_hf
from moonlight.checkpoint.format import list_checkpoints, read_meta
from moonlight.checkpoint.state import Checkpointer
from moonlight.errors import CheckpointError, CheckpointSaveError
from moonlight.train.build import load_initial_weights
from tests.helpers import ARGS, FakeLoader, assert_sd_equal, build, cfg, flat_optim, full_sd, train
from tests.helpers import build_opt_parts, checkpoint_fake_step, checkpoint_split


class Counter:  # an extra_states entry
    def __init__(self, n=0):
        self.n = n

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, s):
        self.n = s["n"]


# --------------------------------------------------------------------------------- one process


@pytest.mark.parametrize("optim", ["muon", "adamw"])
def test_round_trip_restores_everything(tmp_path, optim):
    model, opts, scheds = build(optim)
    loader, extra = FakeLoader(), Counter(7)
    train(model, opts, scheds, loader, 2)
    ck = Checkpointer(cfg(), tmp_path, [model], opts, scheds, loader, {"counter": extra})
    assert ck.save(2)
    after_save = torch.rand(4)  # what the RNG gives right after the save
    meta = read_meta(str(tmp_path / "checkpoint" / "step-2"))
    assert meta["step"] == 2 and meta["model_args"]["hidden_size"] == ARGS.hidden_size
    assert "model.layers.1.ffn.router.expert_bias" in _stored_keys(tmp_path / "checkpoint" / "step-2")

    model2, opts2, scheds2 = build(optim, seed=5)
    loader2, extra2 = FakeLoader(), Counter()
    ck2 = Checkpointer(cfg(), tmp_path, [model2], opts2, scheds2, loader2, {"counter": extra2})
    assert ck2.load() == 2
    assert torch.equal(torch.rand(4), after_save)
    assert_sd_equal(full_sd(model), full_sd(model2))
    assert_sd_equal(flat_optim(model, opts), flat_optim(model2, opts2))
    assert scheds2.last_epoch == scheds.last_epoch and scheds2.get_last_lr() == scheds.get_last_lr()
    assert loader2.consumed == loader.consumed == 8 and extra2.n == 7
    # continuing gives bit-identical weights
    train(model, opts, scheds, None, 1, seed=9)
    train(model2, opts2, scheds2, None, 1, seed=9)
    assert_sd_equal(full_sd(model), full_sd(model2))


def _stored_keys(path):
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def test_interval_force_keep_latest_k_and_missing_step(tmp_path):
    model, opts, scheds = build()
    train(model, opts, scheds, None, 1)
    ck = Checkpointer(cfg(interval=2, keep_latest_k=2), tmp_path, [model], opts, scheds, None)
    assert [ck.save(s) for s in (1, 2, 3, 4, 6)] == [False, True, False, True, True]
    assert list(list_checkpoints(tmp_path / "checkpoint")) == [4, 6]
    assert ck.save(7, force=True) and not ck.save(7, force=True)  # the same step is not written twice
    assert list(list_checkpoints(tmp_path / "checkpoint")) == [6, 7]
    fresh = Checkpointer(cfg(), tmp_path, [build()[0]], None, None, None)
    assert fresh.load() == 7 and fresh.load(6) == 6
    with pytest.raises(CheckpointError, match=r"step 4 not found.*available steps: \[6, 7\]"):
        fresh.load(4)
    empty = Checkpointer(cfg(folder="other"), tmp_path, [model], opts, scheds, None)
    assert empty.load() == 0  # nothing to resume
    with pytest.raises(CheckpointError, match="available steps: none"):
        empty.load(3)


def test_partial_directories_are_ignored_and_named(tmp_path):
    model, opts, scheds = build()
    train(model, opts, scheds, None, 1)
    ck = Checkpointer(cfg(), tmp_path, [model], opts, scheds, None)
    ck.save(2)
    folder = tmp_path / "checkpoint"
    (folder / "step-5.tmp").mkdir()
    (folder / "step-5.tmp" / "__0_0.distcp").write_bytes(b"half")
    (folder / "step-4").mkdir()  # copied by hand without its marker
    (folder / "step-4" / ".metadata").write_bytes(b"x")
    assert list(list_checkpoints(folder)) == [2]
    assert Checkpointer(cfg(), tmp_path, [build()[0]], None, None, None).load() == 2
    with pytest.raises(CheckpointError, match="step-5.tmp is an incomplete save"):
        ck.load(5)
    with pytest.raises(CheckpointError, match="step-4 is incomplete"):
        ck.load(4)
    ck.save(3)  # the next save removes interrupted saves (but not a directory it did not write)
    assert sorted(os.listdir(folder)) == ["step-2", "step-3", "step-4"]
    with pytest.raises(CheckpointSaveError, match="step-4 exists without a COMPLETE marker"):
        ck.save(4)  # saving that very step is refused: the hand-copied directory was replaced and deleted
    assert sorted(os.listdir(folder)) == ["step-2", "step-3", "step-4"]
    assert (folder / "step-4" / ".metadata").read_bytes() == b"x"


def test_mismatched_model_args_are_named(tmp_path):
    model, opts, scheds = build()
    train(model, opts, scheds, None, 1)
    Checkpointer(cfg(), tmp_path, [model], opts, scheds, None).save(40)
    other = build(args=ModelArgs.preset("debug", kernels="torch", hidden_size=256))
    ck = Checkpointer(cfg(), tmp_path, [other[0]], other[1], other[2], None)
    with pytest.raises(
        CheckpointError, match="checkpoint step-40 .*was saved for hidden_size=128 but this run has hidden_size=256"
    ):
        ck.load()
    # an implementation knob (kernels) is not a mismatch
    same = build(args=ModelArgs.preset("debug", kernels="auto"))
    assert Checkpointer(cfg(), tmp_path, [same[0]], same[1], same[2], None).load() == 40


def test_disk_full_fails_loudly_and_keeps_previous(tmp_path, monkeypatch):
    import torch.distributed.checkpoint.filesystem as fs

    model, opts, scheds = build()
    train(model, opts, scheds, None, 1)
    ck = Checkpointer(cfg(), tmp_path, [model], opts, scheds, None)
    ck.save(2)
    expected = full_sd(model)
    train(model, opts, scheds, None, 1)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fs, "_write_item", full)
    with pytest.raises(CheckpointSaveError, match=r"step-4 failed \(disk full\).*step-2 is intact"):
        ck.save(4)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "checkpoint")) == ["step-2"]
    fresh = build()
    assert Checkpointer(cfg(), tmp_path, [fresh[0]], fresh[1], fresh[2], None).load() == 2
    assert_sd_equal(full_sd(fresh[0]), expected)
    assert ck.save(4)  # works again once there is space


def test_nonfinite_weights_are_not_saved(tmp_path):
    model, opts, scheds = build()
    train(model, opts, scheds, None, 1)
    ck = Checkpointer(cfg(), tmp_path, [model], opts, scheds, None)
    ck.save(2)
    with torch.no_grad():
        model.layers["1"].attn.o_proj.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointSaveError, match="non-finite.*layers.1.attn.o_proj.weight"):
        ck.save(3)
    assert list(list_checkpoints(tmp_path / "checkpoint")) == [2]


def _slow_save_child(folder):
    import torch.distributed.checkpoint.filesystem as fs

    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool

    real = fs._write_item

    def slow(*a, **k):
        time.sleep(0.05)
        return real(*a, **k)

    fs._write_item = slow
    model, opts, scheds = build()
    train(model, opts, scheds, None, 1)
    Checkpointer(cfg(), folder, [model], opts, scheds, None).save(4)
    os._exit(0)


def test_sigkill_during_save_leaves_previous_checkpoint_latest(tmp_path):
    model, opts, scheds = build()
    train(model, opts, scheds, None, 1)
    Checkpointer(cfg(), tmp_path, [model], opts, scheds, None).save(2)
    expected = full_sd(model)
    child = mp.get_context("fork").Process(target=_slow_save_child, args=(tmp_path,))
    child.start()
    tmp = tmp_path / "checkpoint" / "step-4.tmp"
    deadline = time.time() + 120
    while not (tmp.exists() and any(n.endswith(".distcp") for n in os.listdir(tmp))):
        assert time.time() < deadline and child.is_alive(), "the child never started writing"
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert child.exitcode == -signal.SIGKILL
    assert tmp.exists() and not (tmp_path / "checkpoint" / "step-4").exists()
    fresh = build(seed=3)
    ck = Checkpointer(cfg(), tmp_path, [fresh[0]], fresh[1], fresh[2], None)
    assert ck.load() == 2
    assert_sd_equal(full_sd(fresh[0]), expected)
    ck.save(3)
    assert sorted(os.listdir(tmp_path / "checkpoint")) == ["step-2", "step-3"]


def test_hf_export_loads_in_transformers_with_same_logits(tmp_path):
    import transformers

    model, opts, scheds = build()
    train(model, opts, scheds, None, 2)
    ck = Checkpointer(cfg(interval=100), tmp_path, [model], opts, scheds, None)
    assert ck.save(2, force=True)
    path = tmp_path / "hf" / "step-2"
    export_hf([model], path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokens = torch.randint(0, ARGS.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-3)

    # initial_load_hf: a fresh run starts from the export; a run with a checkpoint ignores it
    fresh = build(seed=4)
    ck2 = Checkpointer(cfg(folder="run2", initial_load_hf=str(path)), tmp_path, [fresh[0]], fresh[1], fresh[2], None)
    assert ck2.load() == 0 and load_initial_weights(ck2, str(path))
    assert_sd_equal(full_sd(fresh[0]), full_sd(model))
    ck3 = Checkpointer(cfg(initial_load_hf=str(path)), tmp_path, [fresh[0]], fresh[1], fresh[2], None)
    assert not load_initial_weights(ck3, str(path))
    bad = Checkpointer(
        cfg(folder="run3", initial_load_hf=str(tmp_path / "nope")), tmp_path, [fresh[0]], None, None, None
    )
    with pytest.raises(CheckpointError, match="nope does not exist"):
        load_initial_weights(bad, str(tmp_path / "nope"))


def test_two_pipeline_parts_in_one_process(tmp_path):
    """Virtual stages: two model parts with global layer keys and one optimizer container over both."""
    ref, _, _ = build()
    parts = checkpoint_split(ref, [(0, 2), (2, 4)])
    opts, scheds = build_opt_parts(parts)
    checkpoint_fake_step(parts, opts)
    ck = Checkpointer(cfg(), tmp_path, parts, opts, scheds, None)
    ck.save(1)
    plain = build(seed=7)
    assert Checkpointer(cfg(), tmp_path, [plain[0]], plain[1], plain[2], None).load() == 1
    assert_sd_equal(full_sd(plain[0]), {k: v for p in parts for k, v in full_sd(p).items()})
    export_hf(parts, tmp_path / "hf")
    assert os.path.exists(tmp_path / "hf" / "config.json")
