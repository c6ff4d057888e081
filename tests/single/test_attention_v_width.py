"""MLA attention with v padded to the qk head size (CPU's choice) equals the true-v-width call
(CUDA's) in fp32: outputs and gradients, causal and document-masked."""

import copy
import dataclasses

import pytest
import torch

from moonlight.config import ModelArgs
from moonlight.model.model import MLA, DocumentMask, rope_angles


@pytest.mark.parametrize("masked", [False, True])
def test_padded_v_equals_true_width(masked):
    args = dataclasses.replace(ModelArgs.preset("debug", kernels="torch"))
    assert args.qk_head_dim != args.v_head_dim
    torch.manual_seed(0)
    padded = MLA(args)
    padded.pad_v = True
    true_width = copy.deepcopy(padded)
    true_width.pad_v = False
    x = torch.randn(2, 12, args.hidden_size)
    mask = DocumentMask(torch.tensor([[0] * 5 + [1] * 7, [0] * 12]), x.dtype) if masked else None
    outs, grads = [], []
    for m in (padded, true_width):
        xi = x.clone().requires_grad_()
        out = m(xi, rope_angles(args, x.shape[1], None, x.device), mask=mask)
        out.square().sum().backward()
        outs.append(out)
        grads.append([xi.grad] + [p.grad for p in m.parameters()])
    torch.testing.assert_close(outs[1], outs[0], atol=1e-6, rtol=1e-5)
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)  # flash vs math kernel: fp32 rounding
    assert MLA(args).pads_v(x, mask)  # CPU pads by default (measured faster there)
