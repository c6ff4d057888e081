"""Cross-entropy straight from the final hidden states, chunk by chunk over the tokens.

    linear_cross_entropy(hidden [N, H], weight [V, H], labels [N]) -> sum of token losses (fp32 or fp64)

equals F.cross_entropy((hidden @ weight.T).float(), labels, reduction="sum") without building the
[N, V] logits: each chunk's logits are made, reduced to their log-sum-exp and dropped, and the
backward makes them again. For Moonlight (V = 163840) a 4096-token sequence would otherwise hold
its bf16 logits, their fp32 copy and the fp32 gradient, about 7 GB; here one chunk's fp32 logits
(`chunk_bytes`, 512 MiB by default) is the peak. The price is one more hidden x vocab matmul.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _chunk_losses(logits: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """(log-sum-exp [n], loss [n] (0 where ignored), valid [n]) of one chunk of logits, in fp32 or wider."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    lse = logits.logsumexp(-1)
    valid = labels != ignore_index
    target = logits.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    return lse, torch.where(valid, lse - target, 0.0), valid


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_rows):
        acc = torch.promote_types(hidden.dtype, torch.float32)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        lse = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            lse[rows], loss, _ = _chunk_losses(hidden[rows] @ weight.t(), labels[rows], ignore_index)
            total += loss.sum()
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.ignore_index, ctx.chunk_rows = ignore_index, chunk_rows
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, labels, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        # accumulated over the chunks in fp32 (fp64 stays fp64)
        grad_weight = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32),
                                  device=weight.device)
        for start in range(0, hidden.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            h, chunk_labels = hidden[rows], labels[rows]
            # d loss / d logits = softmax - one_hot(label), zero for ignored tokens
            grad_logits = ((h @ weight.t()).to(lse.dtype) - lse[rows].unsqueeze(-1)).exp_()
            valid = chunk_labels != ctx.ignore_index
            grad_logits.scatter_add_(1, torch.where(valid, chunk_labels, 0).unsqueeze(-1),
                                     -valid.to(grad_logits.dtype).unsqueeze(-1))
            grad_logits.mul_((valid * grad_total).unsqueeze(-1))
            grad_logits = grad_logits.to(hidden.dtype)
            grad_hidden[rows] = grad_logits @ weight
            grad_weight += grad_logits.t() @ h
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int = -100,
                         chunk_bytes: int = 512 << 20) -> Tensor:
    """Sum over the tokens with label != ignore_index of -log softmax(hidden @ weight.T)[label], in fp32
    (fp64 for fp64 inputs).

    hidden [N, H], weight [V, H] (a plain tensor: vocab-sharded heads use the vocab-parallel loss),
    labels [N]. Chunks of `chunk_bytes` fp32 logits each; differentiable w.r.t. hidden and weight.
    """
    if hasattr(weight, "to_local"):
        raise TypeError("linear_cross_entropy needs the whole lm_head weight; a vocab-sharded head (tensor "
                        "parallel) takes moonlight.parallel.cross_entropy_loss on its logits")
    chunk_rows = max(1, chunk_bytes // (4 * weight.shape[0]))
    return _LinearCrossEntropy.apply(hidden, weight, labels, ignore_index, chunk_rows)
