"""kernels/: torch references against naive loop definitions (float64), Triton kernels against the
references (fp32 tight, bf16 to 1 ulp: the interpreter truncates on bf16 stores), and tracing
under torch.compile. Row counts stay small: the Triton interpreter costs ~2 ms per program."""

import pytest
import torch

from moonlight.kernels.backend import resolve_impl
from moonlight.kernels.grouped_mm import grouped_mm
from moonlight.kernels.mla_rope import mla_rope_key, rope_tables, rotate_rope_
from moonlight.kernels.moe_permute import permute_tokens, unpermute_tokens
from moonlight.kernels.moe_router import route_topk
from moonlight.kernels.rms_norm import rms_norm

pytestmark = pytest.mark.floor  # also run on torch 2.11 (.ci/run)

BF16_ULP = 2**-7
# On a GPU machine conftest leaves the interpreter off and Triton compiles for the GPU, which takes
# CUDA tensors only: the Triton side of each test runs there, the references stay on the CPU.
TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NUM_EXPERTS = 8
USED_EXPERTS = [0, 1, 3, 4, 6]  # experts 2, 5 and 7 receive no token


def _expert_ids(num_tokens: int, top_k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    used = torch.tensor(USED_EXPERTS)
    return torch.stack([used[torch.randperm(len(used), generator=g)[:top_k]] for _ in range(num_tokens)])


def _on(impl, *tensors):
    """The tensors where `impl` runs (differentiable copies: gradients reach the CPU leaves)."""
    device = TRITON_DEVICE if impl == "triton" else torch.device("cpu")
    return [t.to(device) for t in tensors]


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    if dtype == torch.bfloat16:
        torch.testing.assert_close(actual.float(), expected.float(), rtol=BF16_ULP, atol=1e-5)
    else:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- naive definitions


def _naive_permute(x, expert_ids, num_experts, align):
    num_tokens, top_k = expert_ids.shape
    rows, group_sizes, row_index = [], [], [0] * (num_tokens * top_k)
    for e in range(num_experts):
        group = [(t, k) for t in range(num_tokens) for k in range(top_k) if expert_ids[t, k] == e]
        for t, k in group:
            row_index[t * top_k + k] = len(rows)
            rows.append(x[t])
        padding = -len(group) % align
        rows += [torch.zeros_like(x[0])] * padding
        group_sizes.append(len(group) + padding)
    if align > 1:  # the static row count: T*K + E*(align-1) rounded to align, spare rows in the last group
        spare = -(-(num_tokens * top_k + num_experts * (align - 1)) // align) * align - len(rows)
        rows += [torch.zeros_like(x[0])] * spare
        group_sizes[-1] += spare
    return torch.stack(rows), torch.tensor(group_sizes), torch.tensor(row_index)


def _naive_unpermute(y, row_index, weights):
    num_tokens, top_k = weights.shape
    out = torch.zeros(num_tokens, y.shape[1], dtype=torch.float64)
    for t in range(num_tokens):
        for k in range(top_k):
            out[t] += weights[t, k].double() * y[row_index[t * top_k + k]].double()
    return out


def _naive_rotate(x, cos, sin):
    """x [..., S, R] with cos/sin [S, R/2]: rotate each pair (2i, 2i+1) by angle i of its position."""
    out = x.clone()
    for s in range(x.shape[-2]):
        for i in range(x.shape[-1] // 2):
            x0, x1 = x[..., s, 2 * i], x[..., s, 2 * i + 1]
            out[..., s, 2 * i] = x0 * cos[s, i] - x1 * sin[s, i]
            out[..., s, 2 * i + 1] = x1 * cos[s, i] + x0 * sin[s, i]
    return out


# ---------------------------------------------------------------- references vs naive (float64)


@pytest.mark.parametrize("align", [1, 8])
@pytest.mark.parametrize("top_k", [1, 3])
def test_permute_reference_matches_naive(top_k, align):
    x = torch.randn(10, 5, dtype=torch.float64, requires_grad=True)
    expert_ids = _expert_ids(10, top_k)
    permuted, group_sizes, row_index = permute_tokens(x, expert_ids, NUM_EXPERTS, align)
    want_permuted, want_sizes, want_index = _naive_permute(x.detach(), expert_ids, NUM_EXPERTS, align)
    torch.testing.assert_close(permuted, want_permuted, rtol=0, atol=0)
    assert group_sizes.dtype == row_index.dtype == torch.int64
    assert group_sizes.tolist() == want_sizes.tolist()
    assert group_sizes[[2, 5]].tolist() == [0, 0] and group_sizes.sum() == permuted.shape[0]
    assert row_index.tolist() == want_index.tolist()
    torch.autograd.gradcheck(lambda x: permute_tokens(x, expert_ids, NUM_EXPERTS, align)[0], (x,))


@pytest.mark.parametrize("align", [1, 8])
@pytest.mark.parametrize("top_k", [1, 3])
def test_unpermute_reference_matches_naive(top_k, align):
    x = torch.randn(10, 5, dtype=torch.float64)
    _, _, row_index = permute_tokens(x, _expert_ids(10, top_k), NUM_EXPERTS, align)
    num_rows = permute_tokens(x, _expert_ids(10, top_k), NUM_EXPERTS, align)[0].shape[0]
    y = torch.randn(num_rows, 5, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(10, top_k, dtype=torch.float64, requires_grad=True)
    out = unpermute_tokens(y, row_index, weights)
    torch.testing.assert_close(out, _naive_unpermute(y.detach(), row_index, weights.detach()))
    torch.autograd.gradcheck(lambda y, w: unpermute_tokens(y, row_index, w), (y, weights))
    (grad_y,) = torch.autograd.grad(out.sum(), y)
    unused = torch.ones(num_rows, dtype=torch.bool)
    unused[row_index] = False
    assert unused.any() == (align > 1) and grad_y[unused].eq(0).all()


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_unpermute_accumulates_in_fp32(impl):
    # 1 + eight times 2**-8 is exact in bf16, but a bf16 running sum rounds each 1 + 2**-8 back to 1
    y = torch.full((9, 4), 2**-8, dtype=torch.bfloat16)
    y[0] = 1.0
    out = unpermute_tokens(*_on(impl, y, torch.arange(9), torch.ones(1, 9)), impl=impl).cpu()
    assert out.dtype == torch.bfloat16 and out[0].eq(1.0 + 8 * 2**-8).all()


def test_rope_tables():
    cos, sin = rope_tables(7, 6, 50000.0)
    angles = torch.arange(7.0, dtype=torch.float64)[:, None] * 50000.0 ** (-torch.arange(0, 6, 2) / 6)
    assert cos.shape == sin.shape == (7, 3) and cos.dtype == sin.dtype == torch.float32
    torch.testing.assert_close(cos, angles.cos().float())
    torch.testing.assert_close(sin, angles.sin().float())


def _rope_inputs(batch, seq, heads, nope, rope, dtype, per_token, seed=0):
    """q, k_nope and k_pe as strided views into projection outputs, as the model produces them, and
    the tables: shared [S, R/2], or per token [B, S, R/2] (packed documents restart positions)."""
    g = torch.Generator().manual_seed(seed)
    q_proj = torch.randn(batch, seq, heads * (nope + rope), generator=g).to(dtype)
    kv_a = torch.randn(batch, seq, 3 + rope, generator=g).to(dtype)
    kv_b = torch.randn(batch, seq, heads * (nope + 5), generator=g).to(dtype)
    cos, sin = rope_tables(seq + 2, rope, 10.0 if dtype == torch.float64 else 50000.0)
    if per_token:
        positions = torch.randint(0, seq + 2, (batch, seq), generator=g)
        cos, sin = cos[positions], sin[positions]
    else:
        cos, sin = cos[:seq], sin[:seq]
    if dtype == torch.float64:
        cos, sin = cos.double(), sin.double()
    return q_proj, kv_a, kv_b, cos, sin


def _mla_rope(q_proj, kv_a, kv_b, heads, nope, rope, cos, sin, impl="torch", grad_in_place=False):
    """The model's RoPE: q_proj [B, S, heads * (nope + rope)] rotated in place, and the key."""
    k_nope = kv_b.unflatten(-1, (heads, nope + 5))[..., :nope]
    q = rotate_rope_(q_proj, cos, sin, nope + rope, impl=impl, grad_in_place=grad_in_place)
    assert q is q_proj
    return q.unflatten(-1, (heads, nope + rope)), mla_rope_key(k_nope, kv_a[..., -rope:], cos, sin, impl=impl)


@pytest.mark.parametrize("per_token", [False, True])
def test_rope_reference_matches_naive(per_token):
    batch, seq, heads, nope, rope = 2, 5, 3, 4, 6
    q_proj, kv_a, kv_b, cos, sin = _rope_inputs(batch, seq, heads, nope, rope, torch.float64, per_token)
    q_out, k_out = _mla_rope(q_proj.clone(), kv_a, kv_b, heads, nope, rope, cos, sin)

    def naive(x):  # the naive loop rotates [..., S, R] by table rows [S, R/2]: one batch row at a time
        tables = (cos, sin) if per_token else (cos.expand(batch, -1, -1), sin.expand(batch, -1, -1))
        return torch.stack([_naive_rotate(x[b], tables[0][b], tables[1][b]) for b in range(batch)])

    q = q_proj.unflatten(-1, (heads, nope + rope))
    q_rot = naive(q[..., nope:].transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(q_out, torch.cat((q[..., :nope], q_rot), dim=-1))
    k_pe = kv_a[..., -rope:]
    k_rot = naive(k_pe.unsqueeze(1)).squeeze(1)
    k_nope = kv_b.unflatten(-1, (heads, nope + 5))[..., :nope]
    torch.testing.assert_close(k_out, torch.cat((k_nope, k_rot.unsqueeze(2).expand(-1, -1, heads, -1)), dim=-1))
    # the same thing as complex multiplication of consecutive pairs by e^(i*theta)
    k_complex = torch.view_as_complex(k_pe.unflatten(-1, (-1, 2)).contiguous()) * torch.complex(cos, sin)
    torch.testing.assert_close(k_rot, torch.view_as_real(k_complex).flatten(-2))
    # q is rotated in place: a fresh (non-leaf) copy each call
    torch.autograd.gradcheck(
        lambda q_proj, kv_a, kv_b: _mla_rope(q_proj * 1, kv_a, kv_b, heads, nope, rope, cos, sin),
        tuple(t.requires_grad_() for t in (q_proj, kv_a, kv_b)),
    )


@pytest.mark.parametrize("grad_in_place", [False, True])
def test_rope_backward_rotates_the_gradient_in_place_only_when_allowed(grad_in_place):
    q_proj, kv_a, kv_b, cos, sin = _rope_inputs(2, 5, 3, 4, 6, torch.float32, False)
    for grad_q, overwritten in (
        (torch.randn(2, 5, 30), grad_in_place),  # a broadcast one never is
        (torch.ones(1, 1, 1).expand(2, 5, 30), False),
    ):
        given = grad_q.clone()
        base = q_proj.clone().requires_grad_()
        q = rotate_rope_(base * 1, cos, sin, 10, grad_in_place=grad_in_place)
        q.backward(grad_q)
        given_heads = given.unflatten(-1, (3, 10))
        want = torch.cat(
            (given_heads[..., :4], _naive_rotate(given_heads[..., 4:].transpose(1, 2), cos, -sin).transpose(1, 2)), -1
        )
        torch.testing.assert_close(base.grad, want.flatten(2))
        assert torch.equal(grad_q, given) != overwritten


def test_rope_rotates_a_view_that_requires_grad_into_a_copy():
    """Autograd copies the gradient of an in-place view (and refuses views made by custom Functions,
    as tensor parallel's local outputs are): such a q is rotated out of place, with equal results."""
    q_proj, _, _, cos, sin = _rope_inputs(2, 5, 3, 4, 6, torch.float32, False)
    base = q_proj.clone().requires_grad_()
    view = (base * 1).view(2, 5, 30)
    before = view.clone()
    rotated = rotate_rope_(view, cos, sin, 10)
    assert rotated is not view and torch.equal(view, before)
    in_place = rotate_rope_(q_proj.clone(), cos, sin, 10)
    torch.testing.assert_close(rotated, in_place)


# ---------------------------------------------------------------- Triton vs reference


def _moe_forward_backward(impl, x, expert_ids, align, weights, y, grad_permuted, grad_out):
    """Both ops with their grads. y and grad_permuted are [upper bound, H], cut to N rows; the same
    inputs go to both impls (chaining one op's bf16 result into the other would compound roundings).
    y's padded rows are non-zero, so a kernel reading them into grad_weights would be caught."""
    x = x.detach().requires_grad_()
    x_in, expert_ids, grad_permuted, grad_out = _on(impl, x, expert_ids, grad_permuted, grad_out)
    permuted, group_sizes, row_index = permute_tokens(x_in, expert_ids, NUM_EXPERTS, align, impl=impl)
    (grad_x,) = torch.autograd.grad(permuted, x, grad_permuted[: permuted.shape[0]])
    y = y[: permuted.shape[0]].detach().requires_grad_()
    weights = weights.detach().requires_grad_()
    out = unpermute_tokens(*_on(impl, y, row_index, weights), impl=impl)
    grad_y, grad_weights = torch.autograd.grad(out, (y, weights), grad_out)
    results = dict(
        permuted=permuted,
        group_sizes=group_sizes,
        row_index=row_index,
        grad_x=grad_x,
        out=out,
        grad_y=grad_y,
        grad_weights=grad_weights,
    )
    return {name: t.cpu() for name, t in results.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [24, 96])
@pytest.mark.parametrize("align", [1, 8])
@pytest.mark.parametrize("top_k", [1, 3])
def test_moe_permute_triton_matches_torch(top_k, align, hidden, dtype):
    num_tokens = 12
    max_rows = num_tokens * top_k + 8 * NUM_EXPERTS  # the static bound with align 8, rounded up
    g = torch.Generator().manual_seed(hidden + top_k)
    x = torch.randn(num_tokens, hidden, generator=g).to(dtype)
    weights = torch.rand(num_tokens, top_k, generator=g)  # fp32 routing weights, also with bf16 rows
    y, grad_permuted = torch.randn(2, max_rows, hidden, generator=g).to(dtype)
    grad_out = torch.randn(num_tokens, hidden, generator=g).to(dtype)
    args = (_expert_ids(num_tokens, top_k), align, weights, y, grad_permuted, grad_out)
    want = _moe_forward_backward("torch", x, *args)
    got = _moe_forward_backward("triton", x, *args)

    assert torch.equal(got["group_sizes"], want["group_sizes"]) and torch.equal(got["row_index"], want["row_index"])
    assert torch.equal(got["permuted"], want["permuted"])  # pure data movement, padding zeroed
    assert got["out"].dtype == dtype and got["grad_weights"].dtype == torch.float32
    for name in ("grad_x", "out", "grad_y"):
        _assert_close(got[name], want[name], dtype)
    # an fp32 dot over H in another summation order
    torch.testing.assert_close(got["grad_weights"], want["grad_weights"], rtol=1e-5, atol=1e-4)


def test_unpermute_triton_with_bf16_weights():
    g = torch.Generator().manual_seed(1)
    y = torch.randn(16, 24, generator=g).bfloat16()
    weights = torch.rand(8, 2, generator=g).bfloat16()
    grad_out = torch.randn(8, 24, generator=g).bfloat16()
    _, _, row_index = permute_tokens(y[:8], _expert_ids(8, 2), NUM_EXPERTS)
    results = {}
    for impl in ("torch", "triton"):
        y_in, w_in = y.clone().requires_grad_(), weights.clone().requires_grad_()
        out = unpermute_tokens(*_on(impl, y_in, row_index, w_in), impl=impl)
        results[impl] = (out.cpu(), *torch.autograd.grad(out, (y_in, w_in), *_on(impl, grad_out)))
    for got, want in zip(results["triton"], results["torch"]):
        assert got.dtype == torch.bfloat16
        _assert_close(got, want, torch.bfloat16)


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,nope,rope", [(3, 10, 6), (2, 0, 8), (2, 16, 8)])
def test_mla_rope_triton_matches_torch(heads, nope, rope, dtype, per_token):
    batch, seq = 2, 5
    inputs = _rope_inputs(batch, seq, heads, nope, rope, dtype, per_token, seed=nope + rope)
    cos, sin = inputs[3:]
    g = torch.Generator().manual_seed(1)
    grad_q = torch.randn(batch, seq, heads, nope + rope, generator=g).to(dtype)
    # the key's gradient as attention hands it over: a transposed [B, H, S, D] buffer
    grad_k = torch.randn(batch, heads, seq, nope + rope, generator=g).to(dtype).transpose(1, 2)
    results = {}
    for impl in ("torch", "triton"):
        leaves = [t.detach().clone().requires_grad_() for t in inputs[:3]]
        q_proj, kv_a, kv_b, cos_in, sin_in = _on(impl, *leaves, cos, sin)
        q, k = _mla_rope(q_proj * 1, kv_a, kv_b, heads, nope, rope, cos_in, sin_in, impl=impl, grad_in_place=True)
        # grad_q.clone(): the backward rotates it in place
        results[impl] = (q.cpu(), k.cpu(), *torch.autograd.grad((q, k), leaves, _on(impl, grad_q.clone(), grad_k)))
    for got, want in zip(results["triton"], results["torch"]):
        assert got.shape == want.shape and got.dtype == want.dtype
        _assert_close(got, want, dtype)
    q, k = results["triton"][:2]
    assert torch.equal(q[..., :nope], inputs[0].unflatten(-1, (heads, nope + rope))[..., :nope])
    assert torch.equal(k[..., :nope], inputs[2].unflatten(-1, (heads, nope + 5))[..., :nope])
    assert torch.equal(k[..., nope:], k[:, :, :1, nope:].expand_as(k[..., nope:]))  # one rope key, every head


@pytest.mark.parametrize("compiled", [False, True])
def test_grouped_mm_matches_per_group_matmuls(compiled):
    """fp32 on CPU (whose stock fake kernel is bf16-only), an empty group, gradients of x and w."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 8, generator=g, requires_grad=True)
    w = torch.randn(3, 4, 8, generator=g).transpose(-2, -1).requires_grad_()  # [E, K, M] as a view
    sizes = [4, 0, 5]
    offs = torch.tensor(sizes).cumsum(0).to(torch.int32)
    grad_out = torch.randn(9, 4, generator=g)
    fn = torch.compile(grouped_mm, backend="aot_eager", fullgraph=True) if compiled else grouped_mm
    out = fn(x, w, offs)
    got = (out, *torch.autograd.grad(out, (x, w), grad_out))
    want_out = torch.cat([rows @ w[e] for e, rows in enumerate(x.split(sizes))])
    want = (want_out, *torch.autograd.grad(want_out, (x, w), grad_out))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert got[2][1].eq(0).all()


# ---------------------------------------------------------------- torch.compile and impl selection


def test_ops_trace_under_torch_compile():
    num_tokens, hidden, top_k = 6, 16, 2
    expert_ids, cos, sin = _on("triton", _expert_ids(num_tokens, top_k), *rope_tables(3, 4, 50000.0))

    def step(x, weights, q, k_nope, k_pe):
        permuted, _, row_index = permute_tokens(x, expert_ids, NUM_EXPERTS, impl="triton")
        out = unpermute_tokens(permuted * 2, row_index, weights, impl="triton")
        q_out = rotate_rope_(q * 1, cos, sin, 6, impl="triton", grad_in_place=True)
        k = mla_rope_key(k_nope, k_pe, cos, sin, impl="triton")
        return out.sum() + q_out.square().sum() + k.square().sum()

    inputs = (
        torch.randn(num_tokens, hidden),
        torch.rand(num_tokens, top_k),
        torch.randn(2, 3, 12),
        torch.randn(2, 3, 2, 2),
        torch.randn(2, 3, 4),
    )
    grads = {}
    for name, fn in (("eager", step), ("compiled", torch.compile(step, backend="aot_eager", fullgraph=True))):
        leaves = [t.clone().requires_grad_() for t in inputs]
        loss = fn(*_on("triton", *leaves))
        grads[name] = (loss, *torch.autograd.grad(loss, leaves))
    for got, want in zip(grads["compiled"], grads["eager"]):
        torch.testing.assert_close(got, want)


def test_padded_permute_compiles_without_sync():
    x = torch.randn(6, 16, device=TRITON_DEVICE, requires_grad=True)
    expert_ids = _expert_ids(6, 2).to(TRITON_DEVICE)
    compiled = torch.compile(
        lambda x: permute_tokens(x, expert_ids, NUM_EXPERTS, align=8, impl="triton")[0],
        backend="aot_eager",
        fullgraph=True,
    )
    permuted = compiled(x)
    torch.testing.assert_close(permuted, permute_tokens(x, expert_ids, NUM_EXPERTS, align=8)[0])
    permuted.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))


def test_resolve_impl():
    assert resolve_impl("auto", torch.device("cpu")) == "torch"
    assert resolve_impl("auto", "cuda") == "triton"
    assert resolve_impl("torch", "cuda") == "torch"
    assert resolve_impl("triton", "cpu") == "triton"
    with pytest.raises(ValueError, match="kernels must be"):
        resolve_impl("cuda", "cpu")


def test_resolve_impl_does_not_look_for_triton_per_call(monkeypatch):
    """The model resolves its impl in every layer's forward: where triton is missing, a failed import
    per call would search sys.path each time."""
    import builtins

    real_import, tried = builtins.__import__, []

    def spy(name, *args, **kwargs):
        if name.split(".")[0] == "triton":
            tried.append(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", spy)
    for kernels in ("auto", "torch", "triton"):
        resolve_impl(kernels, "cpu")
    assert tried == []


def test_unknown_impl_is_rejected():
    with pytest.raises(ValueError, match="impl must be"):
        unpermute_tokens(torch.zeros(2, 4), torch.arange(2), torch.ones(2, 1), impl="cuda")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_no_tokens_at_all(impl):
    """A rank can hold no tokens (expert parallel): empty in, empty out, empty gradients."""
    x = torch.zeros(0, 24, requires_grad=True)
    weights = torch.zeros(0, 2, requires_grad=True)
    x_in, expert_ids, weights_in = _on(impl, x, torch.zeros(0, 2, dtype=torch.long), weights)
    rows, counts, row_index = permute_tokens(x_in, expert_ids, 4, impl=impl)
    out = unpermute_tokens(rows * 2, row_index, weights_in, impl=impl)
    out.sum().backward()
    assert rows.shape == (0, 24) and out.shape == (0, 24) and counts.tolist() == [0, 0, 0, 0]
    assert x.grad.shape == (0, 24) and weights.grad.shape == (0, 2)


# ---------------------------------------------------------------- the router's tail


def _routing_inputs(num_tokens, num_experts, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=g, dtype=torch.float64) * 2
    bias = torch.randn(num_experts, generator=g, dtype=torch.float64) * 0.1
    return logits, bias, torch.randn(num_tokens, 3, generator=g, dtype=torch.float64)


def _naive_route(logits, bias, top_k, scale, normalize):
    """Per token in float64: the top-k of sigmoid + bias, weights from the unbiased scores."""
    scores = 1 / (1 + torch.exp(-logits))
    weights, ids = [], []
    for t in range(logits.shape[0]):
        chosen = sorted(range(logits.shape[1]), key=lambda e: -(scores[t, e] + bias[e]).item())[:top_k]
        picked = scores[t, chosen]
        weights.append(picked / (picked.sum() + 1e-20) * scale if normalize else picked * scale)
        ids.append(chosen)
    return torch.stack(weights), torch.tensor(ids), scores


@pytest.mark.parametrize("normalize", [True, False])
def test_route_reference_matches_naive(normalize):
    logits, bias, _ = _routing_inputs(9, 12, 0)
    logits.requires_grad_()
    weights, ids, scores = route_topk(logits, bias, 3, 2.5, normalize)
    want_weights, want_ids, want_scores = _naive_route(logits.detach(), bias, 3, 2.5, normalize)
    order = ids.argsort(-1)  # top-k order is unspecified
    assert torch.equal(ids.gather(1, order), want_ids.sort(-1).values)
    torch.testing.assert_close(weights.gather(1, order), want_weights.gather(1, want_ids.argsort(-1)))
    torch.testing.assert_close(scores, want_scores)
    torch.autograd.gradcheck(
        lambda x: [t for t in route_topk(x, bias, 3, 2.5, normalize) if t.is_floating_point()], (logits,)
    )


@pytest.mark.parametrize("with_score_grad", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(9, 12, 3), (70, 64, 6)])
def test_route_triton_matches_torch(num_tokens, num_experts, top_k, normalize, with_score_grad):
    logits, bias, _ = _routing_inputs(num_tokens, num_experts, num_tokens)
    logits, bias = logits.float(), bias.float()
    g = torch.Generator().manual_seed(1)
    # one gradient per (token, expert): each impl's weights take theirs in its own (unspecified) k order
    grad_per_expert, grad_scores = torch.randn(2, num_tokens, num_experts, generator=g)
    results = {}
    for impl in ("torch", "triton"):
        leaf = logits.clone().requires_grad_()
        x, b, ge, gs = _on(impl, leaf, bias, grad_per_expert, grad_scores)
        weights, ids, scores = route_topk(x, b, top_k, 2.446, normalize, impl=impl)
        outs, grads = (weights, scores), (ge.gather(1, ids), gs)
        if not with_score_grad:
            outs, grads = outs[:1], grads[:1]
        order = ids.argsort(-1)  # compare the choices of each token in expert order
        (grad,) = torch.autograd.grad(outs, leaf, grads)
        results[impl] = [t.cpu() for t in (ids.gather(1, order), weights.gather(1, order), scores, grad)]
    (want_ids, *want), (got_ids, *got) = results["torch"], results["triton"]
    assert torch.equal(got_ids, want_ids) and got_ids.dtype == torch.int64
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_route_triton_traces_under_torch_compile():
    logits, bias, _ = _routing_inputs(8, 16, 3)
    logits, bias = _on("triton", logits.float(), bias.float())

    def fn(x):
        weights, ids, scores = route_topk(x, bias, 2, 2.0, True, impl="triton")
        return weights.square().sum() + scores.sum()

    grads = []
    for f in (fn, torch.compile(fn, backend="aot_eager", fullgraph=True)):
        leaf = logits.detach().requires_grad_()
        grads.append(torch.autograd.grad(f(leaf), leaf)[0])
    torch.testing.assert_close(grads[1], grads[0])


# ---------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("weight_dtype", [None, torch.float32])  # None: the input's dtype
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_triton_matches_torch(dtype, weight_dtype):
    """A strided input (the latent split off kv_a_proj's output, as kv_norm takes it), both gradients."""
    g = torch.Generator().manual_seed(0)
    packed = (torch.randn(2, 5, 40 + 8, generator=g) * 3).to(dtype)
    weight = (torch.rand(40, generator=g) + 0.5).to(weight_dtype or dtype)
    grad = torch.randn(2, 5, 40, generator=g)
    results = {}
    for impl in ("torch", "triton"):
        leaves = [packed.clone().requires_grad_(), weight.clone().requires_grad_()]
        p, w = _on(impl, *leaves)
        out = rms_norm(p[..., :40], w, 1e-6, impl=impl)
        results[impl] = [out.cpu(), *torch.autograd.grad(out, leaves, grad.to(out.dtype).to(out.device))]
    assert results["triton"][0].dtype == torch.promote_types(dtype, weight.dtype)
    (out, *grads), (want_out, *want_grads) = results["triton"], results["torch"]
    if dtype == torch.float32:
        for got, want in zip(results["triton"], results["torch"]):
            _assert_close(got, want, dtype)
        return
    # bf16: intermediates are rounded to bf16 as in the reference, and the interpreter truncates where a
    # GPU rounds: 2 ulps on the output; grad x cancels (g - x * mean(g x)), so its bound is on the scale
    torch.testing.assert_close(out.float(), want_out.float(), rtol=2 * BF16_ULP, atol=1e-5)
    for got, want in zip(grads, want_grads):
        assert (got.float() - want.float()).abs().max() <= 4 * BF16_ULP * want.float().abs().max()


def test_rms_norm_triton_traces_under_torch_compile():
    x, weight = _on("triton", torch.randn(3, 16), torch.rand(16) + 0.5)
    grads = []
    for fn in (rms_norm, torch.compile(rms_norm, backend="aot_eager", fullgraph=True)):
        leaves = [x.detach().requires_grad_(), weight.detach().requires_grad_()]
        grads.append(torch.autograd.grad(fn(*leaves, 1e-6, impl="triton").square().sum(), leaves))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)
