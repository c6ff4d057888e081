"""Tests for moonlight.train.optim in one process: Muon (against torch's and reference ones, per
expert, batched), param grouping, AdamW, precision-aware mode, OPTIM_LR schedules, router bias
balancing, clipping."""

import inspect
import math

import pytest
import torch
import torch.nn as nn

import moonlight.train.muon as muon_module
from moonlight.train.balance import expert_load_imbalance, update_router_biases
from moonlight.train.optim import (
    AdamW,
    Muon,
    OptimizerSection,
    build_optimizers,
    clip_grad_norm_,
    zeropower_via_newtonschulz,
)
from moonlight.train.schedule import LRSchedulerSection, lr_multiplier
from tests.helpers import OPTIM_LR, OPTIM_WD, run_muon


# ------------------------------------------------------------------------------------------
# A naive reference, written independently of the implementation (Moonshot's example code)
# ------------------------------------------------------------------------------------------


def ref_ns(G, steps=5, dtype=torch.float32):
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.to(dtype)
    if G.size(0) > G.size(1):
        X = X.T
    X = X / (X.norm() + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * A @ A
        X = a * X + B @ X
    if G.size(0) > G.size(1):
        X = X.T
    return X


def ref_muon_run(W0, grads, lr=OPTIM_LR, wd=OPTIM_WD, mu=0.95, dtype=torch.float32):
    """Full-matrix Muon over a list of grads; returns the final weight."""
    W = W0.clone()
    buf = torch.zeros_like(W)
    for g in grads:
        buf = mu * buf + g
        u = g + mu * buf
        O = ref_ns(u, dtype=dtype).to(W.dtype)
        A, B = W.shape
        W = W * (1 - lr * wd) - lr * 0.2 * math.sqrt(max(A, B)) * O
    return W


# ------------------------------------------------------------------------------------------
# Single device
# ------------------------------------------------------------------------------------------


def test_matches_torch_muon():
    sig = inspect.signature(torch.optim.Muon.__init__).parameters
    assert {"lr", "weight_decay", "momentum", "nesterov", "adjust_lr_fn"} <= set(sig)
    torch.manual_seed(0)
    W0s = [torch.randn(32, 48), torch.randn(48, 32)]
    steps = [[torch.randn_like(w) for w in W0s] for _ in range(5)]
    ours = run_muon(W0s, steps)  # bf16 NS, as Moonlight
    ps = [nn.Parameter(w.clone()) for w in W0s]
    opt = torch.optim.Muon(
        ps, lr=OPTIM_LR, weight_decay=OPTIM_WD, momentum=0.95, nesterov=True, adjust_lr_fn="match_rms_adamw"
    )
    for grads in steps:
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
    for w0, a, b in zip(W0s, ours, ps):
        moved = (a - w0 * (1 - OPTIM_LR * OPTIM_WD) ** 5).abs().max()
        assert moved > 0.01
        # torch's NS is bf16 too (and normalizes with clamp(min=eps) instead of +eps)
        assert (a - b.detach()).abs().max() < 0.06 * moved


def test_matches_naive_reference_fp32():
    torch.manual_seed(1)
    W0s = [torch.randn(32, 48), torch.randn(48, 32), torch.randn(40, 40)]
    steps = [[torch.randn_like(w) for w in W0s] for _ in range(4)]
    ours = run_muon(W0s, steps, ns_dtype=torch.float32)
    for i, w0 in enumerate(W0s):
        ref = ref_muon_run(w0, [s[i] for s in steps])
        torch.testing.assert_close(ours[i], ref, atol=2e-6, rtol=1e-5)
    # bf16 NS (the default) against the bf16 reference: same algorithm
    ours_bf16 = run_muon(W0s, steps)
    for i, w0 in enumerate(W0s):
        ref = ref_muon_run(w0, [s[i] for s in steps], dtype=torch.bfloat16)
        torch.testing.assert_close(ours_bf16[i], ref, atol=1e-5, rtol=1e-5)


def test_ns_is_orthogonal_ish_and_batched():
    torch.manual_seed(2)
    G = torch.randn(3, 48, 32)
    O = zeropower_via_newtonschulz(G, dtype=torch.float32)
    for e in range(3):
        torch.testing.assert_close(O[e], ref_ns(G[e]), atol=1e-6, rtol=1e-5)
        s = torch.linalg.svdvals(O[e])
        assert 0.5 < s.min() and s.max() < 1.3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ns_is_moonshots_op_for_op(dtype):
    """Newton-Schulz runs the reference's ops in its order, so it matches it bit for bit, also in bf16
    (where a fused addmm would round differently)."""
    torch.manual_seed(6)
    for G in (torch.randn(32, 48), torch.randn(48, 32), torch.randn(40, 40)):
        assert torch.equal(zeropower_via_newtonschulz(G, dtype=dtype), ref_ns(G, dtype=dtype))


@pytest.mark.parametrize("shape", [(4, 32, 48), (3, 48, 32)])
def test_expert_3d_equals_per_expert_2d(shape):
    torch.manual_seed(3)
    W0 = torch.randn(shape)
    steps = [[torch.randn(shape)] for _ in range(3)]
    (ours,) = run_muon([W0], steps, ns_dtype=torch.float32)
    for e in range(shape[0]):
        (ref,) = run_muon([W0[e]], [[s[0][e]] for s in steps], ns_dtype=torch.float32)
        torch.testing.assert_close(ours[e], ref, atol=1e-6, rtol=1e-6)


def _per_matrix_muon(params, grads_per_step, ns_dtype, master):
    """Muon as it was written before its step was batched: one parameter at a time, each 2-D weight
    through 2-D Newton-Schulz and each 3-D one through its own batch (the exact path)."""
    state = {}
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            if id(p) not in state:
                dtype = torch.float32 if master else p.dtype
                state[id(p)] = (torch.zeros_like(p, dtype=dtype), p.detach().float() if master else p.detach())
            buf, target = state[id(p)]
            g = g.to(buf.dtype)
            buf.mul_(0.95).add_(g)
            o = zeropower_via_newtonschulz(g.add(buf, alpha=0.95), dtype=ns_dtype)
            target.mul_(1 - OPTIM_LR * OPTIM_WD)
            target.add_(o.to(target.dtype), alpha=-OPTIM_LR * 0.2 * math.sqrt(max(p.shape[-2:])))
            if master:
                p.detach().copy_(target)
    return [p.detach() for p in params]


@pytest.mark.parametrize("ns_dtype, master", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_batched_step_equals_the_per_matrix_step_bit_for_bit(monkeypatch, ns_dtype, master):
    """Same-shape matrices run Newton-Schulz as one stack (several stacks when they exceed the stack
    size), momentum and updates are foreach ops: the weights are those of one matrix at a time."""
    monkeypatch.setattr(muon_module, "NS_STACK_NUMEL", 3 * 32 * 48)  # stacks of at most 3 such matrices
    torch.manual_seed(4)
    shapes = [(32, 48), (48, 32), (32, 48), (2, 32, 48), (32, 48), (48, 32), (3, 16, 24), (32, 48), (40, 40)]
    dtype = torch.bfloat16 if master else torch.float32
    W0s = [torch.randn(s).to(dtype) for s in shapes]
    steps = [[torch.randn(s).to(dtype) for s in shapes] for _ in range(3)]
    calls = []
    original = muon_module.zeropower_via_newtonschulz
    monkeypatch.setattr(
        muon_module, "zeropower_via_newtonschulz", lambda G, *a, **k: calls.append(G.shape) or original(G, *a, **k)
    )
    ours = run_muon(W0s, steps, ns_dtype=ns_dtype, master_weights=master)
    ref = _per_matrix_muon([nn.Parameter(w.clone()) for w in W0s], steps, ns_dtype, master)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
    # per step, whole parameters in order: the six 32 x 48 matrices in stacks of 2, 2 + 1, 1; the two
    # 48 x 32 ones in one; the experts; the square one
    assert sorted(tuple(s) for s in calls[:6]) == [
        (1, 32, 48),
        (1, 40, 40),
        (2, 32, 48),
        (2, 48, 32),
        (3, 16, 24),
        (3, 32, 48),
    ]
    assert len(calls) == 3 * 6


def test_muon_rejects_1d():
    with pytest.raises(ValueError):
        Muon([nn.Parameter(torch.randn(8))])


# ------------------------------------------------------------------------------------------
# Grouping, precision-aware mode
# ------------------------------------------------------------------------------------------


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(64, 16)
        self.q_proj = nn.Linear(16, 24, bias=False)
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(torch.ones(16))
        self.experts_w = nn.Parameter(torch.randn(4, 8, 16))
        self.frozen = nn.Parameter(torch.randn(8, 8), requires_grad=False)
        self.register_buffer("e_score_correction_bias", torch.zeros(4))
        self.lm_head = nn.Linear(16, 64, bias=False)


def test_param_grouping():
    m = _Tiny()
    opts = build_optimizers(m.named_parameters(), "muon", lr=1e-3, weight_decay=0.1)
    muon, adamw = opts.optimizers
    assert isinstance(muon, Muon) and isinstance(adamw, torch.optim.AdamW)
    ids = lambda o: {id(p) for g in o.param_groups for p in g["params"]}  # noqa: E731
    assert ids(muon) == {id(m.q_proj.weight), id(m.experts_w)}
    assert ids(adamw) == {id(m.embed_tokens.weight), id(m.lm_head.weight), id(m.norm.weight)}
    assert adamw.defaults["betas"] == (0.9, 0.95) and adamw.defaults["eps"] == 1e-8
    assert all(g["weight_decay"] == 0.1 for g in opts.param_groups)
    (only,) = build_optimizers(m.named_parameters(), "adamw", lr=1e-3).optimizers
    assert len(ids(only)) == 5
    pa = build_optimizers(m.named_parameters(), "muon", lr=1e-3, precision_aware=True)
    assert isinstance(pa[1], AdamW) and pa[0].defaults["master_weights"]
    # the container steps, zeroes and round-trips state
    for p in m.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    opts.step()
    sd = opts.state_dict()
    opts2 = build_optimizers(m.named_parameters(), "muon", lr=1e-3)
    opts2.load_state_dict(sd)
    torch.testing.assert_close(
        opts2[0].state[m.q_proj.weight]["momentum_buffer"], opts[0].state[m.q_proj.weight]["momentum_buffer"]
    )
    opts.zero_grad()
    assert m.q_proj.weight.grad is None


def test_our_adamw_matches_torch_adamw():
    torch.manual_seed(0)
    w = torch.randn(16, 8)
    a, b = nn.Parameter(w.clone()), nn.Parameter(w.clone())
    oa = AdamW([a], lr=1e-2, weight_decay=0.1, master_weights=False)
    ob = torch.optim.AdamW([b], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for _ in range(5):
        g = torch.randn_like(w)
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("ours", [False, True])
def test_adamw_is_fused_and_matches_the_per_tensor_update_in_fp64(ours):
    """build_optimizers' torch AdamW and our AdamW (precision_aware's, here without master copies) run
    torch's fused kernel, one op for all tensors; in fp64 they equal torch's per-tensor AdamW (the path
    they replaced) to rounding."""
    torch.manual_seed(0)
    shapes = [(16, 8), (8,), (3, 4, 5)]
    W0s = [torch.randn(s, dtype=torch.float64) for s in shapes]
    fused = [nn.Parameter(w.clone()) for w in W0s]
    single = [nn.Parameter(w.clone()) for w in W0s]
    if ours:
        opt = AdamW(fused, lr=1e-2, weight_decay=0.1, master_weights=False)
    else:
        (opt,) = build_optimizers([(f"w{i}", p) for i, p in enumerate(fused)], "adamw", lr=1e-2).optimizers
    ref = torch.optim.AdamW(single, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=False)
    assert opt.param_groups[0]["fused"]
    for _ in range(5):
        for a, b in zip(fused, single):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
    for a, b in zip(fused, single):
        torch.testing.assert_close(a, b, atol=1e-14, rtol=1e-13)


def test_optimizer_step_op_count_within_budget():
    """Ops dispatched by one optimizer step of the debug model (benchmarks/optimizer_ops.py, budgets in
    benchmarks/README.md): each a kernel launch on a GPU; before batching Muon's step took 2,135 and AdamW's
    495 (torch's own foreach on CUDA: the same passes over memory in about 11 launches)."""
    from benchmarks.optimizer_ops import count_step

    assert count_step("debug", "muon", False)["ops"] <= 330
    assert count_step("debug", "adamw", True)["ops"] <= 6  # with the master weights' copies


@pytest.mark.parametrize("kind", ["muon", "adamw"])
def test_precision_aware_master_weights(kind):
    torch.manual_seed(0)
    w32 = torch.randn(32, 48)
    w16 = w32.bfloat16()
    lr = 1e-4  # per-step updates far below bf16 resolution of O(1) weights
    make = {
        "muon": lambda ps, master: Muon(
            ps, lr=lr, weight_decay=OPTIM_WD, ns_dtype=torch.float32, master_weights=master
        ),
        "adamw": lambda ps, master: AdamW(ps, lr=lr, weight_decay=OPTIM_WD, master_weights=master),
    }[kind]
    p_master, p_naive, p_fp32 = (nn.Parameter(w16.clone()), nn.Parameter(w16.clone()), nn.Parameter(w16.float()))
    o_master, o_naive, o_fp32 = make([p_master], True), make([p_naive], False), make([p_fp32], False)
    for _ in range(20):
        g = torch.randn(32, 48).bfloat16()
        p_master.grad, p_naive.grad, p_fp32.grad = g.clone(), g.clone(), g.float()
        for o in (o_master, o_naive, o_fp32):
            o.step()
    st = o_master.state[p_master]
    assert st["master"].dtype == torch.float32 and p_master.dtype == torch.bfloat16
    mom = st["momentum_buffer"] if kind == "muon" else st["exp_avg"]
    assert mom.dtype == torch.float32
    # the fp32 master follows the fp32 run exactly; the bf16 param is its rounding
    torch.testing.assert_close(st["master"], p_fp32.detach(), atol=1e-6, rtol=1e-6)
    assert torch.equal(p_master.detach(), st["master"].bfloat16())
    # naive bf16 updates are lost to rounding: the bf16 param barely moves, while the fp32
    # master (and the fp32 run) moved every element
    assert (p_fp32.detach() != w16.float()).float().mean() > 0.99
    assert (p_naive.detach() == w16).float().mean() > 0.9
    assert not torch.equal(p_naive.detach(), p_master.detach())


# ------------------------------------------------------------------------------------------
# OPTIM_LR schedule
# ------------------------------------------------------------------------------------------


def test_lr_multiplier_values():
    kw = dict(warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    for dt in ("cosine", "linear", "wsd"):
        f = lambda s: lr_multiplier(s, decay_type=dt, decay_ratio=0.2, **kw)  # noqa: E731
        assert f(0) == pytest.approx(1 / 11)
        assert f(9) == pytest.approx(10 / 11)
        assert f(10) == pytest.approx(1.0)
        assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
        vals = [f(s) for s in range(10, 111)]
        assert all(a >= b - 1e-12 for a, b in zip(vals, vals[1:]))  # non-increasing after warmup
    assert lr_multiplier(60, decay_type="cosine", **kw) == pytest.approx(0.55)  # midpoint
    assert lr_multiplier(60, decay_type="linear", **kw) == pytest.approx(0.55)
    assert lr_multiplier(35, decay_type="linear", **kw) == pytest.approx(0.1 + 0.9 * 0.75)
    # WSD: stable until the last 20% of total steps (88..110), then linear to min
    assert lr_multiplier(87, decay_type="wsd", decay_ratio=0.2, **kw) == 1.0
    assert lr_multiplier(88, decay_type="wsd", decay_ratio=0.2, **kw) == 1.0
    assert lr_multiplier(99, decay_type="wsd", decay_ratio=0.2, **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_multiplier(0, warmup_steps=0, total_steps=10) == 1.0
    with pytest.raises(ValueError):
        lr_multiplier(20, 10, 110, decay_type="bogus")


def test_lr_scheduler_drives_all_groups_and_checkpoints():
    m = _Tiny()
    opts = build_optimizers(m.named_parameters(), "muon", lr=1e-3)
    schedule = LRSchedulerSection(warmup_steps=4, decay_type="cosine", min_lr_ratio=0.1)
    sched = schedule.build(opts, total_steps=20)
    assert all(g["lr"] == pytest.approx(1e-3 / 5) for g in opts.param_groups)
    for _ in range(7):
        opts.step()
        sched.step()
    want = 1e-3 * lr_multiplier(7, 4, 20, "cosine", 0.1)
    assert all(g["lr"] == pytest.approx(want) for g in opts.param_groups)
    assert sched.get_last_lr() == pytest.approx([want] * len(opts.param_groups))
    sd = sched.state_dict()
    opts2 = build_optimizers(m.named_parameters(), "muon", lr=1e-3)
    sched2 = schedule.build(opts2, total_steps=20)
    sched2.load_state_dict(sd)
    sched2.step()
    sched.step()
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr())
    # a plain optimizer works too
    (s1,) = LRSchedulerSection(warmup_steps=0, decay_type="linear", min_lr_ratio=0.0).build(
        torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=1.0), total_steps=10
    )
    assert s1.get_last_lr() == [1.0]


def test_optimizer_section_builds_with_every_key():
    """[optimizer]'s keys reach the optimizers its build() makes (the trainer and the planner call it)."""
    section = OptimizerSection(
        name="muon",
        lr=3e-3,
        beta1=0.8,
        beta2=0.9,
        eps=1e-6,
        weight_decay=0.05,
        momentum=0.9,
        nesterov=False,
        ns_steps=3,
        precision_aware=True,
    )
    muon, adamw = section.build(_Tiny().named_parameters(), ns_dtype=torch.float32).optimizers
    assert type(muon) is Muon and type(adamw) is AdamW  # precision_aware: ours, with fp32 master weights
    assert {
        k: muon.defaults[k]
        for k in ("lr", "weight_decay", "momentum", "nesterov", "ns_steps", "ns_dtype", "master_weights")
    } == dict(
        lr=3e-3,
        weight_decay=0.05,
        momentum=0.9,
        nesterov=False,
        ns_steps=3,
        ns_dtype=torch.float32,
        master_weights=True,
    )
    assert {k: adamw.defaults[k] for k in ("lr", "betas", "eps", "weight_decay", "master_weights")} == dict(
        lr=3e-3, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.05, master_weights=True
    )
    (plain,) = OptimizerSection(name="adamw").build(_Tiny().named_parameters()).optimizers
    assert type(plain) is torch.optim.AdamW


def test_lr_scheduler_section_builds_with_every_key():
    """Each [lr_scheduler] key changes the built schedule as lr_multiplier's keyword of that name does."""
    section = LRSchedulerSection(warmup_steps=2, decay_type="wsd", decay_ratio=0.5, min_lr_ratio=0.25)
    opt = torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=1.0)
    (sched,) = section.build(opt, total_steps=10)
    lrs = []
    for _ in range(12):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([lr_multiplier(s, 2, 10, "wsd", 0.25, 0.5) for s in range(12)])
    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0]) and lrs[4] == 1.0  # warmup, then stable to step 5
    assert lrs[9] == pytest.approx(0.25 + 0.75 * 0.2) and lrs[10:] == pytest.approx([0.25, 0.25])


# ------------------------------------------------------------------------------------------
# MoE bias balancing
# ------------------------------------------------------------------------------------------


def _route_counts(scores, bias, k):
    idx = torch.topk(scores + bias, k, dim=-1).indices
    return torch.bincount(idx.reshape(-1), minlength=scores.shape[-1])


def test_router_bias_balances_skewed_load():
    torch.manual_seed(0)
    T, E, k, L = 1024, 16, 4, 2
    skew = torch.linspace(0, 2.0, E)
    scores = [torch.sigmoid(torch.randn(T, E) * 0.5 + skew.roll(l)) for l in range(L)]
    biases = [torch.zeros(E) for _ in range(L)]
    counts = [torch.zeros(E, dtype=torch.long) for _ in range(L)]
    imb0 = None
    for _ in range(300):
        for l in range(L):
            counts[l] += _route_counts(scores[l], biases[l], k)
        imb = expert_load_imbalance(torch.stack(counts))
        if imb0 is None:
            imb0 = imb.clone()
        update_router_biases(biases, counts, rate=1e-3)
        assert all(int(c.sum()) == 0 for c in counts)
    assert (imb0 > 2.5).all()
    final = torch.stack([_route_counts(scores[l], biases[l], k) for l in range(L)])
    assert (expert_load_imbalance(final) < 1.25).all(), expert_load_imbalance(final)
    # overloaded experts got negative bias
    assert biases[0][-1] < 0 < biases[0][0]


def test_router_bias_update_of_layers_with_other_expert_counts():
    biases = [torch.zeros(4), torch.full((6,), 0.5)]
    counts = [torch.tensor([4, 0, 2, 2]), torch.tensor([1, 1, 1, 1, 8, 0])]
    total = update_router_biases(biases, counts, rate=0.1)
    assert total.tolist() == [4, 0, 2, 2, 1, 1, 1, 1, 8, 0]  # flat: the layers' sizes differ
    assert biases[0].tolist() == pytest.approx([-0.1, 0.1, 0.0, 0.0])  # mean 2
    assert biases[1].tolist() == pytest.approx([0.6, 0.6, 0.6, 0.6, 0.4, 0.6])  # mean 2
    assert all(int(c.abs().sum()) == 0 for c in counts)


def test_router_bias_rate_zero_freezes():
    b = torch.randn(8)
    b0 = b.clone()
    c = torch.arange(8.0)
    update_router_biases([b], [c], rate=0.0)
    assert torch.equal(b, b0) and torch.equal(c, torch.zeros(8))
    assert float(expert_load_imbalance(torch.tensor([1.0, 1.0, 4.0]))) == pytest.approx(2.0)
    assert float(expert_load_imbalance(torch.zeros(4))) == 1.0


def test_clip_grad_norm_without_gradients_stays_on_the_parameters_device():
    """A pipeline stage whose parameters are all frozen still all-reduces its (zero) norm: NCCL takes
    device tensors only, and the trainer stacks the norm with the device loss. (meta stands in for CUDA.)"""
    frozen = [nn.Parameter(torch.empty(3, 4, device="meta"), requires_grad=False)]
    total = clip_grad_norm_(frozen, max_norm=1.0)
    assert total.device.type == "meta" and total.dtype == torch.float32 and total.shape == ()


def test_clip_grad_norm_plain_and_nonfinite():
    torch.manual_seed(0)
    ps = [nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(3))]
    for p in ps:
        p.grad = torch.randn_like(p) * 10
    want = torch.cat([p.grad.reshape(-1) for p in ps]).norm()
    g0 = [p.grad.clone() for p in ps]
    total = clip_grad_norm_(ps, 1.0)
    assert float(total) == pytest.approx(float(want), rel=1e-6)
    assert torch.allclose(torch.cat([p.grad.reshape(-1) for p in ps]).norm(), torch.tensor(1.0), atol=1e-5)
    # below the threshold: untouched
    for p, g in zip(ps, g0):
        p.grad = g.clone()
    clip_grad_norm_(ps, 1e6)
    assert all(torch.equal(p.grad, g) for p, g in zip(ps, g0))
    ps[0].grad[0, 0] = float("inf")
    bad = [p.grad.clone() for p in ps]
    total = clip_grad_norm_(ps, 1.0)
    assert not torch.isfinite(total)
    assert all(torch.equal(p.grad, g) for p, g in zip(ps, bad))
