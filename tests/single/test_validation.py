"""[validation] in one process: val_loss is the masked cross-entropy of the held-out batches (checked
against a direct forward of the same batches), leaves training untouched, and its errors name the
validation.* or inherited data.* keys."""

import math

import pytest
import torch
import torch.nn.functional as F

from moonlight.errors import ConfigError, DataError
from moonlight.data.loader import build_dataloader
from moonlight.train.trainer import Trainer
from tests.helpers import VALIDATION, validation_cfg, validation_records


def test_val_loss_equals_a_direct_forward_and_leaves_training_alone(tmp_path):
    trainer = Trainer(validation_cfg(tmp_path / "val", *VALIDATION))
    trainer.train()
    records = validation_records(tmp_path / "val")
    assert [("val_loss" in r) for r in records] == [True, True]

    # independent: the same held-out rows, one plain forward, CE summed over targets / their count
    cfg = trainer.cfg
    data = cfg.data.__class__(**{**cfg.data.__dict__, "format": "chat", "path": cfg.validation.path, "shuffle": False})
    loader = build_dataloader(data, trainer.tokenizer, 64, 4, 0, 1, cfg.training.seed)
    batches = [loader.next_batch_with_info() for _ in range(2)]
    model = trainer.model_parts[0].eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = model(b.inputs, positions=b.position_ids, document_ids=b.document_ids)
            total += float(F.cross_entropy(logits.flatten(0, 1).double(), b.labels.flatten(), reduction="sum"))
            count += int((b.labels != -100).sum())
    assert 0 < count < sum(b.labels.numel() for b in batches)  # a masked loss: not every position counts
    assert records[-1]["val_loss"] == pytest.approx(total / count, rel=1e-5)
    assert records[-1]["val_ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)

    # validating changes nothing of the training run: losses, router biases and weights are bit-equal
    plain = Trainer(validation_cfg(tmp_path / "plain"))
    plain.train()
    assert [r["loss"] for r in validation_records(tmp_path / "plain")] == [r["loss"] for r in records]
    for (n, a), b in zip(plain.model_parts[0].state_dict().items(), trainer.model_parts[0].state_dict().values()):
        assert torch.equal(a, b), n


def test_validation_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="validation.path must name"):
        validation_cfg(tmp_path, "--validation.enable=true", "--validation.path=").validate()  # train.toml names one
    with pytest.raises(ConfigError, match=r"validation.steps must be >= 1 \(got 0\)"):
        validation_cfg(tmp_path, *VALIDATION, "--validation.steps=0").validate()


def test_missing_validation_data_is_named_by_its_own_key(tmp_path):
    """The data readers' messages name data.path; for held-out data they name validation.path."""
    with pytest.raises(DataError, match=r"^validation\.path '.*nope\.jsonl': no jsonl files found"):
        Trainer(
            validation_cfg(
                tmp_path, *VALIDATION, f"--validation.path={tmp_path}/nope.jsonl", "--validation.format=jsonl"
            )
        )


def test_held_out_data_errors_name_validation_keys_and_the_inherited_data_keys(tmp_path):
    """What validation sets is named validation.*, what it inherits from [data] stays data.*, in every
    message (also those that name no key as "data.path"), and a path is quoted as it is."""
    held = tmp_path / "data.path" / "held.jsonl"  # a directory that looks like a key
    held.parent.mkdir()
    held.write_text('{"conversation": [{"role": "assistant", "content": "hi"}]}\n')  # no messages field
    chat = [*VALIDATION, f"--validation.path={held}"]
    with pytest.raises(DataError) as skipped:
        Trainer(validation_cfg(tmp_path / "skip", *chat))
    assert str(skipped.value) == (
        f"validation.path {str(held)!r}: no conversations to train on (it is empty, or every record was skipped as "
        "malformed: see the warnings above, and data.messages_key)"
    )
    with pytest.raises(
        DataError,
        match=r"^.*held\.jsonl:1: missing text field \'messages\' .*\(set "
        r'data\.on_bad_line = "skip" to skip malformed records\)$',
    ):
        Trainer(validation_cfg(tmp_path / "error", *chat, "--data.on_bad_line=error"))
    # validation.format unset: [data]'s jsonl format, read from validation.path
    short = held.with_name("short.jsonl")
    short.write_text('{"text": "hi"}\n')
    with pytest.raises(
        DataError,
        match=rf"^validation\.path {str(short)!r}: 3 tokens in 1 documents are fewer than "
        "one sequence",
    ):
        Trainer(validation_cfg(tmp_path / "short", "--validation.enable=true", f"--validation.path={short}"))
