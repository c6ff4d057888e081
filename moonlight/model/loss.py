"""The token loss of a language model, straight from its final hidden states:

    cross_entropy_from_hidden(hidden [B, S, H], lm_head, labels [B, S]) -> sum of token losses
    linear_cross_entropy(hidden [N, H], weight [V, H], labels [N])       -> the same, from the weight

linear_cross_entropy equals F.cross_entropy((hidden @ weight.T).float(), labels, reduction="sum")
without building the [N, V] logits: it goes chunk by chunk over the tokens, and each chunk's logits
become their softmax and then their gradient in place, which goes straight into the gradients of the
hidden states and of the head. One chunk at a time is live: its fp32 logits (`chunk_bytes`) and their
copy in the hidden states' dtype, or that copy and the head's gradient product. Details:
docs/performance.md.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moonlight.dtypes import at_least_fp32


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, num_chunks, with_grads):
        acc = torch.promote_types(hidden.dtype, torch.float32)
        wants_hidden, wants_weight = (with_grads and needed for needed in ctx.needs_input_grad[:2])
        # the masks once for all chunks; each chunk fills in its tokens' label logit, row maximum and
        # largest probability, and the loss is summed over all tokens at the end
        valid = labels != ignore_index
        ignored = ~valid.unsqueeze(-1)
        safe_labels = torch.where(valid, labels, 0).unsqueeze(-1)
        target, row_max, top_prob = (hidden.new_empty(labels.shape, dtype=acc) for _ in range(3))
        # chunks of equal size (within one row): a last chunk of a few rows would cost a whole pass over
        # the head's weight and its gradient for almost no work
        bounds = [i * hidden.shape[0] // num_chunks for i in range(num_chunks + 1)]
        minus_one = torch.full((-(-hidden.shape[0] // num_chunks), 1), -1.0, dtype=acc, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if wants_hidden else None
        kept_hidden = hidden.masked_fill(ignored, 0.0) if wants_weight else None  # ignored tokens zeroed
        grad_weight = None  # accumulated over the chunks in fp32 (fp64 stays fp64)
        for start, stop in itertools.pairwise(bounds):
            rows = slice(start, stop)
            logits = (hidden[rows] @ weight.t()).to(acc)
            torch.gather(logits, -1, safe_labels[rows], out=target[rows].unsqueeze(-1))
            torch.amax(logits, -1, out=row_max[rows])
            # softmax in place: one exp per logit, no [n, V] allocation. The row's largest probability
            # is 1 / sum(exp(logits - max)) >= 1 / V, so its log gives the log-sum-exp without underflow.
            probs = torch.softmax(logits, -1, out=logits)
            torch.amax(probs, -1, out=top_prob[rows])
            # each chunk lets go of its tensors as soon as it is done with them, so that the next
            # chunk's logits reuse their memory: one chunk at a time is the peak
            if not with_grads:
                del logits, probs
                continue
            # d loss / d logits = softmax - one_hot(label); ignored tokens are zeroed on the H-wide side
            probs.scatter_add_(1, safe_labels[rows], minus_one[: probs.shape[0]])
            grad_logits = probs.to(hidden.dtype)
            del logits, probs  # below fp32 the fp32 softmax goes before the head's gradient product
            if wants_hidden:
                torch.mm(grad_logits, weight, out=grad_hidden[rows])
            if wants_weight:
                chunk_grad = grad_logits.t() @ kept_hidden[rows]
                grad_weight = chunk_grad.to(acc) if grad_weight is None else grad_weight.add_(chunk_grad)
                del chunk_grad
            del grad_logits
        if wants_hidden:
            grad_hidden.masked_fill_(ignored, 0.0)
        ctx.save_for_backward(grad_hidden, grad_weight)  # without with_grads the loss has no backward
        ctx.weight_dtype = weight.dtype
        lse = row_max - top_prob.log_()
        return torch.where(valid, lse - target, 0.0).sum()

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_weight is not None:  # scaled in fp32 and written in the weight's dtype in one pass
            scaled = grad_weight.new_empty(grad_weight.shape, dtype=ctx.weight_dtype)
            grad_weight = torch.mul(grad_weight, grad_total, out=scaled)
        return (grad_hidden * grad_total if grad_hidden is not None else None, grad_weight, None, None, None, None)


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int = -100, chunk_bytes: int = 512 << 20
) -> Tensor:
    """Sum over the tokens with label != ignore_index of -log softmax(hidden @ weight.T)[label], in fp32
    (fp64 for fp64 inputs).

    hidden [N, H], weight [V, H] (a plain tensor: vocab-sharded heads use the vocab-parallel loss),
    labels [N]. As few chunks of equal size as keep each one's fp32 logits within `chunk_bytes`;
    differentiable w.r.t. hidden and weight.
    """
    if hasattr(weight, "to_local"):
        raise TypeError(
            "linear_cross_entropy needs the whole lm_head weight; a vocab-sharded head (tensor "
            "parallel) takes moonlight.parallel.cross_entropy_loss on its logits"
        )
    max_rows = max(1, chunk_bytes // (4 * weight.shape[0]))
    num_chunks = max(1, -(-hidden.shape[0] // max_rows))
    with_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(hidden, weight, labels, ignore_index, num_chunks, with_grads)


def cross_entropy_from_hidden(hidden: Tensor, lm_head: nn.Module, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Sum of the token losses of the logits lm_head(hidden), in fp32 (fp64 for fp64 inputs).

    hidden [..., H] (``model(tokens, return_hidden=True)``), labels [...] (shifted, ignore_index ignored).
    The model's own head (marked `plain_linear`) goes through `linear_cross_entropy` and never builds the
    fp32 logits; any other head (a converter's, e.g. LoRA) makes its logits with its own forward."""
    if getattr(lm_head, "plain_linear", False):
        return linear_cross_entropy(hidden.flatten(0, -2), lm_head.weight, labels.flatten(), ignore_index)
    return F.cross_entropy(
        at_least_fp32(lm_head(hidden).flatten(0, -2)), labels.flatten(), ignore_index=ignore_index, reduction="sum"
    )
