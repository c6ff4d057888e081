"""What a user sees: `train.py --help [SECTION]` documents every config key from the dataclasses,
`--print-config` prints the resolved config, and a default run prints a short header, one line per
save or export, step lines with elapsed time and ETA, and a closing summary."""

import dataclasses
import importlib.util
import re
import tomllib

import pytest

from moonlight.train.config import SECTIONS, load_config
from moonlight.train.config_io import field_docs
from moonlight.train.trainer import Trainer
from tests.helpers import ROOT, short_job

_spec = importlib.util.spec_from_file_location("train_entry", ROOT / "train.py")
train_entry = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_entry)


def test_help_lists_every_key_with_its_type_default_and_description(capsys):
    assert train_entry.main(["--help"]) == 0
    out = capsys.readouterr().out
    for sec, cls in SECTIONS.items():
        assert f"[{sec}]" in out
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{sec}.{f.name} has no description (a docstring under the field)"
            assert re.search(rf"^  {f.name}: .+ = .+$", out, re.M), f"{sec}.{f.name} missing from --help"
            assert docs[f.name].split()[0] in out
    assert "  steps: int = 200\n      Optimizer steps to train" in out


def test_help_of_one_section_and_of_an_unknown_one(capsys):
    assert train_entry.main(["--help", "lora"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("[lora]") and "[training]" not in out and "  export_adapter: one of" in out
    assert train_entry.main(["--help", "lorra"]) == 2
    assert "no config section [lorra]" in capsys.readouterr().err


def test_print_config_prints_the_resolved_config_and_trains_nothing(tmp_path, capsys):
    argv = ["--config", "train.toml", f"--job.dump_folder={tmp_path}/run", "--training.steps=70", "--print-config"]
    assert train_entry.main(argv) == 0
    printed = tomllib.loads(capsys.readouterr().out)
    assert printed["training"]["steps"] == 70 and printed["validation"]["path"] == "data/heldout"
    assert not (tmp_path / "run").exists()


SMALL = short_job(
    {
        "training.seq_len": 64,
        "checkpoint.enable": None,
        "checkpoint.interval": 1,
        "checkpoint.export_hf": "end",
        "metrics.log_freq": None,
        "metrics.device_peak_flops": None,
        "lr_scheduler.warmup_steps": 0,
        "validation.interval": 1,
        "validation.steps": 1,
    }
)


def _run(folder, capsys, steps):
    Trainer(
        load_config(
            "train.toml",
            SMALL + [f"--job.dump_folder={folder}", f"--training.steps={steps}", f"--metrics.log_freq={steps}"],
        )
    ).train()
    return capsys.readouterr().out.splitlines()


def test_a_default_run_prints_a_short_header_each_save_and_a_summary(tmp_path, capsys):
    lines = _run(tmp_path, capsys, 2)
    first_step = next(i for i, line in enumerate(lines) if line.startswith("step "))
    header = lines[:first_step]
    assert len(header) <= 8, header  # with torchrun's 4-line OMP notice, well within a screen
    assert not any("[training]" in line for line in lines)  # the config is in config.toml, not on stdout
    assert (tmp_path / "config.toml").read_text().count("[training]") == 1
    text = "\n".join(header)
    for part in (
        "model preset debug",
        "params",
        "parallelism",
        "2 steps of 4 x 64 tokens",
        "data: jsonl data/corpus",
        "validation: data/heldout every 1 steps",
        f"outputs: {tmp_path}",
    ):
        assert part in text, (part, header)
    assert re.search(
        r"^step +1 +loss \S+ .*memory [\d.]+ GiB .*val_loss [\d.]+ .*elapsed \S+ +eta \S+$", lines[first_step]
    )
    assert any(re.search(r"^step +2 +loss \S+ .*tokens/s [\d,]+ .*elapsed \S+ +eta 0\.0s$", line) for line in lines)
    assert any(line.startswith(f"[moonlight] step 1: checkpoint -> {tmp_path}/checkpoint/step-1 (") for line in lines)
    saves = [line for line in lines if re.match(r"\[moonlight\] step \d+: (checkpoint|HF export) -> ", line)]
    assert len(saves) == 3  # step 1's checkpoint, step 2's checkpoint and HF export
    summary = "\n".join(lines[lines.index(saves[-1]) + 1 :])
    assert re.search(r"done: 2 steps \(1-2\), 512 tokens in \S+; [\d,]+ tokens/s, MFU [\d.]+%", summary)
    assert re.search(r"final loss [\d.]+ \(step 2\); validation loss [\d.]+ final, [\d.]+ best \(step \d\)", summary)
    assert f"last checkpoint: {tmp_path}/checkpoint/step-2" in summary
    assert f"last HF export: {tmp_path}/hf/step-2" in summary

    resumed = _run(tmp_path, capsys, 3)
    assert f"[moonlight] resumed from {tmp_path}/checkpoint/step-2" in resumed
    assert any("done: 1 steps (3-3), 256 tokens" in line for line in resumed)


def test_eta_and_durations_read_as_times():
    from moonlight.train.report import duration

    assert [duration(s) for s in (4.25, 65, 3725)] == ["4.2s", "1:05", "1:02:05"]
    assert duration(float("nan")) == "?"


@pytest.mark.parametrize("steps", [1])
def test_nothing_to_train_prints_no_summary(tmp_path, capsys, steps):
    _run(tmp_path, capsys, steps)
    again = _run(tmp_path, capsys, steps)
    assert any("nothing to train" in line for line in again) and not any("done:" in line for line in again)
