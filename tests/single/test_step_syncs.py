"""Host syncs of a training step in one process: an unlogged step reads back only ONE copy of (loss,
grad norm) for the non-finite check (the loss normalizer, the step's token count, stays a tensor); a
logged step adds one read of the MoE metrics. The logged values equal the ones computed tensor by
tensor."""

from types import SimpleNamespace

import pytest
import torch

from moonlight.train.config import load_config
from moonlight.train.balance import expert_load_imbalance
from moonlight.train.trainer import Trainer
from tests.helpers import host_syncs
from tests.helpers import STEP_SYNCS_SMALL


def test_syncs_on_logged_and_unlogged_steps(tmp_path):
    trainer = Trainer(load_config("train.toml", STEP_SYNCS_SMALL + [f"--job.dump_folder={tmp_path}"]))
    trainer.optimizers.step = lambda: None  # the optimizer's own bookkeeping is not the step's metrics
    counted, values = [], []
    for step in range(1, 5):
        counted.append(host_syncs(lambda: values.append(trainer.train_step())))
        trainer.step = step
    assert [trainer.logs_step(s) for s in range(1, 5)] == [False, True, False, True]
    assert counted[0] == counted[2] == ["tolist"], counted
    assert counted[1] == counted[3] == counted[0] + ["tolist"], counted
    assert "expert_load" not in values[0] and "aux_loss" not in values[0]
    assert len(values[1]["expert_load"]) == 3 and values[1]["aux_loss"] > 0
    assert values[1]["max_expert_load"] == pytest.approx(max(values[1]["expert_load"]), abs=1e-3)


def test_moe_metrics_match_tensor_reads(tmp_path):
    trainer = Trainer(load_config("train.toml", STEP_SYNCS_SMALL + [f"--job.dump_folder={tmp_path}"]))
    counts = torch.tensor([[3.0, 1.0, 0.0, 4.0], [2.0, 2.0, 2.0, 2.0]], dtype=torch.float64)
    # what the metrics read of each MoE layer
    layers = len(trainer.model_parts[0].moe_layers())
    moe_layers = [SimpleNamespace(last_aux_loss=torch.tensor(0.25 * (i + 1))) for i in range(layers)]
    got = trainer._moe_metrics(counts, moe_layers)
    imbalance = expert_load_imbalance(counts)
    assert got["expert_load"] == [round(float(x), 3) for x in imbalance]
    assert got["max_expert_load"] == float(imbalance.max())
    assert got["aux_loss"] == float(sum(m.last_aux_loss for m in moe_layers)) * trainer.n_forwards
    assert trainer._moe_metrics(torch.zeros(2, 4, dtype=torch.float64), moe_layers) == {}
