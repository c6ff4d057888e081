"""The FSDP2 unit structure on 2 gloo ranks: embedding, blocks (routers inside), experts (with expert
parallel) and head units, reshard settings and explicit prefetch lists."""

import dataclasses

import pytest
import torch
from torch.distributed.fsdp import FSDPModule

from moonlight.config import ModelArgs
from moonlight.model import Moonlight
from tests.dist import run_ranks


def _units(rank, world_size, ep, param_dtype):
    from moonlight.parallel.mesh import ParallelDims, build_mesh
    from moonlight.parallel.parallelize import parallelize_model

    args = dataclasses.replace(ModelArgs.preset("debug", kernels="torch"), num_hidden_layers=3)
    torch.manual_seed(0)
    model = Moonlight(args)
    dims = ParallelDims(world_size=world_size, ep=ep)
    parallelize_model(model, dims, build_mesh(dims, "cpu"), param_dtype=param_dtype)
    units = {n or "<root>": m for n, m in model.named_modules() if isinstance(m, FSDPModule)}
    state = {n: m._get_fsdp_state() for n, m in units.items()}
    name_of = {}
    for n, s in state.items():
        name_of.setdefault(id(s), n)  # norm and lm_head are one unit: named "norm"

    def group(n):
        g = state[n]._fsdp_param_group
        return None if g is None else g.post_forward_mesh_info is not None  # resharded after forward

    def names(states):
        return [name_of[id(s)] for s in states]

    out = {
        "units": sorted(units),
        "reshard": {n: group(n) for n in units},
        "forward_prefetch": {n: names(s._states_to_forward_prefetch) for n, s in state.items()},
        "backward_prefetch": {n: names(s._states_to_backward_prefetch) for n, s in state.items()},
        "head_is_one_unit": state["norm"] is state["lm_head"],
    }
    # one step runs (the experts left outside every unit still get their gradients)
    tokens = torch.randint(0, args.vocab_size, (2, 8))
    model(tokens).float().pow(2).mean().backward()
    out["expert_grad"] = model.layers["1"].ffn.experts.gate_proj.grad is not None
    return out


@pytest.mark.parametrize("ep,param_dtype", [(1, "float32"), (2, "float32"), (2, "bfloat16")])
def test_fsdp_units(ep, param_dtype):
    got = run_ranks(_units, 2, ep, param_dtype)[0]
    blocks = ["layers.0", "layers.1", "layers.2"]
    experts = {(2, "float32"): [], (2, "bfloat16"): ["layers.1.ffn.experts", "layers.2.ffn.experts"]}.get(
        (ep, param_dtype), []
    )
    assert got["units"] == sorted(["<root>", "embed", "norm", "lm_head", *blocks, *experts])  # no router units
    assert got["head_is_one_unit"]
    assert got["reshard"]["norm"] is False  # the head unit (norm + lm_head) stays gathered
    assert all(got["reshard"][b] for b in ["embed", *blocks, *experts])
    fwd, bwd = got["forward_prefetch"], got["backward_prefetch"]
    with_experts = {b: [b, f"{b}.ffn.experts"] if f"{b}.ffn.experts" in experts else [b] for b in blocks}
    assert fwd["embed"] == with_experts["layers.0"]
    assert fwd["layers.0"] == with_experts["layers.1"] and fwd["layers.1"] == with_experts["layers.2"]
    assert fwd["layers.2"] == ["norm"]
    assert bwd["norm"] == with_experts["layers.2"] and bwd["layers.1"] == with_experts["layers.0"]
    assert bwd["layers.0"] == ["embed"]
    assert got["expert_grad"]
