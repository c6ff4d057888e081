"""Convert Moonlight checkpoints between Hugging Face safetensors and the trainer's DCP format
(one process, no torch.distributed set-up needed):

    python -m moonlight.convert hf-to-dcp --hf HF_DIR --out DCP_DIR [--overwrite]
    python -m moonlight.convert dcp-to-hf --dcp DCP_DIR --out HF_DIR [--config config.json] [--dtype bfloat16]
    python -m moonlight.convert dcp-to-peft --dcp RUN/checkpoint --out ADAPTER_DIR [--step N]

As a library: `load_hf` / `save_hf` (HF directory <-> model) and the in-memory
`to_hf_state_dict` / `from_hf_state_dict` (state dict <-> state dict, streamed for iterators).
Both directions stream one tensor (or output shard) at a time. Details: docs/checkpoints.md.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from moonlight.checkpoint import format as fmt
from moonlight.checkpoint.export import load_dcp_adapters, save_hf_from_dcp
from moonlight.config import ModelArgs
from moonlight.dtypes import to_dtype
from moonlight.errors import ArgumentParser, CheckpointError, ConfigError, exit_on_user_error
from moonlight.hf import (
    HF_OUTPUT,
    HFCheckpoint,
    expected_shapes,
    from_hf_state_dict,
    hf_keys,
    is_expert_stack,
    load_hf,
    parse_size,
    progress,
    save_hf,
    to_hf_state_dict,
)
from moonlight.outputs import check_output, check_replaceable
from moonlight.hf_peft import PEFT_OUTPUT, save_peft_adapter

__all__ = [
    "load_hf",
    "save_hf",
    "to_hf_state_dict",
    "from_hf_state_dict",
    "hf_to_dcp",
    "dcp_to_hf",
    "dcp_to_peft",
    "main",
]


def hf_to_dcp(hf: str, out: str, overwrite: bool = False) -> str:
    """Checked against the config from the HF headers first, then written one tensor at a time (each
    read from the HF files when DCP writes it)."""
    check_output(out, hf)
    check_replaceable(os.path.abspath(out), fmt.DCP_OUTPUT, overwrite, "a moonlight checkpoint", how="--overwrite")
    ckpt = HFCheckpoint(hf)
    args = ckpt.args
    ckpt.check(args)
    placeholders = {}
    for native, shape in expected_shapes(args).items():
        keys = hf_keys(native, args)
        found = [tuple(ckpt.shape(k)) for k in keys]
        found_shape = (len(keys), *found[0]) if is_expert_stack(native) else found[0]
        if len(set(found)) > 1 or found_shape != tuple(shape):
            raise CheckpointError(
                f"{native}: shape {found_shape if len(set(found)) == 1 else found[:3]} does not "
                f"match the config's {tuple(shape)}"
            )
        dtypes = {ckpt.dtype(k) for k in keys}
        if len(dtypes) > 1:
            raise CheckpointError(f"{native}: its per-expert tensors mix dtypes {sorted(map(str, dtypes))}")
        placeholders[native] = torch.empty(shape, dtype=dtypes.pop(), device="meta")
    bar = progress(len(placeholders), "converting HF tensors")

    def read(native: str) -> torch.Tensor:
        keys = hf_keys(native, args)
        bar.update(1)
        if not is_expert_stack(native):
            return ckpt.get(keys[0])
        stack = torch.empty(placeholders[native].shape, dtype=placeholders[native].dtype)
        for row, k in zip(stack, keys):  # one expert at a time
            row.copy_(ckpt.get(k))
        return stack

    print(f"writing model-only DCP checkpoint ({len(placeholders)} tensors) to {out}", file=sys.stderr)
    with bar:
        return fmt.write_model_only_checkpoint(
            placeholders, out, args, step=0, overwrite=overwrite, extra_meta={"source": os.path.abspath(hf)}, read=read
        )


def dcp_to_hf(
    dcp_dir: str,
    out: str,
    config: str | None = None,
    preset: str | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: str = "5GB",
    step: int = -1,
    overwrite: bool = False,
) -> str:
    if config and preset:
        raise ConfigError("pass --config or --model-preset, not both")
    check_output(out, dcp_dir)
    check_replaceable(os.path.abspath(out), HF_OUTPUT, overwrite, "a Hugging Face export", how="--overwrite")
    parse_size(max_shard_size)
    path = fmt.resolve_checkpoint(dcp_dir, step)
    fmt.check_intact(path)
    meta = fmt.read_meta(path) if os.path.exists(os.path.join(path, fmt.META)) else None
    if meta and meta.get("frozen_weights_from"):  # a LoRA run's base model is an input too
        check_output(out, meta["frozen_weights_from"])
    args = ModelArgs.from_hf_config(config) if config else ModelArgs.preset(preset) if preset else None
    hint = ""
    if meta and meta.get("model_args") and args is not None:
        diffs = fmt.model_args_mismatch(meta["model_args"], args, this="the given config")
        if diffs:
            hint = f" (the checkpoint's meta.json differs from the given config: {'; '.join(diffs)})"
            print(
                f"warning: the given config differs from the one {path} was saved with: {'; '.join(diffs)}",
                file=sys.stderr,
            )
    step = f" (step {meta['step']})" if meta and "step" in meta else ""
    print(f"writing HF checkpoint of {path}{step} to {out}", file=sys.stderr)
    try:
        return save_hf_from_dcp(
            path, out, args, hint=hint, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite
        )
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        if fmt.is_complete(path):
            raise
        raise CheckpointError(
            f"{path} was removed while being read ({type(e).__name__}), by a running trainer's "
            "checkpoint.keep_latest_k rotation? Copy the step elsewhere first (or pass a --step the "
            "trainer keeps) and convert the copy; nothing was written"
        ) from None


def dcp_to_peft(dcp_dir: str, out: str, step: int = -1, overwrite: bool = False) -> str:
    path = fmt.resolve_checkpoint(dcp_dir, step)
    check_output(out, path)
    check_replaceable(os.path.abspath(out), PEFT_OUTPUT, overwrite, "a PEFT adapter", how="--overwrite")
    fmt.check_intact(path)
    adapters, args, lora = load_dcp_adapters(path)
    meta = fmt.read_meta(path)
    print(f"writing PEFT adapter ({len(adapters)} tensors) of {path} (step {meta['step']}) to {out}", file=sys.stderr)
    base = meta.get("base_model")  # the run's initial_load_hf
    return save_peft_adapter(adapters, args, lora, out, base_model_name_or_path=base, overwrite=overwrite)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m moonlight.convert",
        description="Convert Moonlight checkpoints between Hugging Face safetensors and "
        "torch.distributed.checkpoint (the trainer's format).",
    )
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-dcp", help="HF directory -> model-only DCP checkpoint")
    a.add_argument("--hf", required=True, help="HF checkpoint directory (config.json + safetensors)")
    a.add_argument("--out", required=True, help="output checkpoint directory")
    a.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    b = sub.add_parser("dcp-to-hf", help="DCP checkpoint (trainer or hf-to-dcp) -> HF directory")
    b.add_argument("--dcp", required=True, help="checkpoint directory step-N, or a folder of them (latest)")
    b.add_argument("--out", required=True, help="output HF directory")
    b.add_argument("--step", type=int, default=-1, help="with a folder of step-N directories: which step")
    g = b.add_mutually_exclusive_group()
    g.add_argument("--config", help="HF config.json (or its directory) instead of the checkpoint's meta.json")
    g.add_argument("--model-preset", help="model preset instead of meta.json")
    b.add_argument(
        "--dtype", help="output dtype: float32, bfloat16, float16 (default: as stored); router biases stay float32"
    )
    b.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    b.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    c = sub.add_parser("dcp-to-peft", help="LoRA/DoRA run's DCP checkpoint -> PEFT adapter directory")
    c.add_argument("--dcp", required=True, help="checkpoint directory step-N, or a folder of them (latest)")
    c.add_argument("--out", required=True, help="output adapter directory")
    c.add_argument("--step", type=int, default=-1, help="with a folder of step-N directories: which step")
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return p


def run(ns: argparse.Namespace) -> str:
    """Validate every argument, then convert; returns the output directory."""
    if ns.command == "hf-to-dcp":
        if not os.path.isdir(ns.hf):
            raise CheckpointError(f"--hf {ns.hf}: no such directory")
        return hf_to_dcp(ns.hf, ns.out, overwrite=ns.overwrite)
    if ns.command == "dcp-to-peft":
        return dcp_to_peft(ns.dcp, ns.out, step=ns.step, overwrite=ns.overwrite)
    if ns.config and not os.path.exists(ns.config):
        raise CheckpointError(f"--config {ns.config}: no such file or directory")
    dtype = to_dtype(ns.dtype, what="--dtype")
    parse_size(ns.max_shard_size)
    return dcp_to_hf(
        ns.dcp,
        ns.out,
        config=ns.config,
        preset=ns.model_preset,
        dtype=dtype,
        max_shard_size=ns.max_shard_size,
        step=ns.step,
        overwrite=ns.overwrite,
    )


def main(argv: list[str] | None = None) -> int:
    """The command line; a user error exits (SystemExit) with code 2 after one `error: ...` line."""
    code = exit_on_user_error(lambda: print(run(build_parser().parse_args(argv))))
    if code:
        raise SystemExit(code)
    return 0


if __name__ == "__main__":
    main()
