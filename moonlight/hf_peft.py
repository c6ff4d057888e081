"""LoRA/DoRA adapters in the Hugging Face PEFT format, both directions:

    save_peft_adapter(model_or_state, args, lora_cfg, "out/adapter")   # adapter_config.json + safetensors
    load_peft_adapter(model, "out/adapter")                            # into a model with apply_lora done
    apply_peft_adapter(model, "out/adapter")                           # onto a plain model, merged

`peft.PeftModel.from_pretrained(DeepseekV3ForCausalLM, dir)` loads what `save_peft_adapter` writes,
and `load_peft_adapter` reads what PEFT's `save_pretrained` writes for plain LoRA/DoRA. Native
adapters `<linear>.lora_a.weight` [r, in], `.lora_b.weight` [out, r] and DoRA `.magnitude` [out]
become `base_model.model.<HF module>.lora_A.weight`, `.lora_B.weight` and `.lora_magnitude_vector`.
Both sides scale the update by lora_alpha / r and compute DoRA's row norm the same way, so the
tensors copy across unchanged.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping

import torch
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from moonlight.config import ModelArgs
from moonlight.errors import CheckpointError
from moonlight.hf import hf_keys, open_safetensors
from moonlight.model.lora import apply_lora, is_adapter_name, lora_modules, merge_lora
from moonlight.outputs import check_replaceable, publish_mode, staged_output

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_OUTPUT = re.compile(r"^(adapter_config\.json|adapter_model\.safetensors)$")  # the files we write
_PEFT_PREFIX = "base_model.model."
# native adapter suffix -> PEFT suffix
_SUFFIXES = {
    ".lora_a.weight": ".lora_A.weight",
    ".lora_b.weight": ".lora_B.weight",
    ".magnitude": ".lora_magnitude_vector",
}


def _hf_module(native_module: str, args: ModelArgs) -> str:
    """'layers.3.attn.kv_a_proj' -> 'model.layers.3.self_attn.kv_a_proj_with_mqa'."""
    return hf_keys(f"{native_module}.weight", args)[0].removesuffix(".weight")


def peft_key(native_key: str, args: ModelArgs) -> str:
    """The PEFT file key of one native adapter tensor."""
    for ours, theirs in _SUFFIXES.items():
        if native_key.endswith(ours):
            return _PEFT_PREFIX + _hf_module(native_key.removesuffix(ours), args) + theirs
    raise CheckpointError(f"{native_key!r} is not a LoRA/DoRA adapter tensor")


def _target_modules(hf_modules: list[str], args: ModelArgs) -> list[str]:
    """PEFT matches target_modules by name suffix: the short names ('q_proj') when the adapted modules
    are exactly those names in every layer, else the full module names (each matches only itself)."""
    short = sorted({m.rsplit(".", 1)[-1] for m in hf_modules})
    every_layer = {f"model.layers.{i}.self_attn.{s}" for i in range(args.num_hidden_layers) for s in short}
    return short if set(hf_modules) == every_layer else sorted(hf_modules)


def save_peft_adapter(
    model_or_state: nn.Module | Mapping[str, torch.Tensor],
    args: ModelArgs,
    lora_cfg: Mapping,
    out_dir: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    overwrite: bool = True,
) -> str:
    """Write `adapter_config.json` and `adapter_model.safetensors` (no pickle) for the adapters of an
    unsharded model or of a full native state dict (others keys are ignored). lora_cfg holds the
    run's `rank`, `alpha`, `dora` and `dropout` (the [lora] section as a dict). Written in a
    temporary directory and renamed into place. Returns the directory."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    adapters = {k: v for k, v in state.items() if is_adapter_name(k)}
    if not adapters:
        raise CheckpointError("no LoRA/DoRA adapter tensors to export (was the run trained with [lora] enable?)")
    modules = sorted({k.removesuffix(".lora_a.weight") for k in adapters if k.endswith(".lora_a.weight")})
    rank, dora = int(lora_cfg["rank"]), bool(lora_cfg["dora"])
    for m in modules:
        needed = [f"{m}.lora_a.weight", f"{m}.lora_b.weight"] + ([f"{m}.magnitude"] if dora else [])
        missing = [k for k in needed if k not in adapters]
        if missing:
            raise CheckpointError(f"adapter tensors missing for {m}: {missing} (dora={dora})")
        if adapters[needed[0]].shape[0] != rank:
            raise CheckpointError(f"{needed[0]} has rank {adapters[needed[0]].shape[0]}, the settings say {rank}")
    if len(modules) * (3 if dora else 2) != len(adapters):
        raise CheckpointError(
            f"adapter tensors do not pair up into lora_a/lora_b{'/magnitude' if dora else ''}: {sorted(adapters)[:6]}"
        )
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": float(lora_cfg["alpha"]),
        "lora_dropout": float(lora_cfg.get("dropout", 0.0)),
        "use_dora": dora,
        "use_rslora": False,
        "fan_in_fan_out": False,
        "bias": "none",
        "target_modules": _target_modules([_hf_module(m, args) for m in modules], args),
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    tensors = {peft_key(k, args): v.detach().to("cpu").contiguous() for k, v in adapters.items()}
    out_dir = os.path.abspath(os.fspath(out_dir))
    check_replaceable(out_dir, PEFT_OUTPUT, overwrite, "a PEFT adapter")  # never delete a user's files
    with staged_output(out_dir, "the PEFT adapter", prefix=".tmp-adapter-") as tmp:
        save_file(tensors, os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(tmp, ADAPTER_CONFIG), "w") as f:
            json.dump(config, f, indent=2)
        publish_mode(tmp)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    return out_dir


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict:
    """adapter_config.json, checked to be a plain LoRA/DoRA adapter this model can hold."""
    path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(adapter_dir, ADAPTER_WEIGHTS)):
        raise CheckpointError(
            f"{adapter_dir} is not a PEFT adapter directory (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})"
        )
    try:
        with open(path) as f:
            cfg = json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{path} is not valid JSON ({e}): is the adapter complete?") from None
    if not (
        isinstance(cfg, dict) and isinstance(cfg.get("r"), int) and isinstance(cfg.get("lora_alpha"), (int, float))
    ):
        raise CheckpointError(
            f"{path} is not a PEFT LoRA config: it needs an object with an integer r and a lora_alpha"
        )
    unsupported = [
        (cfg.get("peft_type") != "LORA", f"peft_type {cfg.get('peft_type')!r} (only LORA)"),
        (bool(cfg.get("use_rslora")), "use_rslora"),
        (bool(cfg.get("fan_in_fan_out")), "fan_in_fan_out"),
        (cfg.get("bias", "none") != "none", f"bias {cfg.get('bias')!r}"),
        (bool(cfg.get("rank_pattern")) or bool(cfg.get("alpha_pattern")), "rank_pattern/alpha_pattern"),
        (bool(cfg.get("modules_to_save")), "modules_to_save"),
    ]
    bad = [what for is_bad, what in unsupported if is_bad]
    if bad:
        raise CheckpointError(f"{path}: unsupported PEFT settings {bad}; Moonlight loads plain LoRA/DoRA adapters")
    return cfg


@torch.no_grad()
def load_peft_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> dict:
    """Copy a PEFT adapter into a model whose LoRA/DoRA modules are already in place (`apply_lora`, or
    a [lora] run) with the same rank, alpha / rank and DoRA setting. Parameters may be FSDP-sharded
    DTensors: every rank reads the file and keeps its own shard. Returns the adapter config."""
    adapter_dir = os.fspath(adapter_dir)
    cfg = read_adapter_config(adapter_dir)
    args = getattr(model, "args", None)
    modules = dict(lora_modules(model))
    if args is None or not modules:
        raise CheckpointError(f"loading the adapter {adapter_dir} needs a Moonlight with LoRA modules ([lora] enable)")
    for name, m in modules.items():
        if (m.rank, m.scale, m.use_dora) != (cfg["r"], cfg["lora_alpha"] / cfg["r"], bool(cfg.get("use_dora"))):
            raise CheckpointError(
                f"{adapter_dir}: r={cfg['r']} lora_alpha={cfg['lora_alpha']} use_dora={bool(cfg.get('use_dora'))} "
                f"but the model's {name} has rank {m.rank} alpha {m.alpha:g} dora {m.use_dora}: set [lora] to match"
            )
    params = {k: p for k, p in model.named_parameters() if is_adapter_name(k)}
    wanted = {peft_key(k, args): k for k in params}
    with open_safetensors(os.path.join(adapter_dir, ADAPTER_WEIGHTS)) as f:
        found = set(f.keys())
        missing, unexpected = sorted(set(wanted) - found), sorted(found - set(wanted))
        if missing or unexpected:
            raise CheckpointError(
                f"{adapter_dir}: the adapter lacks {len(missing)} tensor(s) of this model's "
                f"[lora] targets (e.g. {missing[:3]}) and has {len(unexpected)} other(s) (e.g. "
                f"{unexpected[:3]}): set lora.targets to the adapter's target_modules "
                f"{cfg.get('target_modules')}"
            )
        for key, native in wanted.items():
            p = params[native]
            full = f.get_tensor(key)
            if tuple(full.shape) != tuple(p.shape):
                raise CheckpointError(
                    f"{adapter_dir}: {key} has shape {tuple(full.shape)}, the model needs {tuple(p.shape)}"
                )
            full = full.to(device=p.device, dtype=p.dtype)
            if isinstance(p, DTensor):  # each rank has the file: slice locally, no communication
                full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
            p.copy_(full)
    return cfg


def adapter_modules(model: nn.Module, adapter_dir: str | os.PathLike) -> list[str]:
    """The names of the model's linear modules that the adapter in `adapter_dir` adapts."""
    args = model.args
    with open_safetensors(os.path.join(adapter_dir, ADAPTER_WEIGHTS)) as f:
        found = set(f.keys())
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and peft_key(f"{n}.lora_a.weight", args) in found
    ]


@torch.no_grad()
def apply_peft_adapter(model: nn.Module, adapter_dir: str | os.PathLike, merge: bool = True) -> nn.Module:
    """Put a PEFT adapter on a plain Moonlight: LoRA/DoRA modules with the adapter's rank, alpha and
    DoRA setting on exactly the modules it adapts, its tensors loaded, and (merge=True) folded into the
    base weights so the model is a plain, faster Moonlight again. In place; returns the model."""
    adapter_dir = os.fspath(adapter_dir)
    cfg = read_adapter_config(adapter_dir)
    targets = adapter_modules(model, adapter_dir)
    if not targets:
        raise CheckpointError(
            f"{adapter_dir}: the adapter adapts no module of this model (target_modules "
            f"{cfg.get('target_modules')}): is it an adapter of this base model?"
        )
    apply_lora(model, targets, rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dora=bool(cfg.get("use_dora")))
    load_peft_adapter(model, adapter_dir)
    return merge_lora(model) if merge else model
