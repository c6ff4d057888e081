"""The trainer end to end on one process: the default job learns, metrics are written, bad steps are
caught, config errors name the problem."""

import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from moonlight.errors import ConfigError, DataError, NonFiniteError
from moonlight.train.config import load_config
from moonlight.data.megatron import MegatronIndexedWriter
from moonlight.train.build import build_model_args
from moonlight.train.trainer import Trainer
from tests.helpers import SMALL, read_metrics


def _trainer(tmp_path, *extra):
    return Trainer(load_config("train.toml", SMALL + [f"--job.dump_folder={tmp_path}", *extra]))


@pytest.mark.floor  # the trainer run CI repeats on torch 2.11
def test_default_job_loss_falls_and_metrics_are_written(tmp_path):
    _trainer(tmp_path, "--training.steps=25").train()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 26))
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 1.0, (first, last)
    for key in ("grad_norm", "lr", "tokens_per_s", "mfu_pct", "memory_gib", "max_expert_load", "aux_loss"):
        assert key in rows[-1], key
    assert len(rows[-1]["expert_load"]) == 3  # one imbalance figure per MoE layer of the debug model
    assert (tmp_path / "config.toml").read_text().count("[training]") == 1


def test_adamw_and_wsd_schedule_run(tmp_path):
    _trainer(tmp_path, "--training.steps=6", "--optimizer.name=adamw", "--lr_scheduler.decay_type=wsd").train()
    rows = read_metrics(tmp_path)
    assert rows[-1]["lr"] == pytest.approx(3e-3 * 0.1)  # decayed to optimizer.lr x min_lr_ratio at the end
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


def test_same_seed_same_losses(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _trainer(a, "--training.steps=3").train()
    _trainer(b, "--training.steps=3").train()
    assert [r["loss"] for r in read_metrics(a)] == [r["loss"] for r in read_metrics(b)]


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _trainer(a, "--training.steps=3", "--training.local_batch_size=4").train()
    _trainer(b, "--training.steps=3", "--training.local_batch_size=1").train()
    la, lb = [r["loss"] for r in read_metrics(a)], [r["loss"] for r in read_metrics(b)]
    assert la == pytest.approx(lb, rel=1e-4)


def _poison_layer_2(trainer, at_call):
    """Make layer 2's attention output NaN from its `at_call`-th forward on."""
    calls = {"n": 0}
    attn = trainer.model_parts[0].layers["2"].attn

    def hook(module, inputs, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] >= at_call else output

    attn.register_forward_hook(hook)


def test_forward_backward_time_is_reported_on_request_without_the_optimizer(tmp_path):
    """benchmarks/train_step.py's split of the step: forward_backward_s only when asked for, the optimizer
    step outside it, and the step itself unchanged."""
    plain, timed = _trainer(tmp_path / "plain"), _trainer(tmp_path / "timed")
    untimed = plain.train_step()
    assert "forward_backward_s" not in untimed
    timed.time_forward_backward = True
    step = timed.optimizers.step

    def slow_step():  # a known time spent after forward+backward
        time.sleep(0.3)
        step()

    timed.optimizers.step = slow_step
    values = timed.train_step()
    assert 0 < values["forward_backward_s"] <= values["step_time_s"] - 0.3
    assert values["loss"] == untimed["loss"]


def test_nonfinite_step_is_skipped_and_reported(tmp_path, capsys):
    trainer = _trainer(tmp_path, "--training.steps=4", "--training.on_nonfinite=skip")
    _poison_layer_2(trainer, at_call=5)  # step 3 (2 micro-batches per step)
    before = {}

    def snapshot():
        before.update({n: p.detach().clone() for n, p in trainer.model_parts[0].named_parameters()})

    for _ in range(2):
        trainer.train_step()
        trainer.step += 1
    snapshot()
    values = trainer.train_step()
    assert values["skipped"] and not torch.isfinite(torch.tensor(values["loss"]))
    for n, p in trainer.model_parts[0].named_parameters():
        assert torch.equal(p, before[n]), f"{n} changed on a skipped step"
    out = capsys.readouterr().out
    assert "step 3" in out and "module layers.2.attn " in out


def test_nonfinite_stop_raises_with_step_and_module(tmp_path):
    trainer = _trainer(tmp_path, "--training.steps=4", "--training.on_nonfinite=stop")
    _poison_layer_2(trainer, at_call=1)
    with pytest.raises(NonFiniteError, match=r"step 1: .*module layers\.2\.attn "):
        trainer.train()


def test_unknown_model_override_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'hidden_size'"):
        _trainer(tmp_path, "--model.overrides.hiden_size=64")


def test_data_ids_beyond_the_vocabulary_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="token id .* vocab_size is 200"):
        _trainer(tmp_path, "--model.overrides.vocab_size=200", "--data.add_eos=false")  # bytes reach 255
    with pytest.raises(ConfigError, match="bos/eos ids reach 257"):
        _trainer(tmp_path, "--model.overrides.vocab_size=256")


def test_a_tokenizer_without_eos_is_named(tmp_path):
    """Fault: a tokenizer.json without bos/eos tokens was a TypeError in the trainer's vocabulary check."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(DataError, match="data.add_eos = true but the tokenizer has no eos token: set data.add_eos"):
        _trainer(tmp_path / "run", f"--data.tokenizer={tmp_path}")


def test_validation_ids_beyond_the_vocabulary_are_rejected(tmp_path):
    with MegatronIndexedWriter(str(tmp_path / "held_out"), np.uint16) as w:
        w.add_document([5, 290] + [7] * 100)  # e.g. another tokenizer's ids; the training bytes stay below 280
    with pytest.raises(ConfigError, match="validation data holds token id 290 .* vocab_size is 280"):
        _trainer(
            tmp_path / "run",
            "--model.overrides.vocab_size=280",
            "--validation.enable=true",
            "--validation.format=megatron",
            f"--validation.path={tmp_path / 'held_out'}",
        )


def test_train_py_reports_config_errors_cleanly(tmp_path):
    proc = subprocess.run(
        [sys.executable, "train.py", "--config", "train.toml", "--training.stepz=3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "training.stepz" in proc.stderr and "steps" in proc.stderr


def test_bf16_params_with_fp32_master_weights_and_tensorboard(tmp_path):
    trainer = _trainer(
        tmp_path,
        "--training.steps=3",
        "--training.dtype=bfloat16",
        "--optimizer.precision_aware=true",
        "--metrics.enable_tensorboard=true",
    )
    trainer.train()
    model = trainer.model_parts[0]
    assert model.layers["1"].ffn.experts.gate_proj.dtype == torch.bfloat16
    assert model.layers["1"].ffn.router.expert_bias.dtype == torch.float32
    masters = [s["master"] for opt in trainer.optimizers.optimizers for s in opt.state.values() if "master" in s]
    assert masters and all(m.dtype == torch.float32 for m in masters)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in read_metrics(tmp_path))
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_profiler_window_writes_a_trace(tmp_path):
    _trainer(tmp_path, "--training.steps=3", "--metrics.profile_start=2", "--metrics.profile_steps=1").train()
    assert list((tmp_path / "profile").glob("rank0*.pt.trace.json*"))


def _train_until_killed(folder):
    torch.set_num_threads(1)  # forked: never enter the parent's OpenMP pool
    _trainer(folder, "--training.steps=1000", "--checkpoint.enable=true", "--checkpoint.interval=1000").train()


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path):
    import multiprocessing as mp
    import os
    import signal
    import time

    child = mp.get_context("fork").Process(target=_train_until_killed, args=(tmp_path,))
    child.start()
    deadline = time.time() + 120
    while time.time() < deadline and not ((tmp_path / "metrics.jsonl").exists() and len(_metrics_lines(tmp_path)) >= 2):
        time.sleep(0.2)
    os.kill(child.pid, signal.SIGTERM)
    child.join(timeout=120)
    assert child.exitcode == 0
    last = read_metrics(tmp_path)[-1]["step"]
    assert 2 <= last < 1000
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == [f"step-{last}"]


def _metrics_lines(folder):
    with open(f"{folder}/metrics.jsonl") as f:
        return [line for line in f if line.strip()]


def test_models_too_large_for_a_cpu_init_are_initialized_in_place(tmp_path, monkeypatch):
    """Above the full-init size the model is built on meta and materialized on the training device."""
    import moonlight.train.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "_FULL_INIT_MAX_PARAMS", 0)
    for extra in ([], ["--lora.enable=true"]):
        trainer = _trainer(tmp_path / str(len(extra)), "--training.steps=2", *extra)
        trainer.train()
        assert not any(p.is_meta for p in trainer.model_parts[0].parameters())
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in read_metrics(tmp_path / str(len(extra))))


@pytest.mark.parametrize("key", ["checkpoint.initial_load_hf", "model.hf_config"])
def test_a_missing_model_source_is_named_by_its_key(tmp_path, key):
    cfg = load_config("train.toml", [f"--{key}={tmp_path}/missing"]).validate()
    with pytest.raises(ConfigError, match=f"{key} = '{tmp_path}/missing' does not exist: point it at a Hugging Face"):
        build_model_args(cfg)


def test_seq_aux_false_trains_without_the_aux_loss(tmp_path):
    """model seq_aux = false turns the sequence balance loss off, as moe.aux_loss_coeff = 0 does (the
    trainer used to overwrite the model's coefficient with moe.aux_loss_coeff)."""
    off, zero = tmp_path / "off", tmp_path / "zero"
    _trainer(off, "--training.steps=3", "--moe.aux_loss_coeff=0.1", "--model.overrides.seq_aux=false").train()
    _trainer(zero, "--training.steps=3", "--moe.aux_loss_coeff=0").train()
    assert "aux_loss" not in read_metrics(off)[-1]
    assert [r["loss"] for r in read_metrics(off)] == [r["loss"] for r in read_metrics(zero)]
