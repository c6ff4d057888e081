"""Our model and its two peers built from the same Hugging Face weights, for side-by-side timing.

- ours: `moonlight.hf.load_hf`
- transformers: `DeepseekV3ForCausalLM.from_pretrained`
- torchtitan (the [bench] extra): its DeepSeek-V3 model (`torchtitan.models.deepseek_v3`, which covers
  Moonlight's architecture) configured from the same ModelArgs and loaded through its own
  `DeepSeekV3StateDictAdapter.from_hf`.

torchtitan needs these adjustments to run Moonlight on a CPU (`build_torchtitan` applies them):
1. Inner attention: SDPA with is_causal instead of FlexAttention (its language-model default, which
   needs document masks built from positions; one document per sequence here, so the result is the
   same causal attention).
2. Routed experts in the model's dtype: its GroupedExperts casts inputs and weights to bf16 for
   torch._grouped_mm; on CPUs without bf16 units that is ~60x slower and it changes the logits, so
   the benchmark runs the same three grouped GEMMs without the casts (`_experts_in_model_dtype`).
3. RoPE without YaRN and kv_norm with Moonlight's eps 1e-6 (its DeepSeek flavours use YaRN and 1e-5):
   set in the config, not patched.
4. Its trainer is not used (device fallbacks to "cuda", CUDA memory stats, gloo lacking PREMUL_SUM):
   only its model classes are.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moonlight.config import ModelArgs
from moonlight.hf import load_hf
from moonlight.parallel.tensor import cross_entropy_loss

# The peer benchmarks' config: Moonlight's structure at a size a CPU runs forward+backward on in seconds.
PEER_CONFIG = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=1024,
    moe_intermediate_size=256,
    num_hidden_layers=4,
    first_k_dense_replace=1,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=None,
    kv_lora_rank=64,
    qk_nope_head_dim=64,
    qk_rope_head_dim=32,
    v_head_dim=64,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=2,
    n_group=1,
    topk_group=1,
    routed_scaling_factor=2.446,
    norm_topk_prob=True,
    tie_word_embeddings=False,
    num_nextn_predict_layers=0,
    max_position_embeddings=4096,
    rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
)


_STARTED = time.perf_counter()
# Results print line by line even into a pipe (`| tee`), where stdout is block-buffered by default.
sys.stdout.reconfigure(line_buffering=True)


def progress(message: str) -> None:
    """A progress line on stderr, flushed, with the seconds since the benchmark started: long runs say
    what they are doing (results stay on stdout)."""
    print(f"[{time.perf_counter() - _STARTED:7.1f}s] {message}", file=sys.stderr, flush=True)


def benchmark_device(threads: int) -> torch.device:
    """Threads and seed of a benchmark run; its device (CUDA when there is one)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def save_peer_checkpoint(path: str | Path) -> None:
    """A random transformers DeepseekV3ForCausalLM with PEER_CONFIG saved to `path`: the weights every
    system under comparison loads through its own loader."""
    import transformers  # the [bench] extra

    transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**PEER_CONFIG)).save_pretrained(path)


def _experts_in_model_dtype(self, x, num_tokens_per_expert):
    """torchtitan's GroupedExperts.forward without its bf16 casts (adjustment 2)."""
    w1, w2, w3 = self.w1_EFD, self.w2_EDF, self.w3_EFD
    offsets = torch.cumsum(num_tokens_per_expert, dim=0, dtype=torch.int32)
    h = F.silu(self._grouped_mm(A=x, B_t=w1.transpose(-2, -1), offs=offsets))
    h = h * self._grouped_mm(A=x, B_t=w3.transpose(-2, -1), offs=offsets)
    return self._grouped_mm(A=h, B_t=w2.transpose(-2, -1), offs=offsets).type_as(x)


def torchtitan_config(args: ModelArgs, max_seq_len: int):
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.deepseek_v3 import DeepSeekV3Model
    from torchtitan.models.deepseek_v3 import _build_dsv3_layers as build_layers  # its own inits

    layers = build_layers(
        n_layers=args.num_hidden_layers,
        n_dense_layers=args.first_k_dense_replace,
        dim=args.hidden_size,
        n_heads=args.num_attention_heads,
        q_lora_rank=args.q_lora_rank or 0,
        kv_lora_rank=args.kv_lora_rank,
        qk_nope_head_dim=args.qk_nope_head_dim,
        qk_rope_head_dim=args.qk_rope_head_dim,
        v_head_dim=args.v_head_dim,
        mscale=1.0,
        dense_hidden_dim=args.intermediate_size,
        moe_hidden_dim=args.moe_intermediate_size,
        num_experts=args.n_routed_experts,
        num_shared_experts=args.n_shared_experts,
        router_top_k=args.num_experts_per_tok,
        router_score_func=args.scoring_func,
        router_num_expert_groups=args.n_group,
        router_num_limited_groups=args.topk_group,
        router_route_scale=args.routed_scaling_factor,
        router_route_norm=args.norm_topk_prob,
        attn_backend="flex",
        moe_comm_backend="standard",
        non_blocking_capacity_factor=None,
        rope=ComplexRoPE.Config(dim=args.qk_rope_head_dim, max_seq_len=max_seq_len, theta=args.rope_theta),
    )
    for layer in layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()  # adjustment 1
        layer.attention.kv_norm = dataclasses.replace(layer.attention.kv_norm, eps=args.latent_norm_eps)
        for norm in ("attention_norm", "ffn_norm"):
            setattr(layer, norm, dataclasses.replace(getattr(layer, norm), eps=args.rms_norm_eps))
    dim, vocab = args.hidden_size, args.vocab_size
    return DeepSeekV3Model.Config(
        vocab_size=vocab,
        dim=dim,
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=dim),
        norm=RMSNorm.Config(normalized_shape=dim, eps=args.rms_norm_eps),
        lm_head=Linear.Config(in_features=dim, out_features=vocab),
        layers=layers,
        mtp_layers=[],
    )


def build_torchtitan(args: ModelArgs, hf_state_dict: dict | None, device, dtype, max_seq_len: int):
    """torchtitan's model for `args` in `dtype`: from `hf_state_dict` through its adapter, or its own init."""
    from torchtitan.models.common.moe import GroupedExperts
    from torchtitan.models.deepseek_v3 import DeepSeekV3StateDictAdapter

    config = torchtitan_config(args, max_seq_len)
    with torch.device("meta"):
        model = config.build()
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_states(buffer_device=device)
    if hf_state_dict is not None:
        state = DeepSeekV3StateDictAdapter(config, None).from_hf(hf_state_dict)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if "expert_bias" not in k and "tokens_per_expert" not in k]
        if missing or unexpected:
            raise RuntimeError(f"torchtitan load: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for param in model.parameters():  # not model.to(dtype): that would make its complex RoPE cache real
        param.data = param.data.to(dtype)
    model.train()
    if dtype != torch.bfloat16:
        for module in model.modules():
            if isinstance(module, GroupedExperts):
                module.forward = _experts_in_model_dtype.__get__(module)  # adjustment 2
    return model


def torchtitan_train_step(args: ModelArgs, device, dtype, tokens):
    """A bf16 training step of torchtitan's model with its own init (benchmarks/gpu_suite.py)."""
    model = build_torchtitan(args, None, device, dtype, tokens.shape[1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

    def step():
        optimizer.zero_grad()
        cross_entropy_loss(model(tokens), tokens).backward()
        optimizer.step()

    return step


def build_all(args: ModelArgs, hf_dir: Path, device, max_seq_len: int) -> dict:
    """{name: model} of every importable system, each loaded from the HF directory `hf_dir` in fp32."""
    import safetensors.torch
    import transformers

    models = {
        "ours": load_hf(str(hf_dir), dtype=torch.float32, device=device, aux_loss_alpha=0.0).train(),
        "transformers": transformers.DeepseekV3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        .to(device)
        .train(),
    }
    try:
        hf_state = {}
        for f in sorted(Path(hf_dir).glob("*.safetensors")):
            hf_state.update(safetensors.torch.load_file(f))
        models["torchtitan"] = build_torchtitan(args, hf_state, device, torch.float32, max_seq_len)
    except ImportError as e:
        print(f"torchtitan is not importable ({e}); pip install -e '.[bench]'")
    return models
