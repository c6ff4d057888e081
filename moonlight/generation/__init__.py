"""Generation engine: the static latent cache, prefill and cached decode (`cache`), the small-batch MoE
(`moe`) and the decode loop with on-device sampling (`decoder`). `moonlight.generate` is its API and
command line."""

from moonlight.generation.cache import (
    LatentCache,
    absorbed_attention,
    cache_bytes_per_token,
    decode,
    per_head_kv_bytes_per_token,
    prefill,
)
from moonlight.generation.decoder import (
    Decoder,
    check_request,
    decode_step,
    draw_noise_,
    pad_left,
    sample_from,
    sample_next,
)
from moonlight.generation.moe import gathered_experts, moe_decode, uses_gathered_experts

__all__ = [
    "Decoder",
    "LatentCache",
    "absorbed_attention",
    "cache_bytes_per_token",
    "check_request",
    "decode",
    "decode_step",
    "draw_noise_",
    "gathered_experts",
    "moe_decode",
    "pad_left",
    "per_head_kv_bytes_per_token",
    "prefill",
    "sample_from",
    "sample_next",
    "uses_gathered_experts",
]
