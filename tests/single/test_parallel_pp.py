"""Pipeline parallel without ranks: layout validation, presets, the cost model, stage ids and schedule
checks."""

import types

import pytest

from moonlight.config import ModelArgs
from moonlight.errors import ConfigError
from moonlight.parallel.pipeline import build_schedule
from moonlight.parallel.pipeline_layout import (
    PRESET_LAYOUTS,
    auto_layout,
    layout_costs,
    resolve_layout,
    stage_ids_for_rank,
    validate_layout,
)

# ------------------------------------------------------------------ layouts (no processes)


def test_validate_layout_errors():
    with pytest.raises(
        ConfigError,
        match=r"pp_layout \[4, 6, 6, 6, 6, 3\] sums to 31 but the model has 27 "
        r"layers: remove 4 layer",
    ):
        validate_layout([4, 6, 6, 6, 6, 3], 27, 6)
    with pytest.raises(ConfigError, match="sums to 26 .* add 1 layer"):
        validate_layout([14, 12], 27, 2)
    with pytest.raises(ConfigError, match="empty stage at index 2"):
        validate_layout([14, 13, 0, 0], 27, 4)
    with pytest.raises(ConfigError, match="has 2 entries but pp=2 x pp_virtual_stages=2 = 4 stages need 4"):
        validate_layout([14, 13], 27, 2, 2)
    with pytest.raises(ConfigError, match="has 3 entries but pp=2 stages need 2"):
        validate_layout([9, 9, 9], 27, 2)
    assert validate_layout((14, 13), 27, 2) == [14, 13]


def test_megatron_pp8_table_is_rejected():
    megatron_pp8 = [4, 6 * 4, 3]  # first stage 4, six middle stages of 4, last 3: 31 decoder slots
    layout = [megatron_pp8[0]] + [4] * 6 + [megatron_pp8[2]]
    with pytest.raises(ConfigError, match="sums to 31 but the model has 27"):
        validate_layout(layout, 27, 8)


def test_presets_add_up_and_resolve():
    args = ModelArgs()
    assert PRESET_LAYOUTS["PP2"] == [14, 13] and PRESET_LAYOUTS["PP4"] == [7, 7, 7, 6]
    assert PRESET_LAYOUTS["PP2xVP2"] == PRESET_LAYOUTS["PP4"]
    for name, layout in PRESET_LAYOUTS.items():
        assert sum(layout) == 27 and min(layout) >= 1, name
        assert layout[-1] == min(layout), name
        pp, _, vp = name.removeprefix("PP").partition("xVP")
        assert resolve_layout(name, args, int(pp), int(vp or 1)) == layout
    with pytest.raises(ConfigError, match="is for pp=4"):
        resolve_layout("PP4", args, 2)
    with pytest.raises(ConfigError, match="unknown pp_layout preset"):
        resolve_layout("PP3", args, 3)
    with pytest.raises(ConfigError, match="sums to 28"):
        resolve_layout([8, 7, 7, 6], args, 4)  # the seed page's PP4


def test_cost_model_gives_last_stage_fewer_layers():
    args = ModelArgs()
    for pp, vp in [(2, 1), (4, 1), (8, 1), (2, 2), (4, 2)]:
        layout = auto_layout(args, pp, vp)
        validate_layout(layout, 27, pp, vp)
        assert layout[-1] < min(layout[:-1]), (pp, vp, layout)
        assert resolve_layout("auto", args, pp, vp) == layout
        # balanced: no stage costs more than the largest stage of the even split
        costs = layout_costs(args, layout)
        even = [27 // (pp * vp) + (1 if i < 27 % (pp * vp) else 0) for i in range(pp * vp)]
        assert max(costs) <= max(layout_costs(args, even))
    # lm_head + loss per token: about as many FLOPs as several MoE layers
    costs = layout_costs(args, [26, 1])
    one_layer = layout_costs(args, [1, 26])[0]
    assert 2.5 < (costs[1] - one_layer) / one_layer < 5
    with pytest.raises(ConfigError, match="exceed the 4 decoder layers"):
        auto_layout(ModelArgs.preset("debug"), 4, 2)


def test_stage_ids():
    assert stage_ids_for_rank(0, 2, 2) == [0, 2] and stage_ids_for_rank(1, 2, 2) == [1, 3]
    assert stage_ids_for_rank(0, 2, 2, "v") == [0, 3] and stage_ids_for_rank(1, 2, 2, "v") == [1, 2]
    with pytest.raises(ConfigError, match="pp_virtual_stages=2"):
        stage_ids_for_rank(0, 2, 3, "v")


def test_build_schedule_validation():
    one = [types.SimpleNamespace(group_size=2, num_stages=2)]
    two = one * 2
    with pytest.raises(ConfigError, match="runs one stage per rank, but pp_virtual_stages=2"):
        build_schedule(two, "1F1B", 4)
    with pytest.raises(ConfigError, match="does not split into 3 equal microbatches"):
        build_schedule(one, "1F1B", 3, local_batch_size=4)
    with pytest.raises(ConfigError, match="at least 2 microbatches"):
        build_schedule(two, "Interleaved1F1B", 1)
    with pytest.raises(ConfigError, match="multiple of 2"):
        build_schedule(two, "Interleaved1F1B", 5)
    with pytest.raises(ConfigError, match="unknown pipeline schedule"):
        build_schedule(one, "2F2B", 4)
    with pytest.raises(ConfigError, match="needs pp_virtual_stages=2"):
        build_schedule(one, "ZBVZeroBubble", 4)
