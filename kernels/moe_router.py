"""The sigmoid router's tail: scores, top-k choice and the normalized weights, forward and backward.

route_topk(logits [T, E] fp32, bias [E] fp32, top_k, scale, normalize, n_group, topk_group, impl)
    -> weights [T, K] fp32, expert_ids [T, K] int64, scores [T, E] fp32
scores = sigmoid(logits); expert_ids = top-k of scores + bias (the bias steers the choice only);
weights = scores at the chosen experts, divided by their sum (+ 1e-20) when `normalize`, times scale.
Differentiable w.r.t. logits through the weights and the scores.

impl="torch" is the reference (autograd over the plain ops). impl="triton" runs the forward as one
kernel and the backward as one kernel (the reference's ~9 and ~10 launches per router), BLOCK_T
tokens per program, the top-k as K rounds of a row argmax (ties: the lower expert index), the
choices kept in registers.
"""

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # without Triton only impl="torch" is available
    triton = None

_EPS = 1e-20  # the reference's guard against an all-zero sum


def _route_torch(
    logits: Tensor, bias: Tensor, top_k: int, scale: float, normalize: bool, n_group: int, topk_group: int
) -> tuple[Tensor, Tensor, Tensor]:
    scores = logits.sigmoid()
    biased = scores + bias
    if n_group > 1:  # keep the topk_group groups whose two best biased scores sum highest
        grouped = biased.view(-1, n_group, biased.shape[-1] // n_group)
        best_groups = grouped.topk(2, dim=-1).values.sum(-1).topk(topk_group, dim=-1).indices
        keep = torch.zeros_like(grouped[..., 0], dtype=torch.bool).scatter_(1, best_groups, True)
        biased = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).flatten(1)
    expert_ids = biased.topk(top_k, dim=-1, sorted=False).indices
    weights = scores.gather(1, expert_ids)
    if normalize:
        weights = weights / (weights.sum(-1, keepdim=True) + _EPS)
    return weights * scale, expert_ids, scores


if triton is not None:

    @triton.jit
    def _route_fwd_kernel(
        logits_ptr,
        bias_ptr,
        scores_ptr,
        weights_ptr,
        ids_ptr,
        denom_ptr,
        num_tokens,
        E: tl.constexpr,
        BLOCK_E: tl.constexpr,
        TOP_K: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_T: tl.constexpr,
        SCALE: tl.constexpr,
        NORMALIZE: tl.constexpr,
    ):
        tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        experts = tl.arange(0, BLOCK_E)
        choices = tl.arange(0, BLOCK_K)
        in_tokens = tokens < num_tokens
        mask = in_tokens[:, None] & (experts < E)[None, :]
        offsets = tokens[:, None] * E + experts[None, :]
        scores = tl.sigmoid(tl.load(logits_ptr + offsets, mask=mask, other=0.0))
        tl.store(scores_ptr + offsets, scores, mask=mask)
        biased = scores + tl.load(bias_ptr + experts, mask=experts < E, other=0.0)[None, :]
        biased = tl.where(mask, biased, float("-inf"))
        picks = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
        ids = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int64)
        for k in tl.static_range(TOP_K):  # K rounds of a row argmax, each choice then masked out
            best = tl.argmax(biased, axis=1)
            picked = experts[None, :] == best[:, None]
            is_k = choices[None, :] == k
            picks = tl.where(is_k, tl.sum(tl.where(picked, scores, 0.0), axis=1)[:, None], picks)
            ids = tl.where(is_k, best.to(tl.int64)[:, None], ids)
            biased = tl.where(picked, float("-inf"), biased)
        denom = tl.sum(picks, axis=1) + 1e-20
        tl.store(denom_ptr + tokens, denom, mask=in_tokens)
        if NORMALIZE:
            picks = picks / denom[:, None]
        out_mask = in_tokens[:, None] & (choices < TOP_K)[None, :]
        out_offsets = tokens[:, None] * TOP_K + choices[None, :]
        tl.store(weights_ptr + out_offsets, picks * SCALE, mask=out_mask)
        tl.store(ids_ptr + out_offsets, ids, mask=out_mask)

    @triton.jit
    def _route_bwd_kernel(
        grad_weights_ptr,
        grad_scores_ptr,
        scores_ptr,
        weights_ptr,
        ids_ptr,
        denom_ptr,
        grad_logits_ptr,
        num_tokens,
        E: tl.constexpr,
        BLOCK_E: tl.constexpr,
        TOP_K: tl.constexpr,
        BLOCK_T: tl.constexpr,
        SCALE: tl.constexpr,
        NORMALIZE: tl.constexpr,
        HAS_GRAD_SCORES: tl.constexpr,
    ):
        tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        experts = tl.arange(0, BLOCK_E)
        in_tokens = tokens < num_tokens
        mask = in_tokens[:, None] & (experts < E)[None, :]
        offsets = tokens[:, None] * E + experts[None, :]
        scores = tl.load(scores_ptr + offsets, mask=mask, other=0.0)
        grad = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
        if HAS_GRAD_SCORES:
            grad = tl.load(grad_scores_ptr + offsets, mask=mask, other=0.0)
        # weights w_k = SCALE * p_k / d, d = sum_j p_j + eps: dL/dp_k = (SCALE * g_k - sum_j g_j w_j) / d
        dot = tl.zeros([BLOCK_T], dtype=tl.float32)
        if NORMALIZE:
            for k in tl.static_range(TOP_K):
                g = tl.load(grad_weights_ptr + tokens * TOP_K + k, mask=in_tokens, other=0.0)
                dot += g * tl.load(weights_ptr + tokens * TOP_K + k, mask=in_tokens, other=0.0)
        denom = tl.load(denom_ptr + tokens, mask=in_tokens, other=1.0)
        for k in tl.static_range(TOP_K):
            g = tl.load(grad_weights_ptr + tokens * TOP_K + k, mask=in_tokens, other=0.0)
            best = tl.load(ids_ptr + tokens * TOP_K + k, mask=in_tokens, other=-1)
            grad_picked = g * SCALE
            if NORMALIZE:
                grad_picked = (grad_picked - dot) / denom
            grad += tl.where(experts[None, :] == best[:, None], grad_picked[:, None], 0.0)
        tl.store(grad_logits_ptr + offsets, grad * scores * (1.0 - scores), mask=mask)


def _launch(num_tokens: int, num_experts: int) -> tuple[tuple[int], dict]:
    """BLOCK_T tokens per program: 1024 scores, 8 per thread of 4 warps (larger tiles unroll the K
    argmax rounds into a kernel ptxas takes minutes over)."""
    block_e = triton.next_power_of_2(num_experts)
    block_t = max(1, min(16, 1024 // block_e))
    return (triton.cdiv(num_tokens, block_t),), dict(E=num_experts, BLOCK_E=block_e, BLOCK_T=block_t, num_warps=4)


@torch.library.custom_op("moonlight::route_topk", mutates_args=())
def _route_op(
    logits: Tensor, bias: Tensor, top_k: int, scale: float, normalize: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    logits = logits.contiguous()
    num_tokens, num_experts = logits.shape
    scores = torch.empty_like(logits)
    weights = logits.new_empty(num_tokens, top_k)
    ids = torch.empty(num_tokens, top_k, dtype=torch.long, device=logits.device)
    denom = logits.new_empty(num_tokens)
    if num_tokens:
        grid, shape = _launch(num_tokens, num_experts)
        _route_fwd_kernel[grid](
            logits,
            bias.contiguous(),
            scores,
            weights,
            ids,
            denom,
            num_tokens,
            TOP_K=top_k,
            BLOCK_K=triton.next_power_of_2(top_k),
            SCALE=scale,
            NORMALIZE=normalize,
            **shape,
        )
    return weights, ids, scores, denom


@_route_op.register_fake
def _(logits, bias, top_k, scale, normalize):
    num_tokens = logits.shape[0]
    return (
        logits.new_empty(num_tokens, top_k),
        logits.new_empty(num_tokens, top_k, dtype=torch.long),
        torch.empty_like(logits),
        logits.new_empty(num_tokens),
    )


@torch.library.custom_op("moonlight::route_topk_backward", mutates_args=())
def _route_backward_op(
    grad_weights: Tensor,
    grad_scores: Tensor | None,
    scores: Tensor,
    weights: Tensor,
    ids: Tensor,
    denom: Tensor,
    scale: float,
    normalize: bool,
) -> Tensor:
    num_tokens, num_experts = scores.shape
    grad_logits = torch.empty_like(scores)
    if num_tokens:
        grid, shape = _launch(num_tokens, num_experts)
        _route_bwd_kernel[grid](
            grad_weights.contiguous(),
            grad_scores.contiguous() if grad_scores is not None else scores,
            scores,
            weights,
            ids,
            denom,
            grad_logits,
            num_tokens,
            TOP_K=ids.shape[1],
            SCALE=scale,
            NORMALIZE=normalize,
            HAS_GRAD_SCORES=grad_scores is not None,
            **shape,
        )
    return grad_logits


@_route_backward_op.register_fake
def _(grad_weights, grad_scores, scores, weights, ids, denom, scale, normalize):
    return torch.empty_like(scores)


def _route_setup_context(ctx, inputs, output):
    _, _, _, ctx.scale, ctx.normalize = inputs
    weights, ids, scores, denom = output
    ctx.save_for_backward(scores, weights, ids, denom)
    ctx.mark_non_differentiable(ids, denom)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the outputs nothing differentiated


def _route_backward(ctx, grad_weights, grad_ids, grad_scores, grad_denom):
    scores, weights, ids, denom = ctx.saved_tensors
    if grad_weights is None:
        grad_weights = torch.zeros_like(weights)
    grad = torch.ops.moonlight.route_topk_backward(
        grad_weights, grad_scores, scores, weights, ids, denom, ctx.scale, ctx.normalize
    )
    return grad, None, None, None, None


_route_op.register_autograd(_route_backward, setup_context=_route_setup_context)


def route_topk(
    logits: Tensor,
    bias: Tensor,
    top_k: int,
    scale: float = 1.0,
    normalize: bool = True,
    n_group: int = 1,
    topk_group: int = 1,
    impl: str = "torch",
) -> tuple[Tensor, Tensor, Tensor]:
    """See the module docstring. logits [T, E] fp32, bias [E] fp32. With n_group > 1 (group-limited
    routing, the reference only) the choice is among the topk_group groups whose two best biased
    scores sum highest."""
    if impl == "torch":
        return _route_torch(logits, bias, top_k, scale, normalize, n_group, topk_group)
    if impl == "triton":
        if n_group > 1:
            raise ValueError("the Triton router has no group-limited routing (n_group > 1): use impl='torch'")
        weights, ids, scores, _ = torch.ops.moonlight.route_topk(logits, bias, top_k, float(scale), normalize)
        return weights, ids, scores
    raise ValueError(f"impl must be 'torch' or 'triton', got {impl!r}")
