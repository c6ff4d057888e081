"""Whole models out of sharded runs and checkpoints: gather a live run's shards, read a DCP checkpoint
of any parallelism into one full Moonlight, fold LoRA/DoRA adapters in, and write Hugging Face format.

    sd = gather_full_state_dict(model_parts)               # every rank calls; rank 0 gets the dict
    export_hf(model_parts, "out/hf")                       # every rank calls; rank 0 writes
    model = load_dcp_model("run/checkpoint/step-40")       # one process, any saving parallelism
    save_hf_from_dcp("run/checkpoint/step-40", "out/hf")   # the same, streamed to HF format

Memory: gather_full_state_dict and load_dcp_model hold the whole model (about 32 GB for
Moonlight-16B in bf16); export_hf and save_hf_from_dcp at most one output shard plus one tensor.
"""

from __future__ import annotations

import collections
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.tensor import DTensor

from moonlight import distributed
from moonlight.checkpoint import format as fmt
from moonlight.checkpoint.state import model_args_of, model_state_dict
from moonlight.config import ModelArgs
from moonlight.dtypes import to_dtype
from moonlight.errors import CheckpointError, CheckpointSaveError
from moonlight.hf import HFCheckpoint, expected_shapes, hf_keys, progress, save_hf_stream
from moonlight.hf_peft import save_peft_adapter
from moonlight.model import Moonlight
from moonlight.model.lora import is_adapter_name, lora_scales, merge_lora_state_dict

logger = logging.getLogger(__name__)


def iter_full_tensors(
    parts: list[nn.Module], keys: Callable[[str], bool] | None = None, order: list[str] | None = None
) -> Iterator[tuple[str, torch.Tensor | None]]:
    """Full (unsharded) native tensors on CPU, one at a time: (key, tensor) at rank 0, (key, None)
    elsewhere; all ranks must consume it to its end. Each tensor is all-gathered within its mesh
    (full_tensor) and, under pipeline parallel, sent to rank 0 by the lowest rank holding it. `keys`
    selects the tensors (default: all); `order` is the order to gather in (default: sorted; keys no
    rank holds are skipped)."""
    rank = distributed.rank()
    local = {k: v for k, v in model_state_dict(parts).items() if keys is None or keys(k)}
    everyone = distributed.all_gather_object({k: (tuple(v.shape), v.dtype) for k, v in local.items()})
    owner: dict[str, int] = {}
    for r, shapes in enumerate(everyone):
        for k in shapes:
            if k not in owner or (owner[k] != 0 and r == 0):
                owner[k] = r
    dev = distributed.p2p_device()
    # one global order: each mesh's ranks call full_tensor on their shared keys in the same order
    for k in [k for k in order if k in owner] if order is not None else sorted(owner):
        src = owner[k]
        full = None
        if k in local:
            v = local[k]
            full = v.full_tensor() if isinstance(v, DTensor) else v
        if src == 0:
            yield k, full.detach().to("cpu", copy=True) if rank == 0 else None
        elif rank == src:
            torch.distributed.send(full.detach().to(dev).contiguous(), dst=0)
            yield k, None
        elif rank == 0:
            shape, dtype = everyone[src][k]
            buf = torch.empty(shape, dtype=dtype, device=dev)
            torch.distributed.recv(buf, src=src)
            yield k, buf.cpu()
        else:
            yield k, None
        del full


def gather_full_state_dict(
    parts: list[nn.Module], keys: Callable[[str], bool] | None = None
) -> dict[str, torch.Tensor] | None:
    """Full (unsharded) native state dict on CPU at rank 0 (None elsewhere); all ranks must call.
    `keys` selects the tensors to gather (default: all)."""
    out = {k: v for k, v in iter_full_tensors(parts, keys)}
    return out if distributed.rank() == 0 else None


def model_from_state_dict(
    sd: dict[str, torch.Tensor],
    args: ModelArgs,
    lora_scale: dict[str, float] | None = None,
    what: str = "the state dict",
) -> Moonlight:
    """A plain Moonlight holding `sd` (adapters in it folded into the base weights first)."""
    if lora_scale:
        sd = merge_lora_state_dict(sd, lora_scale)
    with torch.device("meta"):
        model = Moonlight(args)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in missing if k in model.state_dict()]
    if missing or unexpected:
        raise CheckpointError(f"{what} is missing {missing[:5]} / has unexpected {unexpected[:5]} for this model")
    for module in model.modules():  # non-persistent buffers (load counters) are not in checkpoints
        for name, buf in module.named_buffers(recurse=False):
            if buf.is_meta:
                setattr(module, name, torch.zeros(buf.shape, dtype=buf.dtype))
    return model


def _write_on_rank0(write: Callable[[], None], what: str, others: Callable[[], None] = lambda: None) -> None:
    """Run `write` on rank 0 (and `others` on the other ranks: their side of a collective stream);
    every rank raises if it failed there."""
    err = None
    if distributed.rank() == 0:
        try:
            write()
        except BaseException as e:
            err = e
    else:
        others()
    err_msg = distributed.broadcast_object(None if err is None else fmt.short_error(err))
    if err is not None:
        raise err
    if err_msg is not None:
        raise CheckpointSaveError(f"{what} failed on rank 0: {err_msg}")


def _adapter_keys(native: str, scales: dict[str, float]) -> list[str]:
    """The adapter tensors folded into one base weight (none if it is not adapted)."""
    name = native.removesuffix(".weight")
    if name not in scales:
        return []
    return [f"{name}.lora_a.weight", f"{name}.lora_b.weight", f"{name}.magnitude"]


def _fold_adapters(
    stream: Iterable[tuple[str, torch.Tensor | None]], scales: dict[str, float]
) -> Iterator[tuple[str, torch.Tensor | None]]:
    """A stream of native tensors in which each adapted base weight is followed by its adapters ->
    the base weights with the adapters merged (LoRA/DoRA), holding one module's tensors at a time.
    None tensors (another rank's share of a collective stream) pass through unmerged."""
    held: dict[str, torch.Tensor | None] = {}

    def merged() -> tuple[str, torch.Tensor | None]:
        (base, w), *adapters = held.items()
        if adapters and w is not None:
            name = base.removesuffix(".weight")
            w = merge_lora_state_dict(dict(held), {name: scales[name]})[base]
        held.clear()
        return base, w

    for k, t in stream:
        if held and not is_adapter_name(k):
            yield merged()
        held[k] = t
    if held:
        yield merged()


def export_hf(
    parts: list[nn.Module], path: str | os.PathLike, dtype: torch.dtype | None = None, max_shard_size: int | str = "5GB"
) -> str:
    """Write the current model in HF format (config.json + safetensors, loadable by transformers) to
    `path`, LoRA/DoRA adapters merged. All ranks call; rank 0 writes. dtype defaults to the model's
    `torch_dtype` (router biases stay fp32). Streamed: the tensors are gathered one at a time (a
    base weight with its adapters) and rank 0 holds at most one output shard plus one tensor."""
    args = model_args_of(parts)
    if args is None:
        raise CheckpointError("export_hf: the model parts carry no ModelArgs (.args)")
    path = os.path.abspath(os.fspath(path))
    dtype = dtype or to_dtype(args.torch_dtype)
    local = (
        {k: v.dtype for k, v in model_state_dict(parts).items()},
        {k: v for part in parts for k, v in lora_scales(part).items()},
    )
    dtypes, scales = {}, {}
    for d, s in distributed.all_gather_object(local):  # under PP each rank holds some stages
        dtypes.update(d)
        scales.update(s)
    specs = {k: (shape, dtypes[k]) for k, shape in expected_shapes(args).items()}
    order = [key for native in specs for key in [native] + _adapter_keys(native, scales)]
    stream = _fold_adapters(iter_full_tensors(parts, order=order), scales)

    def write():
        save_hf_stream(stream, specs, args, path, max_shard_size=max_shard_size, dtype=dtype, overwrite=True)
        logger.info("checkpoint: exported HF checkpoint to %s", path)

    _write_on_rank0(write, f"HF export to {path}", others=lambda: collections.deque(stream, maxlen=0))
    return path


def export_peft_adapter(
    parts: list[nn.Module], path: str | os.PathLike, lora_cfg: dict, base_model_name_or_path: str | None = None
) -> str:
    """Write the current LoRA/DoRA adapters (only they are gathered) as a PEFT adapter directory.
    All ranks call; rank 0 writes. lora_cfg: the [lora] section as a dict; base_model_name_or_path:
    the base model the adapter goes on (adapter_config.json's field of that name)."""
    args = model_args_of(parts)
    if args is None:
        raise CheckpointError("export_peft_adapter: the model parts carry no ModelArgs (.args)")
    path = os.path.abspath(os.fspath(path))
    sd = gather_full_state_dict(parts, keys=is_adapter_name)

    def write():
        save_peft_adapter(sd, args, lora_cfg, path, base_model_name_or_path)
        logger.info("checkpoint: exported the PEFT adapter to %s", path)

    _write_on_rank0(write, f"PEFT adapter export to {path}")
    return path


def _layer_of(key: str) -> str:
    m = re.match(r"^(?:model\.)?layers\.(\d+)\.", key)
    return m.group(1) if m else "top"


class _HFBase:
    """The frozen base weights of a checkpoint saved without them, read from an HF directory."""

    def __init__(self, path: str, args: ModelArgs):
        self.checkpoint, self.args = HFCheckpoint(path), args
        self.checkpoint.check_keys(args)

    def dtype(self, key: str) -> torch.dtype:
        return self.checkpoint.dtype(hf_keys(key, self.args)[0])

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        return {k: self.checkpoint.native(k, self.args) for k in keys}


def _frozen_weights_source(path: str, meta: dict, args: ModelArgs) -> "_HFBase | _DCPModel":
    """Where a checkpoint saved without its frozen weights (a LoRA run) keeps them: its base."""
    base = meta["frozen_weights_from"]
    if not os.path.isdir(base):
        raise CheckpointError(
            f"{path} holds only the trained weights; its frozen base weights are in {base}, "
            "which does not exist here: put the base model there, or export the adapter alone "
            "(python -m moonlight.convert dcp-to-peft)"
        )
    if os.path.isfile(os.path.join(base, fmt.DCP_METADATA)):
        return _DCPModel(base, args)
    return _HFBase(base, args)


class _DCPModel:
    """What a DCP checkpoint directory holds for one full Moonlight, checked against the config:
    native key -> (shape, dtype) of the model and adapter tensors, the key prefix, the LoRA scales.
    A LoRA run's checkpoint saved without its frozen weights reads them from its base directory."""

    def __init__(self, path: str, args: ModelArgs | None = None, hint: str = ""):
        meta = fmt.read_meta(path) if os.path.exists(os.path.join(path, fmt.META)) else {}
        args = args or fmt.model_args_from_meta(meta)
        if args is None:
            raise CheckpointError(
                f"{path} has no meta.json with model args: pass --config config.json or --model-preset"
            )
        hint = hint or " (a different model config?)"
        md = fmt.stored_tensors(path)
        prefix = "model." if any(k.startswith("model.") for k in md) else ""
        shapes = expected_shapes(args)
        missing = [k for k in shapes if prefix + k not in md]
        self.base = _frozen_weights_source(path, meta, args) if missing and meta.get("frozen_weights_from") else None
        self.from_base = set(missing) if self.base is not None else set()
        if missing and self.base is None:
            raise CheckpointError(
                f"{path} lacks {len(missing)} model tensor(s) this config needs, e.g. {missing[:5]}" + hint
            )
        # LoRA/DoRA runs store adapters beside the frozen base weights: read them too and merge
        adapters = [k[len(prefix) :] for k in md if k.startswith(prefix) and is_adapter_name(k[len(prefix) :])]
        lora = fmt.saved_lora(meta)
        if adapters and not lora:
            raise CheckpointError(
                f"{path} holds LoRA adapters (e.g. {adapters[0]}) but its meta.json has no "
                "[lora] settings, so their scale alpha / rank is unknown"
            )
        self.path, self.args, self.prefix = path, args, prefix
        self.specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for k in list(shapes) + adapters:
            if k in self.from_base:
                self.specs[k] = (tuple(shapes[k]), self.base.dtype(k))
                continue
            m: Any = md[prefix + k]
            if not isinstance(m, TensorStorageMetadata):
                raise CheckpointError(f"{path}: {prefix + k} is not a tensor")
            expected = tuple(shapes.get(k, m.size))
            if tuple(m.size) != expected:
                raise CheckpointError(f"{path}: {k} has shape {tuple(m.size)} but the config needs {expected}" + hint)
            self.specs[k] = (tuple(m.size), m.properties.dtype)
        modules = {k.removesuffix(".lora_a.weight") for k in adapters if k.endswith(".lora_a.weight")}
        self.scales = {name: lora["alpha"] / lora["rank"] for name in modules}
        self.model_specs = {k: self.specs[k] for k in shapes}

    def dtype(self, key: str) -> torch.dtype:
        return self.specs[key][1]

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """These tensors (native keys), read in one DCP load (frozen ones from the base)."""
        sd = {k: torch.empty(self.specs[k][0], dtype=self.specs[k][1]) for k in keys if k not in self.from_base}
        if sd:
            fmt.dcp_load({self.prefix + k: v for k, v in sd.items()}, self.path)
        frozen = [k for k in keys if k in self.from_base]
        if frozen:
            sd.update(self.base.read(frozen))
        for k in frozen:
            if tuple(sd[k].shape) != self.specs[k][0]:
                raise CheckpointError(
                    f"{k} in the base weights has shape {tuple(sd[k].shape)}, the checkpoint's "
                    f"model needs {self.specs[k][0]}"
                )
        return sd

    def stream(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The model's native tensors in order, adapters merged, read one tensor at a time."""
        order = [
            key
            for native in self.model_specs
            for key in [native] + [k for k in _adapter_keys(native, self.scales) if k in self.specs]
        ]
        with progress(len(order), "converting DCP tensors") as bar:
            for key in order:
                yield key, self.read([key])[key]
                bar.update(1)


def load_dcp_model(path: str, args: ModelArgs | None = None, hint: str = "") -> Moonlight:
    """One full Moonlight from a DCP checkpoint directory (a trainer checkpoint of any parallelism and
    number of ranks, or an hf-to-dcp output), LoRA/DoRA adapters merged. `args` defaults to the
    model args in its meta.json. Reads one layer at a time, so a bar moves while it loads."""
    ckpt = _DCPModel(path, args, hint)
    groups: dict[str, list[str]] = {}
    for k in ckpt.specs:
        groups.setdefault(_layer_of(k), []).append(k)
    sd: dict[str, torch.Tensor] = {}
    with progress(len(ckpt.specs), "reading DCP tensors") as bar:
        for keys in groups.values():  # one DCP read per layer: bounded metadata re-reads, a moving bar
            sd.update(ckpt.read(keys))
            bar.update(len(keys))
    return model_from_state_dict(sd, ckpt.args, ckpt.scales, what=path)


def save_hf_from_dcp(
    path: str,
    out: str,
    args: ModelArgs | None = None,
    hint: str = "",
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
) -> str:
    """`save_hf(load_dcp_model(path, args), out, ...)` without the whole model in memory: the shards
    are planned from the DCP metadata and filled one tensor at a time (adapters merged per module),
    so at most one output shard plus one tensor (an adapted weight: with its adapters) is held."""
    ckpt = _DCPModel(path, args, hint)
    save_hf_stream(
        _fold_adapters(ckpt.stream(), ckpt.scales),
        ckpt.model_specs,
        ckpt.args,
        out,
        max_shard_size=max_shard_size,
        dtype=dtype,
        overwrite=overwrite,
    )
    return os.path.abspath(out)


def load_dcp_adapters(path: str) -> tuple[dict[str, torch.Tensor], ModelArgs, dict]:
    """The LoRA/DoRA adapter tensors of a trainer checkpoint directory (full tensors, any saving
    parallelism; the base weights are not read), its model args and its [lora] settings (meta.json)."""
    meta = fmt.read_meta(path)
    args = fmt.model_args_from_meta(meta)
    lora = fmt.saved_lora(meta)
    if args is None or not lora:
        raise CheckpointError(
            f"{path} is not a LoRA/DoRA run's checkpoint: its meta.json has no "
            f"{'model args' if args is None else '[lora] settings'}"
        )
    md = fmt.stored_tensors(path)
    prefix = "model." if any(k.startswith("model.") for k in md) else ""
    keys = [k for k in md if k.startswith(prefix) and is_adapter_name(k[len(prefix) :])]
    if not keys:
        raise CheckpointError(f"{path} holds no adapter tensors (<linear>.lora_a.weight ...)")
    state = {k: torch.empty(tuple(md[k].size), dtype=md[k].properties.dtype) for k in keys}
    fmt.dcp_load(state, path)
    return {k[len(prefix) :]: v for k, v in state.items()}, args, lora
