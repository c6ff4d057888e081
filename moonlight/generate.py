"""Text generation with an MLA latent KV cache, and its command line.

    out = generate(model, input_ids, max_new_tokens=32)                          # greedy
    out = generate(model, input_ids, 32, temperature=0.7, top_p=0.9, generator=g)  # nucleus sampling

    python -m moonlight.generate --hf DIR --prompt "Is 123 a prime?" --chat [--max-new-tokens N]
    python -m moonlight.generate --dcp RUN/checkpoint [--step N] --tokenizer PATH --prompt TEXT
    python -m moonlight.generate --hf BASE --adapter RUN/adapter --prompt TEXT

Prompts are LEFT-padded with an `attention_mask` (HF's convention). The cache keeps each token's
normalized latent and rotated rope key; kv_b_proj is absorbed into the query and the output
(DeepSeek-V3's "absorb" inference). Details: docs/generation.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence

import torch

from moonlight.kernels.backend import resolve_impl
from moonlight.kernels.mla_rope import rope_tables, rotate_rope_
from moonlight.checkpoint.export import load_dcp_model
from moonlight.checkpoint.format import check_intact, resolve_checkpoint
from moonlight.config import ModelArgs
from moonlight.distributed import checked_device, default_device
from moonlight.dtypes import to_dtype
from moonlight.errors import ArgumentParser, ConfigError, exit_on_user_error
from moonlight.hf import load_hf
from moonlight.hf_peft import apply_peft_adapter, read_adapter_config
from moonlight.model import MLA, Moonlight
from moonlight.data.chat import load_chat_template
from moonlight.data.tokenizer import build_tokenizer


def cache_bytes_per_token(args: ModelArgs, dtype: torch.dtype) -> int:
    """Latent-cache bytes per token over all layers: (kv_lora_rank + qk_rope_head_dim) values a layer."""
    return args.num_hidden_layers * (args.kv_lora_rank + args.qk_rope_head_dim) * dtype.itemsize


def per_head_kv_bytes_per_token(args: ModelArgs, dtype: torch.dtype) -> int:
    """What a standard per-head K/V cache (as transformers keeps for MLA) stores per token."""
    return args.num_hidden_layers * args.num_attention_heads * (args.qk_head_dim + args.v_head_dim) * dtype.itemsize


class LatentCache:
    """Per layer one [B, max_len, kv_lora_rank + qk_rope_head_dim] buffer (the latent after kv_norm,
    then the rope key after RoPE), plus which slots hold real tokens (left padding does not)."""

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, dtype: torch.dtype, device):
        self.layers = [torch.zeros(batch_size, max_len, args.kv_lora_rank + args.qk_rope_head_dim,
                                   dtype=dtype, device=device) for _ in range(args.num_hidden_layers)]
        self.is_token = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0  # slots filled so far (the same for every row)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.layers)


def absorbed_attention(attn: MLA, x: torch.Tensor, cache: torch.Tensor, start: int, cos: torch.Tensor,
                       sin: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """MLA over the latent cache for x [B, T, H] at slots start..start+T (written into `cache`).
    cos/sin [B, T, R/2] hold each token's own rope angles; allowed [B, T, start+T] which slots each
    token sees."""
    a = attn.args
    bsz, seqlen, _ = x.shape
    nope, rope = a.qk_nope_head_dim, a.qk_rope_head_dim
    q = attn.q_proj(x) if a.q_lora_rank is None else attn.q_b_proj(attn.q_norm(attn.q_a_proj(x)))
    kv = attn.kv_a_proj(x)
    # Rows sit at different positions (per-token angles). k_pe is the rope tail of kv_a_proj's output:
    # rotate it there, as one head as wide as that output.
    impl = resolve_impl(a.kernels, x.device)
    q = rotate_rope_(q, cos, sin, a.qk_head_dim, impl=impl).view(bsz, seqlen, -1, a.qk_head_dim)
    latent, k_pe = rotate_rope_(kv, cos, sin, kv.shape[-1], impl=impl).split([a.kv_lora_rank, rope], dim=-1)
    cache[:, start:start + seqlen] = torch.cat([attn.kv_norm(latent), k_pe], dim=-1)
    latents, keys_pe = cache[:, :start + seqlen].split([a.kv_lora_rank, rope], dim=-1)

    kv_b = attn.kv_b_proj.weight.view(-1, nope + a.v_head_dim, a.kv_lora_rank)  # [heads, nope + v, latent]
    q_nope, q_pe = q.split([nope, rope], dim=-1)
    q_latent = torch.einsum("bthd,hdc->bthc", q_nope, kv_b[:, :nope])  # W_UK absorbed into the query
    scores = (torch.einsum("bthc,bsc->bhts", q_latent, latents)
              + torch.einsum("bthr,bsr->bhts", q_pe, keys_pe)) * attn.softmax_scale
    scores = scores.masked_fill(~allowed.unsqueeze(1), float("-inf"))
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(x.dtype)
    out_latent = torch.einsum("bhts,bsc->bthc", probs, latents)
    out = torch.einsum("bthc,hdc->bthd", out_latent, kv_b[:, nope:])  # W_UV absorbed into the output
    return attn.o_proj(out.flatten(2))


@torch.no_grad()
def forward_cached(model: Moonlight, tokens: torch.Tensor, cache: LatentCache,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Append tokens [B, T] (attention_mask [B, T]: 0 marks left padding) to the cache and return the
    logits [B, V] of the last one. A token's position counts only the real tokens before it."""
    args = model.args
    bsz, seqlen = tokens.shape
    start, end = cache.length, cache.length + seqlen
    is_token = torch.ones_like(tokens, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    cache.is_token[:, start:end] = is_token
    seen = cache.is_token[:, :start].sum(-1, keepdim=True)
    positions = (seen + is_token.cumsum(-1) - 1).clamp(min=0)
    cos, sin = rope_tables(int(positions.max()) + 1, args.qk_rope_head_dim, args.rope_theta, tokens.device)
    cos, sin = cos[positions], sin[positions]
    slot = torch.arange(end, device=tokens.device)
    query_slot = slot[start:, None]
    # Causal over real tokens; a padding slot sees itself only, so its softmax is never empty.
    allowed = (slot <= query_slot) & (cache.is_token[:, None, :end] | (slot == query_slot))
    cache.length = end

    h = model.embed(tokens)
    for i, layer in enumerate(model.layers.values()):  # Block.forward with the cached attention
        h = h + absorbed_attention(layer.attn, layer.attn_norm(h), cache.layers[i], start, cos, sin, allowed)
        h = h + layer.ffn(layer.ffn_norm(h))
    return model.lm_head(model.norm(h[:, -1]))


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]: argmax when temperature is 0, else a draw from the smallest set
    of most likely tokens whose probability reaches top_p (nucleus sampling)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = (logits.float() / temperature).softmax(-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # the first token always stays
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def pad_left(prompts: Sequence[Sequence[int]], pad_id: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> left-padded input_ids [B, S] and attention_mask [B, S]."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids, mask


@torch.no_grad()
def generate_stream(model: Moonlight, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                    top_p: float = 1.0, eos_token_id: int | None = None, attention_mask: torch.Tensor | None = None,
                    generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row ([B]) each step; rows that ended repeat eos. Stops after
    max_new_tokens or once every row has produced eos."""
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ConfigError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
    if attention_mask is not None and not attention_mask[:, -1].all():
        raise ConfigError("prompts must be left-padded: attention_mask must be 1 in the last column")
    if any(hasattr(m, "lora_a") for m in model.modules()):
        raise ConfigError("generation reads kv_b_proj's weight directly: merge LoRA adapters first "
                          "(moonlight.model.lora.merge_lora)")
    total = input_ids.shape[1] + max_new_tokens
    if total > model.args.max_position_embeddings:
        warnings.warn(f"prompt + max_new_tokens = {total} tokens exceeds the model's max_position_embeddings = "
                      f"{model.args.max_position_embeddings}: positions beyond it were never trained", stacklevel=2)
    dtype = next(model.parameters()).dtype
    cache = LatentCache(model.args, input_ids.shape[0], total, dtype, input_ids.device)
    logits = forward_cached(model, input_ids, cache, attention_mask)
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        token = sample_next(logits, temperature, top_p, generator)
        if eos_token_id is not None:
            token = token.masked_fill(done, eos_token_id)
            done |= token == eos_token_id
        yield token
        if step + 1 == max_new_tokens or bool(done.all()):
            return
        logits = forward_cached(model, token[:, None], cache)


def generate(model: Moonlight, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, eos_token_id: int | None = None, attention_mask: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """input_ids [B, S] (left-padded, see the module docstring) -> [B, S + max_new_tokens]."""
    new = list(generate_stream(model, input_ids, max_new_tokens, temperature, top_p, eos_token_id,
                               attention_mask, generator))
    out = torch.cat([input_ids, torch.stack(new, dim=1)], dim=1)
    if len(new) < max_new_tokens:  # every row ended early
        out = torch.cat([out, out.new_full((out.shape[0], max_new_tokens - len(new)), eos_token_id)], dim=1)
    return out


# ------------------------------------------------------------------------------------ command line

def chat_prompt(tokenizer, text: str, system: str | None = None, tokenizer_spec: str = "byte") -> tuple[list[int], int]:
    """A user turn (after an optional system turn) rendered by the model's chat template (the tokenizer
    directory's `chat_template`, else Moonlight-Instruct's format), ending with the assistant's
    generation prompt -> (token ids, the id of <|im_end|>, where generation stops)."""
    template = load_chat_template(tokenizer_spec, tokenizer)
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": text}]
    return template.prompt_ids(messages), template.end_id


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m moonlight.generate",
                       description="Generate text from a Moonlight checkpoint, streamed to stdout.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", help="Hugging Face checkpoint directory (config.json + safetensors)")
    src.add_argument("--dcp", help="trainer checkpoint: a step-N directory or a folder of them (latest)")
    p.add_argument("--adapter", help="a PEFT LoRA/DoRA adapter directory (adapter_config.json + "
                   "adapter_model.safetensors, e.g. a [lora] run's export) for the base model: merged before "
                   "generating")
    p.add_argument("--step", type=int, help="with --dcp and a folder of step-N directories: which step")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user turn (Moonlight-Instruct "
                                                       "chat format) and stop at <|im_end|> or the end of the document")
    p.add_argument("--system", help="with --chat: a system turn before the user's")
    p.add_argument("--max-new-tokens", type=int, default=128, help="at most this many tokens (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--tokenizer", help="'byte', a directory with tiktoken.model or tokenizer.json, or the file "
                                       "(default: the --hf directory)")
    p.add_argument("--dtype", default="float32", help="float32 (fp32), bfloat16 (bf16) or float16 (fp16)")
    p.add_argument("--device", default=default_device().type,
                   help=f"where the model runs, e.g. cpu, cuda, cuda:1 (default here: {default_device().type})")
    return p


def _checked_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse and validate everything that needs no tensor."""
    ns = build_parser().parse_args(argv)
    if ns.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {ns.max_new_tokens}")
    if ns.temperature < 0:
        raise ConfigError(f"--temperature must be >= 0, got {ns.temperature}")
    if not 0 < ns.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {ns.top_p}")
    if ns.system is not None and not ns.chat:
        raise ConfigError("--system applies to --chat only")
    if ns.step is not None and not ns.dcp:
        raise ConfigError("--step applies to --dcp checkpoints only")
    if ns.hf and not os.path.isfile(os.path.join(ns.hf, "config.json")):
        raise ConfigError(f"--hf {ns.hf}: not a Hugging Face checkpoint directory (no config.json)")
    if ns.tokenizer and ns.tokenizer != "byte" and not os.path.exists(ns.tokenizer):
        raise ConfigError(f"--tokenizer {ns.tokenizer}: no such file or directory")
    if not ns.tokenizer and ns.hf and not any(os.path.exists(os.path.join(ns.hf, name))
                                              for name in ("tiktoken.model", "tokenizer.json")):
        raise ConfigError(f"--hf {ns.hf} holds no tokenizer (tiktoken.model or tokenizer.json): pass --tokenizer")
    if ns.dcp and not ns.tokenizer:
        raise ConfigError("--dcp checkpoints hold no tokenizer: pass --tokenizer (a directory with tiktoken.model "
                          "or tokenizer.json, or 'byte')")
    if not ns.prompt:
        raise ConfigError("--prompt is empty")
    if ns.adapter:
        read_adapter_config(ns.adapter)  # a CheckpointError naming what is wrong, before any weight is read
    checked_device(ns.device, "--device")
    return ns


def _check_vocab(prompt: list[int], vocab_size: int):
    if max(prompt) >= vocab_size:
        raise ConfigError(f"the prompt has token id {max(prompt)} but the model's vocab_size is {vocab_size}: "
                          "is --tokenizer the model's tokenizer?")


def _load_model(ns: argparse.Namespace) -> Moonlight:
    dtype = to_dtype(ns.dtype, "--dtype")
    if ns.hf:
        model = load_hf(ns.hf, dtype=dtype, device=ns.device)
    else:
        path = resolve_checkpoint(ns.dcp, -1 if ns.step is None else ns.step)
        check_intact(path)  # a damaged file is named, not a DCP traceback
        model = load_dcp_model(path)
        model = model.to(device=ns.device, dtype=dtype)
    if ns.adapter:
        apply_peft_adapter(model, ns.adapter)
    return model.eval()


def run(argv: list[str] | None = None) -> int:
    ns = _checked_args(argv)
    tokenizer = build_tokenizer(ns.tokenizer or ns.hf, "--tokenizer" if ns.tokenizer else "--hf")
    if ns.chat:
        prompt, eos = chat_prompt(tokenizer, ns.prompt, ns.system, ns.tokenizer or ns.hf or "byte")
    else:
        prompt, eos = tokenizer.encode(ns.prompt), tokenizer.eos_id
    stop = {eos, tokenizer.eos_id}  # a chat reply also ends at the end of the document
    if ns.hf:  # config.json is cheap: reject a tokenizer that does not fit before reading any weight
        _check_vocab(prompt, ModelArgs.from_hf_config(ns.hf).vocab_size)
    model = _load_model(ns)
    _check_vocab(prompt, model.args.vocab_size)
    input_ids = torch.tensor([prompt], device=ns.device)
    generator = torch.Generator(device=ns.device).manual_seed(ns.seed)
    new: list[int] = []
    printed = ""
    t0 = time.perf_counter()
    for token in generate_stream(model, input_ids, ns.max_new_tokens, ns.temperature, ns.top_p, eos,
                                 generator=generator):
        if int(token) in stop:
            break
        new.append(int(token))
        text = tokenizer.decode(new)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text
    sys.stdout.write(tokenizer.decode(new)[len(printed):] + "\n")
    seconds = time.perf_counter() - t0
    print(f"[{len(new)} tokens in {seconds:.1f} s ({len(new) / seconds:.1f} tokens/s); latent KV cache "
          f"{cache_bytes_per_token(model.args, model.embed.weight.dtype)} bytes per token]", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return exit_on_user_error(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
