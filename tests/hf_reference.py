"""Tiny random Hugging Face DeepseekV3 models: the independent reference for parity tests.

Follows the non-flaky recipe: larger init so top-k gaps are wide, norm weights 1 + 0.1 N(0, 1),
router bias N(0, 0.05), and a reseed while any token's k-th/(k+1)-th biased score gap is tiny.
"""

import torch
import transformers

TINY = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    first_k_dense_replace=1,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=None,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=2,
    n_group=1,
    topk_group=1,
    routed_scaling_factor=2.446,
    norm_topk_prob=True,
    rms_norm_eps=1e-5,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    num_nextn_predict_layers=0,
    rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
    initializer_range=0.1,
    bos_token_id=0,
    eos_token_id=1,
)

# Several Moonlight-shaped variants: plain q_proj, q_lora, group routing, top-1, no shared expert.
VARIANTS = {
    "moonlight": {},
    "q_lora": dict(q_lora_rank=24),
    "group_routing": dict(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3),
    "top1_two_dense": dict(num_experts_per_tok=1, first_k_dense_replace=2, num_hidden_layers=4),
    "one_shared_odd_dims": dict(
        n_shared_experts=1,
        hidden_size=48,
        qk_rope_head_dim=12,
        v_head_dim=20,
        num_attention_heads=3,
        num_key_value_heads=3,
    ),
}


def make_hf_model(variant: str = "moonlight", seed: int = 0, dtype=torch.float64, **overrides):
    cfg = transformers.DeepseekV3Config(**{**TINY, **VARIANTS[variant], **overrides})
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM._from_config(
        cfg, dtype=dtype, attn_implementation="eager", experts_implementation="eager"
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
        for mod in model.modules():
            if hasattr(mod, "e_score_correction_bias"):
                mod.e_score_correction_bias.copy_(0.05 * torch.randn_like(mod.e_score_correction_bias))
    return model.eval()


def min_topk_gap(hf_model, tokens) -> float:
    """Smallest gap between the k-th and (k+1)-th biased router score over every token and layer."""
    gaps = []

    def hook(router, inputs, output):
        x = inputs[0].reshape(-1, router.hidden_dim).float()
        biased = torch.sigmoid(x @ router.weight.float().T) + router.e_score_correction_bias
        if router.num_group > 1:  # group routing masks whole groups; the gap that matters is inside the kept ones
            return
        top = biased.topk(router.top_k + 1, dim=-1).values
        gaps.append((top[:, -2] - top[:, -1]).min().item())

    handles = [m.register_forward_hook(hook) for m in hf_model.modules() if type(m).__name__ == "DeepseekV3TopkRouter"]
    with torch.no_grad():
        hf_model(tokens)
    for h in handles:
        h.remove()
    return min(gaps) if gaps else float("inf")


def stable_hf_model(variant: str, tokens, dtype=torch.float64, min_gap=1e-5, **overrides):
    """A random HF model whose routing has no near-ties on `tokens` (reseeds until it has none)."""
    for seed in range(50):
        model = make_hf_model(variant, seed, dtype=dtype, **overrides)
        if min_topk_gap(model, tokens) >= min_gap:
            return model
    raise RuntimeError("no seed without top-k near-ties; shrink the batch")


def routed_experts(model, router_type: str):
    """Record the expert sets chosen by every router of `router_type` (class name) during a forward."""
    chosen = []

    def hook(router, inputs, output):
        ids = output[2] if router_type == "DeepseekV3TopkRouter" else output[1]
        chosen.append(ids.sort(-1).values)

    handles = [m.register_forward_hook(hook) for m in model.modules() if type(m).__name__ == router_type]
    return chosen, handles
