"""The shipped 16B recipes parse, validate, and describe layouts that fit their intended world size."""

import pathlib

import pytest

from moonlight.config import ModelArgs
from moonlight.parallel import ParallelDims
from moonlight.parallel.pipeline import resolve_layout
from moonlight.train.config import load_config

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
WORLD = {"moonlight-16b-pretrain.toml": 8, "moonlight-16b-pretrain-pp2.toml": 16, "moonlight-16b-sft.toml": 8,
         "moonlight-16b-lora.toml": 8, "moonlight-16b-dora.toml": 8, "debug-chat-sft.toml": 2}


def test_every_recipe_is_listed():
    assert sorted(p.name for p in CONFIGS.glob("*.toml")) == sorted(WORLD)


@pytest.mark.parametrize("name", sorted(WORLD))
def test_recipe_validates_for_its_world_size(name):
    cfg = load_config(str(CONFIGS / name), []).validate()
    p, t = cfg.parallelism, cfg.training
    args = ModelArgs.preset(cfg.model.name)
    dims = ParallelDims(dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, tp=p.tp, ep=p.ep, pp=p.pp,
                        world_size=WORLD[name])
    layout = resolve_layout(p.pp_layout or None, args, p.pp, p.pp_virtual_stages) if p.pp > 1 else None
    dims.validate(args, layout, p.pp_virtual_stages, sequence_parallel=p.sequence_parallel and p.tp > 1,
                  seq_len=t.seq_len)
    assert t.global_batch_size % (t.local_batch_size * dims.dp) == 0, "no whole number of accumulation steps"
    if layout:
        assert sum(layout) == args.num_hidden_layers
