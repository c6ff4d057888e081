"""Text generation (engine: `moonlight.generation`) and its command line.

    out = generate(model, input_ids, 32)  # greedy; temperature=0.7, top_p=0.9, generator=...: nucleus
    out = generate(model, input_ids, 32, compile=True)  # decode step compiled (CUDA graphs on CUDA)
    python -m moonlight.generate --hf DIR --prompt TEXT [--chat [--system TEXT]] [--max-new-tokens N]
        [--temperature T --top-p P --seed S] [--tokenizer PATH] [--compile | --no-compile] [--adapter DIR]
    python -m moonlight.generate --dcp RUN/checkpoint [--step N] --tokenizer PATH --prompt TEXT

Prompts of different lengths are LEFT-padded in `input_ids` [B, S] with `attention_mask` [B, S] 1 on
prompt tokens (`pad_left`), as in Hugging Face. The result is [B, S + max_new_tokens]; a row that
produced `eos_token_id` is filled with eos from there on. A `Decoder` reused across calls keeps its
buffers and its compiled step.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Iterator

import torch

from moonlight.checkpoint.export import load_dcp_model
from moonlight.checkpoint.format import check_intact, resolve_checkpoint
from moonlight.config import ModelArgs
from moonlight.data.chat import load_chat_template
from moonlight.data.tokenizer import build_tokenizer
from moonlight.distributed import checked_device, default_device
from moonlight.dtypes import to_dtype
from moonlight.errors import ArgumentParser, ConfigError, exit_on_user_error
from moonlight.generation import (
    Decoder,
    LatentCache,
    cache_bytes_per_token,
    check_request,
    decode,
    pad_left,
    per_head_kv_bytes_per_token,
    prefill,
    sample_next,
)
from moonlight.hf import load_hf
from moonlight.hf_peft import apply_peft_adapter, read_adapter_config
from moonlight.model import Moonlight

__all__ = [
    "Decoder",
    "LatentCache",
    "cache_bytes_per_token",
    "decode",
    "generate",
    "generate_stream",
    "main",
    "pad_left",
    "per_head_kv_bytes_per_token",
    "prefill",
    "sample_next",
]


@torch.no_grad()
def generate_stream(
    model: Moonlight,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    compile: bool = False,
    decoder: Decoder | None = None,
    eos_check_every: int = 16,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row ([B], on the device) each step; rows that ended repeat eos.
    Stops after max_new_tokens or once every row has produced eos (read every eos_check_every
    tokens). decoder: reuse its buffers and compiled step (else a new one, compiled if asked)."""
    check_request(max_new_tokens, temperature, top_p, attention_mask)
    total = input_ids.shape[1] + max_new_tokens
    if total > model.args.max_position_embeddings:
        warnings.warn(
            f"prompt + max_new_tokens = {total} tokens exceeds the model's max_position_embeddings = "
            f"{model.args.max_position_embeddings}: positions beyond it were never trained",
            stacklevel=2,
        )
    if decoder is None:
        decoder = Decoder(model, input_ids.shape[0], total, compile=compile)
    yield from decoder.stream(
        input_ids, max_new_tokens, temperature, top_p, eos_token_id, attention_mask, generator, eos_check_every
    )


def generate(
    model: Moonlight,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    compile: bool = False,
    decoder: Decoder | None = None,
) -> torch.Tensor:
    """input_ids [B, S] (left-padded, see the module docstring) -> [B, S + max_new_tokens]; no host read
    per token (one every 16 with eos_token_id)."""
    new = list(
        generate_stream(
            model,
            input_ids,
            max_new_tokens,
            temperature,
            top_p,
            eos_token_id,
            attention_mask,
            generator,
            compile,
            decoder,
        )
    )
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
        {"role": "user", "content": text}
    ]
    return template.prompt_ids(messages), template.end_id


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--hf | --dcp [--step], --adapter, --tokenizer, --dtype, --device: which model, and where it runs."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", help="Hugging Face checkpoint directory (config.json + safetensors)")
    src.add_argument("--dcp", help="trainer checkpoint: a step-N directory or a folder of them (latest)")
    p.add_argument(
        "--adapter",
        help="a PEFT LoRA/DoRA adapter directory (adapter_config.json + "
        "adapter_model.safetensors, e.g. a [lora] run's export) for the base model: merged on load",
    )
    p.add_argument("--step", type=int, help="with --dcp and a folder of step-N directories: which step")
    p.add_argument(
        "--tokenizer",
        help="'byte', a directory with tiktoken.model or tokenizer.json, or the file (default: the --hf directory)",
    )
    p.add_argument("--dtype", default="float32", help="float32 (fp32), bfloat16 (bf16) or float16 (fp16)")
    p.add_argument(
        "--device",
        default=default_device().type,
        help=f"where the model runs, e.g. cpu, cuda, cuda:1 (default here: {default_device().type})",
    )


def check_model_arguments(ns: argparse.Namespace) -> None:
    """add_model_arguments' arguments, checked before any tensor is read."""
    if ns.step is not None and not ns.dcp:
        raise ConfigError("--step applies to --dcp checkpoints only")
    if ns.hf and not os.path.isfile(os.path.join(ns.hf, "config.json")):
        raise ConfigError(f"--hf {ns.hf}: not a Hugging Face checkpoint directory (no config.json)")
    if ns.tokenizer and ns.tokenizer != "byte" and not os.path.exists(ns.tokenizer):
        raise ConfigError(f"--tokenizer {ns.tokenizer}: no such file or directory")
    if (
        not ns.tokenizer
        and ns.hf
        and not any(os.path.exists(os.path.join(ns.hf, name)) for name in ("tiktoken.model", "tokenizer.json"))
    ):
        raise ConfigError(f"--hf {ns.hf} holds no tokenizer (tiktoken.model or tokenizer.json): pass --tokenizer")
    if ns.dcp and not ns.tokenizer:
        raise ConfigError(
            "--dcp checkpoints hold no tokenizer: pass --tokenizer (a directory with tiktoken.model "
            "or tokenizer.json, or 'byte')"
        )
    if ns.adapter:
        read_adapter_config(ns.adapter)  # a CheckpointError naming what is wrong, before any weight is read
    to_dtype(ns.dtype, "--dtype")
    checked_device(ns.device, "--device")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m moonlight.generate",
        description="Generate text from a Moonlight checkpoint, streamed to stdout.",
    )
    add_model_arguments(p)
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument(
        "--chat",
        action="store_true",
        help="send the prompt as a user turn (Moonlight-Instruct "
        "chat format) and stop at <|im_end|> or the end of the document",
    )
    p.add_argument("--system", help="with --chat: a system turn before the user's")
    p.add_argument("--max-new-tokens", type=int, default=128, help="at most this many tokens (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile the decode step (CUDA graphs on CUDA); default: on on CUDA, off elsewhere",
    )
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
    if not ns.prompt:
        raise ConfigError("--prompt is empty")
    check_model_arguments(ns)
    return ns


def _check_vocab(prompt: list[int], vocab_size: int):
    if max(prompt) >= vocab_size:
        raise ConfigError(
            f"the prompt has token id {max(prompt)} but the model's vocab_size is {vocab_size}: "
            "is --tokenizer the model's tokenizer?"
        )


def load_model(ns: argparse.Namespace) -> Moonlight:
    """The model a command line names (--hf DIR, or --dcp PATH [--step N]; --adapter DIR merged onto
    it) in --dtype on --device, in eval mode."""
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
    model = load_model(ns)
    _check_vocab(prompt, model.args.vocab_size)
    input_ids = torch.tensor([prompt], device=ns.device)
    generator = torch.Generator(device=ns.device).manual_seed(ns.seed)
    compile = torch.device(ns.device).type == "cuda" if ns.compile is None else ns.compile
    new: list[int] = []
    printed = ""
    t0 = time.perf_counter()
    for token in on_host(
        generate_stream(
            model, input_ids, ns.max_new_tokens, ns.temperature, ns.top_p, eos, generator=generator, compile=compile
        )
    ):
        if token in stop:
            break
        new.append(token)
        text = tokenizer.decode(new)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(printed) :])
            sys.stdout.flush()
            printed = text
    sys.stdout.write(tokenizer.decode(new)[len(printed) :] + "\n")
    seconds = time.perf_counter() - t0
    print(
        f"[{len(new)} tokens in {seconds:.1f} s ({len(new) / seconds:.1f} tokens/s, prefill and "
        f"{'compiling' if compile else 'eager'} included); latent KV cache "
        f"{cache_bytes_per_token(model.args, model.embed.weight.dtype)} bytes per token]",
        file=sys.stderr,
    )
    return 0


def on_host(tokens: Iterator[torch.Tensor]) -> Iterator[int]:
    """The first row's tokens as ints, each read once the step after it is queued: the device runs
    that step while the host prints (the copy is queued before it, so the read waits for the copy only)."""
    pending = None
    for token in tokens:
        copy = token[0].to("cpu", non_blocking=True)
        copied = torch.cuda.Event() if token.is_cuda else None
        if copied is not None:
            copied.record()
        if pending is not None:
            yield _read(*pending)
        pending = copy, copied
    if pending is not None:
        yield _read(*pending)


def _read(copy: torch.Tensor, copied) -> int:
    if copied is not None:
        copied.synchronize()
    return int(copy)


def main(argv: list[str] | None = None) -> int:
    return exit_on_user_error(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
