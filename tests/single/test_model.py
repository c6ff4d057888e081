"""The model against transformers' DeepseekV3ForCausalLM: logits, routing and every gradient."""

import pytest
import torch
import torch.nn.functional as F
import transformers

from moonlight import ModelArgs, Moonlight
from moonlight.kernels.moe_permute import count_tokens
from moonlight.model.model import MoE, aux_loss_value, sequence_aux_loss
from moonlight.hf import load_hf
from tests.hf_reference import VARIANTS, routed_experts, stable_hf_model

pytestmark = pytest.mark.floor  # also run on torch 2.11 (.ci/run)


def _tokens(vocab, batch=2, seq=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def _hf_layout_grads(model: Moonlight) -> dict[str, torch.Tensor]:
    """Our gradients under transformers' in-memory names (fused gate_up experts, gate rows first)."""
    from moonlight.hf import hf_keys

    grads = {}
    for name, p in model.named_parameters():
        if ".experts." in name:
            layer = name.split(".")[1]
            prefix = f"model.layers.{layer}.mlp.experts."
            experts = model.layers[layer].ffn.experts
            if name.endswith("gate_proj"):
                grads[prefix + "gate_up_proj"] = torch.cat([experts.gate_proj.grad, experts.up_proj.grad], dim=1)
            elif name.endswith("down_proj"):
                grads[prefix + "down_proj"] = p.grad
            continue
        grads[hf_keys(name, model.args)[0]] = p.grad
    return grads


def _loss(logits, tokens):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_float64_logits_routing_and_grads_match_transformers(variant, tmp_path):
    tokens = _tokens(96)
    hf = stable_hf_model(variant, tokens)
    hf.save_pretrained(tmp_path)
    ours = load_hf(tmp_path, dtype=torch.float64, kernels="torch", aux_loss_alpha=0.0)
    ours.train()
    hf.train()

    hf_choice, h1 = routed_experts(hf, "DeepseekV3TopkRouter")
    our_choice, h2 = routed_experts(ours, "Router")
    hf_logits = hf(tokens).logits
    our_logits = ours(tokens)
    for h in h1 + h2:
        h.remove()
    assert len(hf_choice) == len(our_choice) > 0
    for a, b in zip(hf_choice, our_choice):
        assert torch.equal(a, b), "routers chose different experts"
    # 1e-5, not fp64's rounding: transformers computes its router scores and norms in fp32 even for a
    # float64 model, while ours keep float64 (an fp64 run never rounds through fp32)
    torch.testing.assert_close(our_logits, hf_logits, atol=1e-5, rtol=1e-5)

    _loss(hf_logits, tokens).backward()
    _loss(our_logits, tokens).backward()
    ours_grads = _hf_layout_grads(ours)
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    assert set(ours_grads) == set(hf_grads)
    for name, g in hf_grads.items():
        torch.testing.assert_close(
            ours_grads[name], g, atol=1e-5, rtol=1e-5, check_dtype=False, msg=lambda m: f"{name}: {m}"
        )


@pytest.mark.parametrize("variant", ["moonlight", "q_lora"])
def test_float32_logits_match_transformers(variant, tmp_path):
    tokens = _tokens(96, batch=2, seq=16, seed=3)
    hf = stable_hf_model(variant, tokens, dtype=torch.float32, min_gap=1e-4)
    hf.save_pretrained(tmp_path)
    ours = load_hf(tmp_path, dtype=torch.float32, kernels="torch").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-3)


def test_preset_parameter_count_on_meta_device():
    args = ModelArgs.preset("moonlight-16b-a3b")
    with torch.device("meta"):
        model = Moonlight(args)
    assert sum(p.numel() for p in model.parameters()) == 15_960_108_544
    assert args.num_params() == 15_960_108_544
    # moonlight-facts.md's 15,289,019,904 leaves out both the embedding and the lm_head
    assert args.num_params(include_embedding=False) - args.vocab_size * args.hidden_size == 15_289_019_904


def test_flops_per_token_matches_peer_benchmark_definition():
    args = ModelArgs(
        vocab_size=4096,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        kv_lora_rank=64,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=256,
        intermediate_size=1024,
    )
    assert round(args.flops_per_token(256) / 1e6, 2) == 34.46  # peers.md


def test_meta_build_then_init_weights_is_deterministic():
    args = ModelArgs.preset("debug", kernels="torch")
    models = []
    for _ in range(2):
        with torch.device("meta"):
            m = Moonlight(args)
        m.to_empty(device="cpu")
        torch.manual_seed(0)
        m.init_weights()
        models.append(m)
    for (n, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        assert torch.equal(a, b), n
        assert torch.isfinite(a).all(), n
    assert (models[0].layers["1"].ffn.router.expert_bias == 0).all()


def test_a_model_is_initialized_as_built():
    """Fault: the router and the stacked experts were torch.empty until init_weights(): garbage logits."""
    args = ModelArgs.preset("debug", kernels="torch")
    torch.manual_seed(0)
    model = Moonlight(args)
    moe = model.layers["1"].ffn
    for w in (moe.router.weight, moe.experts.gate_proj, moe.experts.down_proj):
        assert w.std().item() == pytest.approx(args.initializer_range, rel=0.05)
        assert w.mean().abs().item() < args.initializer_range / 10
    assert torch.isfinite(model(_tokens(args.vocab_size))).all()


def test_aux_loss_reaches_router_and_counts_tokens():
    torch.manual_seed(0)
    args = ModelArgs.preset("debug", kernels="torch")
    model = Moonlight(args)
    model.init_weights()
    model.train()
    tokens = torch.randint(0, args.vocab_size, (2, 16))
    model(tokens).sum().mul(0).backward()  # zero LM loss: only the aux loss drives the router
    moe = model.moe_layers()[0]
    assert moe.last_aux_loss is not None and moe.last_aux_loss > 0
    assert moe.router.weight.grad.abs().sum() > 0
    assert moe.tokens_per_expert.sum() == 2 * 16 * args.num_experts_per_tok


def _plain_sequence_aux_loss(scores, expert_ids, bsz, top_k):
    """DeepSeek-V3's formula written out: mean over sequences of sum_i f_i * P_i."""
    num_experts = scores.shape[-1]
    probs = (scores / scores.sum(-1, keepdim=True)).view(bsz, -1, num_experts)
    seqlen = probs.shape[1]
    picks = F.one_hot(expert_ids.view(bsz, -1), num_experts).sum(1).to(scores.dtype)
    f = picks * num_experts / (top_k * seqlen)
    return (f * probs.mean(1)).sum(-1).mean()


def test_sequence_aux_loss_and_its_gradient_match_the_plain_formula():
    g = torch.Generator().manual_seed(0)
    bsz, seqlen, num_experts, top_k = 3, 5, 8, 2
    scores = torch.rand(bsz * seqlen, num_experts, generator=g, dtype=torch.float64).requires_grad_()
    expert_ids = torch.rand(bsz * seqlen, num_experts, generator=g).topk(top_k, -1).indices
    prob_sums, weight, all_prob_sums = sequence_aux_loss(scores, expert_ids, bsz, top_k)
    share, value = (weight * prob_sums).sum(), aux_loss_value(weight, all_prob_sums)
    want = _plain_sequence_aux_loss(scores, expert_ids, bsz, top_k)
    torch.testing.assert_close(share, want)
    torch.testing.assert_close(value, want.detach())
    grad_out = torch.tensor(0.7, dtype=torch.float64)
    torch.testing.assert_close(
        torch.autograd.grad(share, scores, grad_out)[0], torch.autograd.grad(want, scores, grad_out)[0]
    )

    def share_of(s):
        prob_sums, weight, _ = sequence_aux_loss(s, expert_ids, bsz, top_k)
        return (weight * prob_sums).sum()

    torch.autograd.gradcheck(share_of, (scores,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_aux_loss_gradient_sent_as_a_constant_is_autograds_bit_for_bit(dtype):
    """The MoE layer sends coeff * weight into prob_sums instead of backpropagating coeff * share from
    a gradient of 1: the same gradient on the scores, bit for bit."""
    g = torch.Generator().manual_seed(0)
    bsz, seqlen, num_experts, top_k, coeff = 2, 7, 8, 2, 0.001
    scores = torch.rand(bsz * seqlen, num_experts, generator=g, dtype=dtype).requires_grad_()
    expert_ids = torch.rand(bsz * seqlen, num_experts, generator=g).topk(top_k, -1).indices
    prob_sums, weight, all_prob_sums = sequence_aux_loss(scores, expert_ids, bsz, top_k)
    share = (weight * prob_sums).sum()
    (autograds,) = torch.autograd.grad(coeff * share, scores, retain_graph=True)
    (constant,) = torch.autograd.grad(prob_sums, scores, weight * coeff)
    assert torch.equal(constant, autograds)
    assert torch.equal(aux_loss_value(weight, all_prob_sums), share.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_sequences_aux_loss_from_the_layers_counts_is_the_same(dtype):
    """With one sequence the picks are the MoE layer's histogram: the same loss, weight and gradient."""
    g = torch.Generator().manual_seed(0)
    seqlen, num_experts, top_k = 9, 8, 3
    scores = torch.rand(seqlen, num_experts, generator=g, dtype=dtype).requires_grad_()
    expert_ids = torch.rand(seqlen, num_experts, generator=g).topk(top_k, -1).indices
    counts = count_tokens(expert_ids, num_experts)
    got = sequence_aux_loss(scores, expert_ids, 1, top_k, counts=counts)
    want = sequence_aux_loss(scores, expert_ids, 1, top_k)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_only_training_forwards_count_expert_load():
    """Validation and generation run the model in eval mode: their tokens must not steer the router
    bias, so the load counters count training-mode forwards only."""
    torch.manual_seed(0)
    args = ModelArgs.preset("debug", kernels="torch")
    model = Moonlight(args)
    model.init_weights()
    tokens = torch.randint(0, args.vocab_size, (2, 16))
    model.eval()
    with torch.no_grad():
        model(tokens)
    model(tokens)
    assert all(m.tokens_per_expert.sum() == 0 for m in model.moe_layers())
    model.train()
    with torch.no_grad():
        model(tokens)
    assert all(m.tokens_per_expert.sum() == 2 * 16 * args.num_experts_per_tok for m in model.moe_layers())


def test_the_load_counter_holds_each_experts_choices():
    """The counter adds the histogram the permute groups rows by: per expert, the router's choices."""
    torch.manual_seed(0)
    args = ModelArgs.preset("debug", kernels="torch")
    moe = MoE(args).train()
    x = torch.randn(2, 16, args.hidden_size)
    moe(x)
    moe(x)
    _, expert_ids, _ = moe.router(x.view(-1, args.hidden_size))
    want = torch.bincount(expert_ids.flatten(), minlength=args.n_routed_experts)
    assert torch.equal(moe.tokens_per_expert, 2 * want)


def test_bf16_cast_keeps_router_bias_fp32():
    model = Moonlight(ModelArgs.preset("debug", kernels="torch")).to(torch.bfloat16)
    assert model.layers["1"].ffn.router.expert_bias.dtype == torch.float32
    assert model.layers["1"].ffn.experts.gate_proj.dtype == torch.bfloat16


def test_bf16_forward_agrees_with_transformers_bf16(tmp_path):
    tokens = _tokens(96, batch=2, seq=16, seed=5)
    hf = stable_hf_model("moonlight", tokens, dtype=torch.float32, min_gap=1e-3)
    hf.save_pretrained(tmp_path)
    hf16 = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ours = load_hf(tmp_path, dtype=torch.bfloat16, kernels="torch").eval()
    with torch.no_grad():
        a, b = ours(tokens).float(), hf16(tokens).logits.float()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    assert (a - b).abs().mean() < 0.05


def test_triton_kernels_match_torch_for_the_whole_model(tmp_path):
    """Forward + backward with kernels="triton" (the interpreter on CPU) equals kernels="torch"."""
    tokens = _tokens(96, batch=1, seq=8, seed=7)
    stable_hf_model("moonlight", tokens, dtype=torch.float32, min_gap=1e-4).save_pretrained(tmp_path)
    models = {impl: load_hf(tmp_path, dtype=torch.float32, kernels=impl).train() for impl in ("torch", "triton")}
    logits = {impl: m(tokens) for impl, m in models.items()}
    torch.testing.assert_close(logits["triton"], logits["torch"], atol=1e-5, rtol=1e-5)
    for impl in models:
        _loss(logits[impl], tokens).backward()
    grads = {impl: dict(m.named_parameters()) for impl, m in models.items()}
    for name, p in grads["torch"].items():
        torch.testing.assert_close(
            grads["triton"][name].grad, p.grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}"
        )


def test_rope_tables_are_built_once_not_per_layer(monkeypatch):
    """Built once per device, covering max_position_embeddings, and shared by every length; tables
    first built under inference mode still train."""
    from moonlight.model import model as model_module

    calls = []
    real = model_module.rope_tables
    monkeypatch.setattr(model_module, "rope_tables", lambda *a: calls.append(a) or real(*a))
    model_module._rope_tables.cache_clear()
    args = ModelArgs.preset("debug", kernels="torch", num_hidden_layers=3)
    model = Moonlight(args)
    model.init_weights()
    tokens = _tokens(args.vocab_size, seq=10)
    with torch.inference_mode():
        model(tokens)
    model(tokens).sum().backward()
    model(tokens[:, :7])
    assert [a[0] for a in calls] == [args.max_position_embeddings]
    assert all(p.grad is not None for p in model.layers["0"].attn.parameters())
    model_module._rope_tables.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_and_rmsnorm_functions_match_autograd_of_the_reference(dtype):
    """The hand-written backwards: SwiGLU bit for bit (forward and both gradients); RMSNorm's forward
    bit for bit, its gradients to rounding (closed form instead of autograd's chain)."""
    from moonlight.model.model import RMSNorm, swiglu

    g = torch.Generator().manual_seed(0)
    gate, up, grad = (torch.randn(33, 40, generator=g).to(dtype) for _ in range(3))
    gate.requires_grad_(), up.requires_grad_()
    got = swiglu(gate, up)
    want = F.silu(gate) * up
    assert torch.equal(got, want)
    for a, b in zip(torch.autograd.grad(got, (gate, up), grad), torch.autograd.grad(want, (gate, up), grad)):
        assert torch.equal(a, b)

    norm = RMSNorm(40, 1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(40, generator=g) + 0.5)
    x = (torch.randn(3, 11, 40, generator=g) * 3).to(dtype).requires_grad_()
    grad = torch.randn(3, 11, 40, generator=g).to(dtype)
    got = norm(x)
    x32 = x.float()
    want = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    assert torch.equal(got, want)
    for a, b in zip(
        torch.autograd.grad(got, (x, norm.weight), grad), torch.autograd.grad(want, (x, norm.weight), grad)
    ):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("field", ["rms_norm_eps", "latent_norm_eps"])
def test_norm_eps_must_be_positive(field):
    from moonlight.errors import ConfigError

    with pytest.raises(ConfigError, match=f"{field} must be a positive number, got -1e-05"):
        ModelArgs.preset("debug", **{field: -1e-5})
