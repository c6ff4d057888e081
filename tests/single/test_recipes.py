"""The shipped 16B recipes parse, validate, and describe parallel configurations that fit their intended
world size."""

import pytest

from moonlight.config import ModelArgs
from moonlight.train.config import load_config
from moonlight.train.parallel_run import plan_parallelism
from tests.helpers import CONFIGS, WORLD


def test_every_recipe_is_listed():
    assert sorted(p.name for p in CONFIGS.glob("*.toml")) == sorted(WORLD)


@pytest.mark.parametrize("name", sorted(WORLD))
def test_recipe_validates_for_its_world_size(name):
    cfg = load_config(str(CONFIGS / name), []).validate()
    args = ModelArgs.preset(cfg.model.name)  # the recipes' HF directories are placeholders here
    dims, pp_layout = plan_parallelism(cfg, args, WORLD[name])  # what the trainer runs before building anything
    t = cfg.training
    assert t.global_batch_size % (t.local_batch_size * dims.dp) == 0, "no whole number of accumulation steps"
    if pp_layout:
        assert sum(pp_layout) == args.num_hidden_layers


@pytest.mark.parametrize(
    "name",
    ["moonlight-16b-sft.toml", "moonlight-16b-sft-long.toml", "moonlight-16b-lora.toml", "moonlight-16b-dora.toml"],
)
def test_fine_tuning_recipes_train_on_chat_with_validation(name):
    cfg = load_config(str(CONFIGS / name), [])
    assert cfg.data.format == "chat" and cfg.validation.enable and cfg.validation.format == "chat"
    if cfg.lora.enable:  # the router bias stays frozen and the adapter is exported for PEFT
        assert cfg.moe.bias_rate(lora=True) == 0.0 and cfg.lora.export_adapter == "end"
