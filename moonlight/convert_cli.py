"""Command line for checkpoint conversion (single process, no torch.distributed set-up needed):

    python -m moonlight.convert hf-to-dcp --hf HF_DIR --out DCP_DIR [--overwrite]
    python -m moonlight.convert dcp-to-hf --dcp DCP_DIR --out HF_DIR [--config config.json | --model-preset NAME]
                                          [--dtype bfloat16] [--max-shard-size 5GB] [--step N] [--overwrite]

Key layout shared with the trainer's checkpoints (moonlight.train.checkpoint): a DCP directory whose
model tensors are stored under "model." + the native parameter name ("model.layers.3.ffn.experts.
gate_proj", experts stacked), next to a `meta.json` sidecar (model args, step, contents) and a
`COMPLETE` marker. The trainer's checkpoints also hold "optimizer.*" keys and per-rank files, which
dcp-to-hf ignores.

- hf-to-dcp writes a MODEL-ONLY checkpoint (meta.json "contents": ["model"], step 0) with the
  tensors in the HF file's dtypes. Start a run from it by pointing `checkpoint.initial_load_hf` at
  it, or by placing it as `<dump_folder>/<checkpoint.folder>/step-0` (resume restores the weights;
  optimizer, data position and schedule start fresh).
- dcp-to-hf reads a trainer checkpoint directory `.../step-N`, or a checkpoint folder (the latest
  complete step, or --step N), or an hf-to-dcp output, any number of saving ranks and any parallel
  layout (DCP reshards into full tensors). Model args come from meta.json unless --config (an HF
  config.json or its directory) or --model-preset is given.

Memory: both directions hold the whole model once in CPU memory (about 32 GB for Moonlight-16B in
bf16).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import torch

from moonlight.config import ConfigError, ModelArgs
from moonlight.convert import progress


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype) or dt not in (torch.float32, torch.bfloat16, torch.float16):
        raise SystemExit(f"error: --dtype {name!r}: use float32, bfloat16 or float16")
    return dt


def hf_to_dcp(hf: str, out: str, overwrite: bool = False) -> str:
    from moonlight.convert import _EXPERTS, HFCheckpoint, expected_shapes, hf_keys
    from moonlight.train.checkpoint import write_model_only_checkpoint

    ckpt = HFCheckpoint(hf)
    args = ckpt.args
    ckpt.check_keys(args)
    shapes = expected_shapes(args)
    n_tensors = sum(len(hf_keys(k, args)) for k in shapes)
    bar = progress(n_tensors, "reading HF tensors")
    sd = {}
    for native in shapes:
        keys = hf_keys(native, args)
        parts = []
        for k in keys:
            parts.append(ckpt.get(k))
            bar.update(1)
        sd[native] = torch.stack(parts) if _EXPERTS.match(native) else parts[0]
        if tuple(sd[native].shape) != tuple(shapes[native]):
            raise ConfigError(f"{native}: shape {tuple(sd[native].shape)} does not match the config's "
                              f"{tuple(shapes[native])}")
    bar.close()
    print(f"writing model-only DCP checkpoint ({len(sd)} tensors) to {out}", file=sys.stderr)
    return write_model_only_checkpoint(sd, out, args, step=0, overwrite=overwrite,
                                       extra_meta={"source": os.path.abspath(hf)})


def _layer_of(key: str) -> str:
    m = re.match(r"^(?:model\.)?layers\.(\d+)\.", key)
    return m.group(1) if m else "top"


def read_dcp_model(dcp_dir: str, config: str | None = None, preset: str | None = None, step: int = -1):
    """A full Moonlight (CPU, the stored dtypes, LoRA adapters merged) from a DCP checkpoint; see dcp-to-hf."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from moonlight.convert import CheckpointError
    from moonlight.model import Moonlight
    from moonlight.train.checkpoint import _dcp_load, model_args_mismatch, read_meta, resolve_checkpoint
    from moonlight.train.lora import is_adapter_name, merge_lora_state_dict

    path = resolve_checkpoint(dcp_dir, step)
    if config and preset:
        raise SystemExit("error: pass --config or --model-preset, not both")
    meta = None
    if os.path.exists(os.path.join(path, "meta.json")):
        meta = read_meta(path)
    if config:
        args = ModelArgs.from_hf_config(config)
    elif preset:
        args = ModelArgs.preset(preset)
    elif meta and meta.get("model_args"):
        saved = dict(meta["model_args"])
        known = {f for f in ModelArgs.__dataclass_fields__}
        args = ModelArgs(**{k: v for k, v in saved.items() if k in known})
    else:
        raise CheckpointError(f"{path} has no meta.json with model args: pass --config config.json or --model-preset")
    hint = " (a different model config?)"
    if meta and meta.get("model_args") and (config or preset):
        diffs = model_args_mismatch(meta["model_args"], args, this="the given config")
        if diffs:
            hint = f" (the checkpoint's meta.json differs from the given config: {'; '.join(diffs)})"
            print(f"warning: the given config differs from the one {path} was saved with: {'; '.join(diffs)}",
                  file=sys.stderr)

    md = FileSystemReader(path).read_metadata().state_dict_metadata
    prefix = "model." if any(k.startswith("model.") for k in md) else ""
    with torch.device("meta"):
        model = Moonlight(args)
    wanted = list(model.state_dict())
    missing = [k for k in wanted if prefix + k not in md]
    if missing:
        raise CheckpointError(f"{path} lacks {len(missing)} model tensor(s) this config needs, e.g. {missing[:5]}"
                              + hint)
    # LoRA/DoRA runs store adapters beside the frozen base weights: read them too and merge below
    adapters = [k[len(prefix):] for k in md if k.startswith(prefix) and is_adapter_name(k[len(prefix):])]
    lora = ((meta or {}).get("layout") or {}).get("lora")
    if adapters and not lora:
        raise CheckpointError(f"{path} holds LoRA adapters (e.g. {adapters[0]}) but its meta.json has no [lora] "
                              "settings, so their scale alpha / rank is unknown")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    sd: dict[str, torch.Tensor] = {}
    for k in wanted + adapters:
        m = md[prefix + k]
        if not isinstance(m, TensorStorageMetadata):
            raise CheckpointError(f"{path}: {prefix + k} is not a tensor")
        expected = shapes.get(k, tuple(m.size))
        if tuple(m.size) != expected:
            raise CheckpointError(f"{path}: {k} has shape {tuple(m.size)} but the config needs {expected}" + hint)
        sd[k] = torch.empty(tuple(m.size), dtype=m.properties.dtype)
    groups: dict[str, list[str]] = {}
    for k in sd:
        groups.setdefault(_layer_of(k), []).append(k)
    bar = progress(len(sd), "reading DCP tensors")
    for keys in groups.values():  # one DCP read per layer: bounded metadata re-reads, a moving bar
        _dcp_load({prefix + k: sd[k] for k in keys}, path)
        bar.update(len(keys))
    bar.close()
    if adapters:
        modules = {k.removesuffix(".lora_a.weight") for k in adapters if k.endswith(".lora_a.weight")}
        sd = merge_lora_state_dict(sd, {name: lora["alpha"] / lora["rank"] for name in modules})
    model.load_state_dict(sd, assign=True, strict=False)
    for module in model.modules():  # non-persistent buffers (load counters) are not in checkpoints
        for name, buf in module.named_buffers(recurse=False):
            if buf.is_meta:
                setattr(module, name, torch.zeros(buf.shape, dtype=buf.dtype))
    return model


def dcp_to_hf(dcp_dir: str, out: str, config: str | None = None, preset: str | None = None,
              dtype: torch.dtype | None = None, max_shard_size: str = "5GB", step: int = -1,
              overwrite: bool = False) -> str:
    from moonlight.convert import save_hf

    model = read_dcp_model(dcp_dir, config, preset, step)
    print(f"writing HF checkpoint to {out}", file=sys.stderr)
    save_hf(model, out, max_shard_size=max_shard_size, dtype=dtype, overwrite=overwrite)
    return os.path.abspath(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m moonlight.convert",
                                description="Convert Moonlight checkpoints between Hugging Face safetensors and "
                                            "torch.distributed.checkpoint (the trainer's format).")
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
    b.add_argument("--dtype", help="output dtype: float32, bfloat16, float16 (default: as stored); router "
                                   "biases stay float32")
    b.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    b.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return p


def main(argv: list[str] | None = None) -> int:
    from moonlight.convert import CheckpointError

    ns = build_parser().parse_args(argv)
    try:
        if ns.command == "hf-to-dcp":
            if not os.path.isdir(ns.hf):
                raise CheckpointError(f"--hf {ns.hf}: no such directory")
            out = hf_to_dcp(ns.hf, ns.out, overwrite=ns.overwrite)
        else:
            if ns.config and not os.path.exists(ns.config):
                raise CheckpointError(f"--config {ns.config}: no such file or directory")
            out = dcp_to_hf(ns.dcp, ns.out, config=ns.config, preset=ns.model_preset, dtype=_dtype(ns.dtype),
                            max_shard_size=ns.max_shard_size, step=ns.step, overwrite=ns.overwrite)
    except (CheckpointError, ConfigError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(out)
    return 0


if __name__ == "__main__":
    main()
