"""ModelArgs: every hyper-parameter of a Moonlight (DeepSeek-V3 architecture) model.

Field names follow the Hugging Face `config.json` of Moonlight-16B-A3B, so the mapping to and
from HF is one-to-one and a reader can check a value against the released config directly.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Literal

from moonlight.errors import ConfigError


@dataclass
class ModelArgs:
    vocab_size: int = 163840
    hidden_size: int = 2048
    intermediate_size: int = 11264  # dense SwiGLU layers (the first `first_k_dense_replace`)
    moe_intermediate_size: int = 1408  # one routed expert; the shared MLP is n_shared_experts x this
    num_hidden_layers: int = 27
    first_k_dense_replace: int = 1
    num_attention_heads: int = 16
    # Multi-head Latent Attention
    q_lora_rank: int | None = None  # None: a plain q_proj (Moonlight); int: q_a_proj -> norm -> q_b_proj
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # Mixture of experts
    n_routed_experts: int = 64
    num_experts_per_tok: int = 6
    n_shared_experts: int = 2
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 2.446
    norm_topk_prob: bool = True
    scoring_func: Literal["sigmoid"] = "sigmoid"
    topk_method: Literal["noaux_tc"] = "noaux_tc"
    aux_loss_alpha: float = 0.001  # sequence-level balance loss coefficient
    seq_aux: bool = True
    # Positions and norms
    rope_theta: float = 50000.0
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-5
    latent_norm_eps: float = 1e-6  # HF builds kv_a_layernorm / q_a_layernorm without eps: 1e-6
    # Vocabulary and init
    bos_token_id: int = 163584
    eos_token_id: int = 163585
    initializer_range: float = 0.02
    torch_dtype: str = "bfloat16"  # the dtype of the released weights (export default)
    # Implementation choice, not part of the HF config
    kernels: Literal["auto", "torch", "triton"] = "auto"

    def __post_init__(self):
        self.validate()

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_id: int) -> bool:
        return layer_id >= self.first_k_dense_replace

    def validate(self) -> None:
        def need(cond: bool, msg: str):
            if not cond:
                raise ConfigError(msg)

        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "moe_intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
            "n_routed_experts",
            "num_experts_per_tok",
        ):
            need(
                isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                f"{name} must be a positive integer, got {getattr(self, name)!r}",
            )
        need(
            self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and self.q_lora_rank > 0),
            f"q_lora_rank must be null or a positive integer, got {self.q_lora_rank!r}",
        )
        need(
            0 <= self.first_k_dense_replace <= self.num_hidden_layers,
            f"first_k_dense_replace={self.first_k_dense_replace} must be in [0, num_hidden_layers="
            f"{self.num_hidden_layers}]",
        )
        need(self.n_shared_experts >= 0, "n_shared_experts must be >= 0")
        for name in ("rms_norm_eps", "latent_norm_eps"):
            need(
                isinstance(getattr(self, name), (int, float)) and getattr(self, name) > 0,
                f"{name} must be a positive number, got {getattr(self, name)!r}",
            )
        need(self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        need(
            self.num_experts_per_tok <= self.n_routed_experts,
            f"num_experts_per_tok={self.num_experts_per_tok} exceeds n_routed_experts={self.n_routed_experts}",
        )
        need(
            self.n_group >= 1 and self.n_routed_experts % self.n_group == 0,
            f"n_routed_experts={self.n_routed_experts} must be divisible by n_group={self.n_group}",
        )
        need(
            1 <= self.topk_group <= self.n_group, f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]"
        )
        need(
            self.n_group == 1 or self.n_routed_experts // self.n_group >= 2,
            "group routing scores each group by its top-2 experts: use at least 2 experts per group",
        )
        need(
            self.n_group == 1 or self.num_experts_per_tok <= self.topk_group * (self.n_routed_experts // self.n_group),
            "num_experts_per_tok exceeds the experts available in topk_group groups",
        )
        need(
            self.scoring_func == "sigmoid",
            f"scoring_func={self.scoring_func!r} is not supported; Moonlight uses 'sigmoid'",
        )
        need(
            self.topk_method == "noaux_tc",
            f"topk_method={self.topk_method!r} is not supported; Moonlight uses 'noaux_tc'",
        )
        need(
            self.kernels in ("auto", "torch", "triton"),
            f"kernels must be 'auto', 'torch' or 'triton', got {self.kernels!r}",
        )

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelArgs":
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    # ------------------------------------------------------------- HF config
    @classmethod
    def from_hf_config(cls, config: dict | str | os.PathLike, **overrides) -> "ModelArgs":
        """Build from a HF `config.json` (a dict, the file, or its directory).

        Every key is either mapped, checked to hold the one value we implement, or known to be
        informational; anything else is an error, so a config we would compute wrongly never loads.
        """
        if not isinstance(config, dict):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            try:
                with open(path, encoding="utf-8") as f:
                    config = json.load(f)
            except (OSError, ValueError) as e:
                raise ConfigError(f"cannot read the model config {path}: {e}") from None
            if not isinstance(config, dict):
                raise ConfigError(f"{path} is not a config.json (a JSON object of model fields)")
        cfg = dict(config)
        if cfg.get("model_type", "deepseek_v3") not in ("deepseek_v3", "kimi_k2"):
            raise ConfigError(f"model_type={cfg['model_type']!r}: only 'deepseek_v3' configs are supported")
        fields = {f.name for f in dataclasses.fields(cls)} - {"latent_norm_eps", "kernels"}
        kwargs = {k: cfg.pop(k) for k in list(cfg) if k in fields}
        if "dtype" in cfg:  # transformers >= 5 writes `dtype`, older releases `torch_dtype`
            kwargs.setdefault("torch_dtype", cfg.pop("dtype"))
        if kwargs.get("torch_dtype") is None:
            kwargs.pop("torch_dtype", None)

        rope = cfg.pop("rope_parameters", None) or {}
        rope_scaling = cfg.pop("rope_scaling", None)
        if rope_scaling:
            raise ConfigError(
                f"rope_scaling={rope_scaling!r} is not supported (Moonlight uses plain RoPE); "
                "remove it or set it to null"
            )
        if rope.get("rope_type", "default") != "default" or set(rope) - {"rope_type", "rope_theta"}:
            raise ConfigError(
                f"rope_parameters={rope!r} is not supported: only rope_type 'default' "
                "(no YaRN/linear scaling) is implemented"
            )
        if "rope_theta" in rope:
            kwargs.setdefault("rope_theta", rope["rope_theta"])
        if "rope_theta" in cfg:
            kwargs["rope_theta"] = cfg.pop("rope_theta")

        # Keys whose only supported values are fixed: key -> (accepted values, why)
        heads = kwargs.get("num_attention_heads", cls.num_attention_heads)
        fixed = {
            "num_key_value_heads": ((heads, None), "MLA expands one latent to every head: use num_attention_heads"),
            "hidden_act": (("silu",), "only SwiGLU with silu is implemented"),
            "attention_bias": ((False,), "attention projections have no bias"),
            "attention_dropout": ((0.0,), "attention dropout is not implemented"),
            "tie_word_embeddings": ((False,), "Moonlight unties embedding and lm_head"),
            "rope_interleave": ((True,), "Moonlight's RoPE rotates interleaved pairs"),
            "moe_layer_freq": ((1,), "every layer after first_k_dense_replace is MoE"),
            "pretraining_tp": ((1,), "pretraining_tp slicing is not implemented"),
            "architectures": ((["DeepseekV3ForCausalLM"],), "only the causal LM head is implemented"),
        }
        for key, (accepted, why) in fixed.items():
            if key in cfg and cfg[key] not in accepted:
                raise ConfigError(f"{key}={cfg[key]!r} is not supported ({why}); expected {accepted[0]!r}")
            cfg.pop(key, None)
        cfg.pop("model_type", None)
        # Multi-token-prediction heads are training-only extras (transformers' default config says 1 even
        # without their weights): the loader skips their tensors, and we never write any.
        mtp = cfg.pop("num_nextn_predict_layers", 0)
        if not isinstance(mtp, int) or mtp < 0:
            raise ConfigError(f"num_nextn_predict_layers={mtp!r} must be a non-negative integer")
        # Derived or runtime-only keys, redundant with the mapped ones.
        informational = {
            "transformers_version",
            "use_cache",
            "auto_map",
            "pad_token_id",
            "ep_size",
            "output_router_logits",
            "head_dim",
            "qk_head_dim",
            "_name_or_path",
            "num_mtp_layers",
            "return_dict",
            "tokenizer_class",
            "bos_token",
            "eos_token",
        }
        if "quantization_config" in cfg:
            raise ConfigError("quantization_config is not supported: convert the checkpoint to bf16/fp32 first")
        unknown = sorted(set(cfg) - informational)
        if unknown:
            raise ConfigError(
                f"unsupported config field(s) {unknown}: this implementation does not know what "
                "they change; remove them if they are inert, or extend ModelArgs"
            )
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf_config(self) -> dict[str, Any]:
        cfg = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key in ("latent_norm_eps", "kernels", "rope_theta"):
            cfg.pop(key)
        cfg.update(
            architectures=["DeepseekV3ForCausalLM"],
            model_type="deepseek_v3",
            num_key_value_heads=self.num_attention_heads,
            hidden_act="silu",
            attention_bias=False,
            attention_dropout=0.0,
            tie_word_embeddings=False,
            num_nextn_predict_layers=0,
            rope_interleave=True,
            moe_layer_freq=1,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
        )
        return dict(sorted(cfg.items()))

    # --------------------------------------------------------------- counting
    def attention_matmul_params(self) -> int:
        """Weights of one MLA block's projections (norm weights excluded)."""
        h, heads = self.hidden_size, self.num_attention_heads
        if self.q_lora_rank is None:
            q = h * heads * self.qk_head_dim
        else:
            q = h * self.q_lora_rank + self.q_lora_rank * heads * self.qk_head_dim
        return (
            q
            + h * (self.kv_lora_rank + self.qk_rope_head_dim)
            + self.kv_lora_rank * heads * (self.qk_nope_head_dim + self.v_head_dim)
            + heads * self.v_head_dim * h
        )

    def attention_score_flops(self, seq_len: int) -> float:
        """Forward FLOPs per token of attention's scores and weighted values (QK^T and PV over seq_len
        keys; the causal half is not discounted, as Megatron and torchtitan count it)."""
        return 2.0 * self.num_attention_heads * (self.qk_head_dim + self.v_head_dim) * seq_len

    def layer_flops(self, layer_id: int, seq_len: int) -> float:
        """Forward FLOPs per token of decoder layer `layer_id`: its activated weights and attention."""
        h = self.hidden_size
        if self.is_moe_layer(layer_id):
            ffn = (
                3 * h * self.moe_intermediate_size * (self.num_experts_per_tok + self.n_shared_experts)
                + self.n_routed_experts * h
            )  # + router
        else:
            ffn = 3 * h * self.intermediate_size
        return 2.0 * (self.attention_matmul_params() + ffn) + self.attention_score_flops(seq_len)

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameter count computed from the config alone (checked against the built model in tests)."""
        h = self.hidden_size
        q_norm = self.q_lora_rank or 0
        attn = self.attention_matmul_params() + q_norm + self.kv_lora_rank
        dense = 3 * h * self.intermediate_size
        moe = (
            3 * h * self.moe_intermediate_size * (self.n_routed_experts + self.n_shared_experts)
            + self.n_routed_experts * h
        )
        n_moe = self.num_hidden_layers - self.first_k_dense_replace
        total = (
            self.num_hidden_layers * (attn + 2 * h)
            + self.first_k_dense_replace * dense
            + n_moe * moe
            + h
            + self.vocab_size * h
        )
        return total + (self.vocab_size * h if include_embedding else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x activated non-embedding params (lm_head included) + attention."""
        h = self.hidden_size
        inactive = (
            (self.num_hidden_layers - self.first_k_dense_replace)
            * 3
            * h
            * self.moe_intermediate_size
            * (self.n_routed_experts - self.num_experts_per_tok)
        )
        active = self.num_params(include_embedding=False) - inactive
        return 6 * active + 3 * self.num_hidden_layers * self.attention_score_flops(seq_len)


# Fields that fix tensor shapes: a checkpoint must agree on all of them to be loaded at all.
SHAPE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "first_k_dense_replace",
    "num_attention_heads",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "n_routed_experts",
    "n_shared_experts",
)
# Fields that change neither the shapes nor the function of the weights (implementation and training
# knobs): they may differ between the run that saved a checkpoint and the one that resumes it.
RUNTIME_FIELDS = ("kernels", "torch_dtype", "initializer_range", "aux_loss_alpha", "seq_aux")

PRESETS: dict[str, ModelArgs] = {
    "moonlight-16b-a3b": ModelArgs(),
    # Tiny, Moonlight-shaped (dense first layer, MLA without q_lora, sigmoid top-k MoE with a shared
    # expert); trains on a laptop CPU in minutes with the byte-level tokenizer (vocab 258 -> 320).
    "debug": ModelArgs(
        vocab_size=320,
        hidden_size=128,
        intermediate_size=384,
        moe_intermediate_size=96,
        num_hidden_layers=4,
        first_k_dense_replace=1,
        num_attention_heads=4,
        kv_lora_rank=32,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        max_position_embeddings=1024,
        bos_token_id=256,
        eos_token_id=257,
        torch_dtype="float32",
    ),
}
