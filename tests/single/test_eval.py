"""`python -m moonlight.eval` equals the trainer's validation loss on the same data and weights: a
DCP checkpoint (jsonl and chat data), the run's HF export, and a base + a LoRA run's PEFT adapter;
its errors are one line."""

import json

import pytest

from moonlight import convert as moonlight_convert
from moonlight import eval as moonlight_eval
from moonlight.train.config import load_config
from moonlight.train.trainer import Trainer
from tests.helpers import short_job

SMALL = short_job(
    {
        "training.steps": 1,
        "training.seq_len": 64,
        "checkpoint.enable": True,
        "lr_scheduler.warmup_steps": 0,
        "validation.enable": True,
        "validation.steps": 2,
    }
)


def _train(folder, *extra, config="train.toml"):
    Trainer(load_config(config, SMALL + [f"--job.dump_folder={folder}", *extra])).train()
    with open(folder / "metrics.jsonl") as f:
        return [json.loads(line) for line in f][-1]["val_loss"]


def _eval(capsys, *argv):
    assert moonlight_eval.main(list(argv)) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


# validation.steps=2 global batches of 4 sequences = --batches 2 --batch-size 4
SAME_BATCHES = ["--seq-len", "64", "--batch-size", "4", "--batches", "2", "--tokenizer", "byte"]


def test_eval_of_a_checkpoint_and_its_hf_export_equals_the_validation_loss(tmp_path, capsys):
    val_loss = _train(tmp_path, "--validation.path=data/heldout", "--checkpoint.export_hf=end")
    ours = _eval(capsys, "data/heldout", "--dcp", str(tmp_path / "checkpoint"), *SAME_BATCHES)
    assert ours["loss"] == pytest.approx(val_loss, rel=1e-6)
    assert ours["target_tokens"] == 2 * 4 * 64 and ours["sequences"] == 8 and ours["tokens_per_s"] > 0
    hf = _eval(capsys, "data/heldout", "--hf", str(tmp_path / "hf" / "step-1"), *SAME_BATCHES)
    assert hf["loss"] == pytest.approx(val_loss, rel=1e-6)
    by_step = _eval(capsys, "data/heldout", "--dcp", str(tmp_path / "checkpoint"), "--step", "1", *SAME_BATCHES)
    assert by_step["loss"] == ours["loss"]

    # a LoRA run on that export as its base: base + the PEFT adapter it exported
    base, lora = tmp_path / "hf" / "step-1", tmp_path / "lora"
    lora_val = _train(
        lora,
        "--validation.path=data/heldout",
        "--lora.enable=true",
        "--lora.export_adapter=end",
        f"--checkpoint.initial_load_hf={base}",
        "--optimizer.lr=0.05",
    )
    assert abs(lora_val - val_loss) > 1e-4  # the adapter changed the loss: the comparison is not vacuous
    adapted = _eval(
        capsys, "data/heldout", "--hf", str(base), "--adapter", str(lora / "adapter" / "step-1"), *SAME_BATCHES
    )
    assert adapted["loss"] == pytest.approx(lora_val, rel=1e-6)
    with open(lora / "adapter" / "step-1" / "adapter_config.json") as f:
        assert json.load(f)["base_model_name_or_path"] == str(base)
    assert (
        moonlight_convert.main(["dcp-to-peft", "--dcp", str(lora / "checkpoint"), "--out", str(tmp_path / "cli")]) == 0
    )
    with open(tmp_path / "cli" / "adapter_config.json") as f:
        assert json.load(f)["base_model_name_or_path"] == str(base)  # from the checkpoint's meta.json


def test_eval_of_chat_data_scores_the_assistant_tokens_as_validation_does(tmp_path, capsys):
    val_loss = _train(tmp_path, "--validation.path=data/chat/sample.jsonl", config="configs/debug-chat-sft.toml")
    ours = _eval(
        capsys, "data/chat/sample.jsonl", "--format", "chat", "--dcp", str(tmp_path / "checkpoint"), *SAME_BATCHES
    )
    assert ours["loss"] == pytest.approx(val_loss, rel=1e-6)
    assert 0 < ours["target_tokens"] < 2 * 4 * 64  # only the assistant turns are targets


@pytest.mark.parametrize(
    "argv,match",
    [
        (["data/heldout", "--dcp", "nowhere"], "--dcp checkpoints hold no tokenizer"),
        (["data/heldout", "--hf", "nowhere", "--tokenizer", "byte"], "not a Hugging Face checkpoint"),
        (["data/heldout", "--dcp", "x", "--tokenizer", "byte", "--seq-len", "0"], "--seq-len must be >= 1"),
        (["missing.jsonl", "--dcp", "x", "--tokenizer", "byte"], "missing.jsonl"),
    ],
)
def test_bad_arguments_are_one_error_line(argv, match, capsys):
    assert moonlight_eval.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and match in err[0], err
