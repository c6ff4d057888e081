"""Op-level checkpointing keeps SDPA and matmul outputs: the backward recomputes neither (full
checkpointing recomputes both), and the gradients equal the uncheckpointed ones."""

import copy
import dataclasses
import inspect

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import SelectiveCheckpointContext

from moonlight.config import ModelArgs
from moonlight.model import Moonlight
from moonlight.parallel.data_parallel import apply_activation_checkpointing
from tests.helpers import summed_loss

pytestmark = pytest.mark.floor  # also run on torch 2.11 (.ci/run)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func] = self.counts.get(func, 0) + 1
        return func(*args, **(kwargs or {}))


def _backward_ops(model, tokens):
    """The ops the backward runs (a counting mode around it), then the gradients of a plain run (the
    mode sits on top of checkpointing's own dispatch modes, so its run's gradients are not used)."""
    loss = summed_loss(model, tokens, tokens)
    with _CountOps() as ops:
        loss.backward()
    model.zero_grad(set_to_none=True)
    summed_loss(model, tokens, tokens).backward()
    return ops.counts, {n: p.grad for n, p in model.named_parameters()}


def test_op_level_checkpoint_saves_sdpa_and_matmuls():
    args = dataclasses.replace(ModelArgs.preset("debug", kernels="torch"), num_hidden_layers=2)
    torch.manual_seed(0)
    ref = Moonlight(args)
    ref.init_weights()  # router and expert weights are allocated uninitialized
    tokens = torch.randint(0, args.vocab_size, (2, 16))
    base_ops, base_grads = _backward_ops(copy.deepcopy(ref), tokens)
    full_ops, _ = _backward_ops(apply_activation_checkpointing(copy.deepcopy(ref), "full"), tokens)
    op_ops, op_grads = _backward_ops(apply_activation_checkpointing(copy.deepcopy(ref), "op"), tokens)
    sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    mm = torch.ops.aten.mm.default
    assert base_ops.get(sdpa, 0) == 0 and full_ops[sdpa] == 2  # full recomputes each layer's attention
    assert op_ops.get(sdpa, 0) == 0
    assert full_ops[mm] > base_ops[mm] and op_ops[mm] == base_ops[mm]
    assert op_ops[torch.ops.aten.mul.Tensor] > base_ops[torch.ops.aten.mul.Tensor]  # the cheap ops are redone
    for n, g in base_grads.items():
        torch.testing.assert_close(op_grads[n], g, atol=1e-6, rtol=1e-5, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("policy_sees_output", [True, False])
def test_op_level_checkpoint_rotates_q_once_whether_or_not_its_matmul_is_kept(policy_sees_output, monkeypatch):
    """RoPE rotates q in place. Plain q_proj: q is a kept matmul output, so the recompute must not
    rotate it again; LoRA's q_proj: q is a recomputed sum, so the recompute must rotate it. Both with
    the kept outputs handed to the policy (torch >= 2.13) and recorded by a dispatch mode (before)."""
    from moonlight.model.lora import apply_lora

    if policy_sees_output and "op_output" not in inspect.signature(SelectiveCheckpointContext).parameters:
        pytest.skip("this torch calls the checkpoint policy before each op, without its output")
    monkeypatch.setattr("moonlight.parallel.data_parallel._POLICY_SEES_OUTPUT", policy_sees_output)

    args = dataclasses.replace(ModelArgs.preset("debug", kernels="torch"), num_hidden_layers=1)
    torch.manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (2, 16))
    for lora in (False, True):
        ref = Moonlight(args)
        ref.init_weights()
        if lora:
            apply_lora(ref, targets=["attn.q_proj"], rank=4)
            for name, p in ref.named_parameters():
                if "lora_b" in name:  # zero-initialized: make the adapter's branch matter
                    torch.nn.init.normal_(p, std=0.1)
        grads = []
        for model in (copy.deepcopy(ref), apply_activation_checkpointing(copy.deepcopy(ref), "op")):
            summed_loss(model, tokens, tokens).backward()
            grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        assert grads[0].keys() == grads[1].keys() and grads[0]
        for n, g in grads[0].items():
            torch.testing.assert_close(grads[1][n], g, atol=1e-6, rtol=1e-5, msg=lambda m: f"lora={lora} {n}: {m}")
