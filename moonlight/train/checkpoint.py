"""Training checkpoints: atomic DCP saves, resume (also onto another parallel layout), HF import/export.

Built by the trainer once the model parts, optimizers, schedulers and data loader exist:

    ckpt = Checkpointer(cfg.checkpoint, cfg.job.dump_folder, model_parts, optimizers, lr_schedulers,
                        dataloader, extra_states={"metrics": ...}, layout={"dp_shard": 2, "tp": 2, ...})
    start = ckpt.load(cfg.checkpoint.load_step)   # 0 = nothing to resume (fresh run)
    if start == 0:
        ckpt.maybe_initial_load_hf()              # checkpoint.initial_load_hf, only for a fresh run
    for step in range(start + 1, steps + 1):
        ...train step...
        ckpt.save(step)                           # saves when step % interval == 0
    ckpt.save(steps, force=True)                  # final save (+ HF export when export_hf = "end")

Every rank calls every method (they contain collectives); `load`/`save` work without a process
group too (one process).

On-disk layout, `<dump_folder>/<checkpoint.folder>/`:

    step-40/                      a COMPLETE checkpoint (only directories named step-N holding
      .metadata, __R_0.distcp     COMPLETE count; "latest" = highest such N, never a symlink)
        torch.distributed.checkpoint (DCP) of {"model": ..., "optimizer": ...}; keys are global
        FQNs: "model.layers.3.attn.q_proj.weight", "optimizer.state.layers.3.attn.q_proj.weight.
        exp_avg", "optimizer.param_groups.<fqn>.lr" (flattened per parameter, so the optimizer
        state reshards across tp/ep/pp/dp layouts and param-group splits).
      train_state.pt              rank 0: step, data-loader position (global sequences consumed,
                                  identical on every rank), lr-scheduler positions
      rank-R.pt                   per rank: RNG states (torch CPU, CUDA, python, numpy) + extra_states
      meta.json                   sidecar: model args, step, contents, world size/layout, torch version
      COMPLETE                    written (and fsync'd) by rank 0 after every rank finished
    step-50.tmp/                  a save in progress or interrupted: ignored by load, removed at the
                                  next save
    <dump_folder>/hf/step-N/      HF exports (config.json + safetensors), see `export_hf`

A save writes `step-N.tmp`, all ranks barrier, rank 0 writes meta.json/train_state.pt and the fsync'd
COMPLETE marker, renames `step-N.tmp` -> `step-N` and fsyncs the folder; only then are checkpoints
beyond `keep_latest_k` deleted. A kill at any point leaves the previous checkpoint the latest one; a
failed write (e.g. disk full) removes the partial directory and raises `CheckpointSaveError`.

Model-only checkpoints (`python -m moonlight.convert hf-to-dcp`) use the same layout with
meta.json "contents": ["model"] and only "model.*" keys: `load` restores just the weights from them
(and returns their step, 0), and `checkpoint.initial_load_hf` accepts such a directory as well as an
HF directory.

Router expert biases (`Router.expert_bias`) are persistent buffers, so they are part of the model
state; the per-step load counters (`MoE.tokens_per_expert`) are not saved (reset every step).
Plain (non-DTensor) tensors are replicated: DCP stores one rank's copy, and a save logs an error if
the ranks' copies differ. Before writing, a save refuses non-finite parameters (CheckpointSaveError).
Loading checks meta.json's model args against this run (ignoring IGNORED_ARG_FIELDS), and the DCP
keys against what this run needs (e.g. optimizer changed adamw <-> muon), before reading anything.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import json
import logging
import os
import random
import re
import shutil
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from moonlight.config import ModelArgs
from moonlight.errors import CheckpointError, CheckpointSaveError

logger = logging.getLogger(__name__)

__all__ = [
    "Checkpointer",
    "CheckpointError",
    "CheckpointSaveError",
    "FORMAT",
    "list_checkpoints",
    "resolve_checkpoint",
    "read_meta",
    "write_model_only_checkpoint",
    "load_hf_into_parts",
    "model_args_mismatch",
]

FORMAT = "moonlight-dcp"
FORMAT_VERSION = 1
MARKER = "COMPLETE"
META = "meta.json"
TRAIN_STATE = "train_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# ModelArgs fields that may differ between the saving and the resuming run (implementation or
# training knobs that change neither the shapes nor the function of the saved weights).
IGNORED_ARG_FIELDS = ("kernels", "torch_dtype", "initializer_range", "aux_loss_alpha", "seq_aux")
_OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


# ---------------------------------------------------------------------------------- collectives


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist_on() else 0


def _world() -> int:
    return dist.get_world_size() if _dist_on() else 1


def _barrier() -> None:
    if _dist_on():
        dist.barrier()


def _all_gather_object(obj: Any) -> list[Any]:
    if not _dist_on():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _broadcast_object(obj: Any, src: int = 0) -> Any:
    if not _dist_on():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _dcp_save(state: dict, path: str) -> None:
    with warnings.catch_warnings():  # "torch.distributed is disabled ... single process" is our intent
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        dcp.save(state, checkpoint_id=path, no_dist=not _dist_on())


def _dcp_load(state: dict, path: str) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        dcp.load(state, checkpoint_id=path, no_dist=not _dist_on())


def _p2p_device() -> torch.device:
    if _dist_on() and "nccl" in str(dist.get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ------------------------------------------------------------------------------- file helpers


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        _fsync_file(path)
    except OSError:  # some filesystems do not allow fsync on directories
        pass


def _write_durable(path: str, write) -> None:
    """write(f) into path, flushed and fsync'd."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _torch_save_durable(obj: Any, path: str) -> None:
    _write_durable(path, lambda f: torch.save(obj, f))


def _json_durable(obj: Any, path: str) -> None:
    _write_durable(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True).encode()))


def _is_disk_full(exc: BaseException | None) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(exc):
            return True
        failures = getattr(exc, "failures", None)
        if isinstance(failures, dict):
            if any(_is_disk_full(f[0] if isinstance(f, tuple) else f) for f in failures.values()):
                return True
        exc = exc.__cause__ or exc.__context__
    return False


def _short_error(exc: BaseException) -> str:
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        parts = []
        for rank, f in failures.items():
            inner = f[0] if isinstance(f, tuple) else f
            parts.append(f"rank {rank}: {type(inner).__name__}: {inner}")
        return "; ".join(parts)
    return f"{type(exc).__name__}: {exc}"


# ------------------------------------------------------------------------- checkpoint folders


def list_checkpoints(folder: str | os.PathLike) -> dict[int, str]:
    """step -> path of every COMPLETE checkpoint directory in folder (step-N with the marker and DCP
    metadata); temp and partial directories are left out."""
    folder = os.fspath(folder)
    out: dict[int, str] = {}
    if not os.path.isdir(folder):
        return out
    for name in os.listdir(folder):
        m = _STEP_DIR.match(name)
        path = os.path.join(folder, name)
        if m and _is_complete(path):
            out[int(m.group(1))] = path
    return dict(sorted(out.items()))


def _is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER)) and os.path.isfile(os.path.join(path, ".metadata"))


def _incomplete_entries(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    out = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.endswith(".tmp") or (_STEP_DIR.match(name) and not _is_complete(path)):
            out.append(name)
    return out


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    return _is_complete(os.fspath(path))


def resolve_checkpoint(path: str | os.PathLike, step: int = -1) -> str:
    """A checkpoint directory from either the directory itself or a folder of step-N directories
    (the latest complete one, or `step`). Raises CheckpointError naming what is wrong."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint path {path} is not a directory")
    if _is_complete(path) and step < 0:
        return path
    if os.path.isfile(os.path.join(path, ".metadata")) and not os.path.isfile(os.path.join(path, MARKER)):
        raise CheckpointError(f"checkpoint {path} is incomplete (no {MARKER} marker): its save was interrupted "
                              "or is still running")
    found = list_checkpoints(path)
    if not found:
        partial = _incomplete_entries(path)
        hint = f" (incomplete saves ignored: {partial})" if partial else ""
        raise CheckpointError(f"no complete checkpoint (step-N directory with {MARKER} and .metadata) in {path}{hint}")
    if step < 0:
        return found[max(found)]
    if step not in found:
        raise CheckpointError(f"checkpoint step {step} not found in {path}; available steps: {sorted(found)}")
    return found[step]


def read_meta(path: str) -> dict[str, Any]:
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{path} has no {META}: not a checkpoint written by moonlight "
                              "(the trainer or `python -m moonlight.convert hf-to-dcp`)")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {meta_path}: {e}") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: format {meta.get('format')!r} is not {FORMAT!r}")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: format_version {meta['format_version']} is newer than this code "
                              f"({FORMAT_VERSION}); update moonlight")
    return meta


def model_args_mismatch(saved: dict[str, Any], current: ModelArgs, ignore=IGNORED_ARG_FIELDS,
                        this: str = "this run") -> list[str]:
    """'field=saved vs current' for every model-args field that differs (ignoring `ignore`)."""
    cur = dataclasses.asdict(current)
    out = []
    for key in sorted(set(saved) | set(cur)):
        if key in ignore:
            continue
        if key not in cur:
            out.append(f"{key}={saved[key]!r} (unknown to this version)")
        elif key not in saved:
            continue  # a field added after the checkpoint was written: its default applies
        elif saved[key] != cur[key]:
            out.append(f"{key}={saved[key]!r} but {this} has {key}={cur[key]!r}")
    return out


def _check_args(path: str, meta: dict, args: ModelArgs | None) -> None:
    if args is None or "model_args" not in meta:
        return
    diffs = model_args_mismatch(meta["model_args"], args)
    if diffs:
        name = os.path.basename(os.path.normpath(path))
        raise CheckpointError(f"checkpoint {name} ({path}) was saved for a different model: it was saved for "
                              + "; ".join(diffs)
                              + ". Use the model config it was saved with, or start from its HF export.")


def _base_meta(step: int, args: ModelArgs | None, contents: list[str], layout: dict | None = None) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "contents": contents,
        "model_args": dataclasses.asdict(args) if args is not None else None,
        "world_size": _world(),
        "layout": layout or {},
        "torch_version": torch.__version__,
        "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _finalize_dir(tmp: str, final: str) -> None:
    """Write the fsync'd marker into tmp, then atomically rename tmp -> final (rank 0 only)."""
    for name in os.listdir(tmp):
        p = os.path.join(tmp, name)
        if os.path.isfile(p):
            _fsync_file(p)
    _json_durable({"complete": True, "files": sorted(os.listdir(tmp))}, os.path.join(tmp, MARKER))
    _fsync_dir(tmp)
    parent = os.path.dirname(final)
    old = None
    if os.path.exists(final):  # re-saving a step: move the old one out of the way first
        old = final + ".replaced.tmp"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(parent)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def write_model_only_checkpoint(state_dict: dict[str, torch.Tensor], out: str | os.PathLike, args: ModelArgs,
                                step: int = 0, overwrite: bool = False, extra_meta: dict | None = None) -> str:
    """A single-process, model-only checkpoint in the trainer's layout ("model." + native key), written
    atomically (out.tmp -> out). Loadable by `Checkpointer.load` and `dcp-to-hf`."""
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        _dcp_save({f"model.{k}": v for k, v in state_dict.items()}, tmp)
        meta = _base_meta(step, args, ["model"])
        meta["world_size"] = 1
        meta.update(extra_meta or {})
        _json_durable(meta, os.path.join(tmp, META))
        if os.path.isdir(out) and not os.listdir(out):
            os.rmdir(out)
        _finalize_dir(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_disk_full(e):
            raise CheckpointSaveError(f"writing checkpoint {out} failed: disk full ({_short_error(e)})") from e
        raise
    return out


# ------------------------------------------------------------------------------ model parts


def _unwrap(m: nn.Module) -> nn.Module:
    return getattr(m, "_orig_mod", m)


def _model_args(parts: list[nn.Module]) -> ModelArgs | None:
    for p in parts:
        args = getattr(_unwrap(p), "args", None)
        if isinstance(args, ModelArgs):
            return args
    return None


class _Merged(nn.Module):
    """A view of several pipeline model parts as one module with global FQNs (parts keep global layer
    keys, "layers.N", so their trees merge without collisions). Only used to name parameters for DCP's
    state-dict helpers when one optimizer spans several parts."""


def _merge_into(dst: nn.Module, src: nn.Module, where: str) -> None:
    for name, p in src._parameters.items():
        if p is None:
            continue
        if name in dst._parameters and dst._parameters[name] is not p:
            raise CheckpointError(f"model parts both hold parameter {where}{name}")
        dst._parameters[name] = p
    for name, b in src._buffers.items():
        if b is None:
            continue
        if name in dst._buffers and dst._buffers[name] is not b:
            raise CheckpointError(f"model parts both hold buffer {where}{name}")
        dst._buffers[name] = b
        if name in src._non_persistent_buffers_set:
            dst._non_persistent_buffers_set.add(name)
    for name, child in src._modules.items():
        if child is None:
            continue
        cur = dst._modules.get(name)
        if cur is None:
            dst._modules[name] = child
        elif cur is not child:
            if not isinstance(cur, _Merged):
                node = _Merged()
                _merge_into(node, cur, f"{where}{name}.")
                dst._modules[name] = cur = node
            _merge_into(cur, child, f"{where}{name}.")


def merge_model_parts(parts: list[nn.Module]) -> nn.Module:
    if len(parts) == 1:
        return parts[0]
    root = _Merged()
    for p in parts:
        _merge_into(root, p, "")
    return root


def _flatten_optimizers(o: Any) -> list[torch.optim.Optimizer]:
    if o is None:
        return []
    if isinstance(o, torch.optim.Optimizer):
        return [o]
    if hasattr(o, "optimizers"):
        return _flatten_optimizers(list(o.optimizers))
    if isinstance(o, Iterable):
        return [x for item in o for x in _flatten_optimizers(item)]
    raise TypeError(f"not an optimizer or a container of optimizers: {type(o).__name__}")


def _flatten_schedulers(s: Any) -> list[Any]:
    if s is None:
        return []
    if hasattr(s, "schedulers"):
        return _flatten_schedulers(list(s.schedulers))
    if hasattr(s, "last_epoch") and hasattr(s, "state_dict"):
        return [s]
    if isinstance(s, Iterable):
        return [x for item in s for x in _flatten_schedulers(item)]
    raise TypeError(f"not an lr scheduler or a container of them: {type(s).__name__}")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


# ------------------------------------------------------------------------------------ RNG


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ------------------------------------------------------------------------------- HF loading


def load_hf_into_parts(parts: list[nn.Module], path: str | os.PathLike) -> None:
    """Copy an HF checkpoint into (possibly sharded) model parts in place, each rank reading only the
    slices its shards hold (`moonlight.parallel.load.load_hf_sharded`)."""
    from moonlight.convert import HFCheckpoint
    from moonlight.parallel.load import load_hf_sharded

    checkpoint = HFCheckpoint(path)
    for part in parts:
        load_hf_sharded(part, checkpoint=checkpoint)


# ----------------------------------------------------------------------------------- Checkpointer


class Checkpointer:
    """Save/resume everything a run needs; see the module docstring for the protocol and layout.

    cfg: a `CheckpointSection` (enable, interval, keep_latest_k, folder, load_step, initial_load_hf,
    export_hf). model_parts: this rank's model part(s) (one, or one per local pipeline stage).
    optimizers: an `Optimizers` container, a list of them, or plain optimizers. lr_schedulers: an
    `LRSchedulers` (or list). dataloader: anything with state_dict/load_state_dict whose state is the
    same on every rank (saved once, by rank 0). extra_states: name -> object with
    state_dict/load_state_dict, saved per rank (on load: this rank's, else rank 0's).
    layout: optional dict describing the parallel layout, recorded in meta.json.
    """

    def __init__(self, cfg, dump_folder: str | os.PathLike, model_parts: list[nn.Module] | nn.Module,
                 optimizers=None, lr_schedulers=None, dataloader=None, extra_states: dict[str, Any] | None = None,
                 layout: dict | None = None, check_finite: bool = True):
        self.cfg = cfg
        self.dump_folder = os.path.abspath(os.fspath(dump_folder))
        self.folder = os.path.join(self.dump_folder, cfg.folder)
        self.model_parts = [model_parts] if isinstance(model_parts, nn.Module) else list(model_parts)
        self.optimizers = optimizers
        self.lr_schedulers = lr_schedulers
        self.dataloader = dataloader
        self.extra_states = dict(extra_states or {})
        self.layout = dict(layout or {})
        self.check_finite = check_finite
        self.args = _model_args(self.model_parts)
        self._model = merge_model_parts(self.model_parts)
        self._optim_list = _flatten_optimizers(optimizers)
        self._sched_list = _flatten_schedulers(lr_schedulers)
        self.last_saved_step: int | None = None
        self.last_exported_step: int | None = None

    # ------------------------------------------------------------------------------- state
    def _model_sd(self) -> dict[str, Any]:
        sd: dict[str, Any] = {}
        for part in self.model_parts:
            sd.update(get_model_state_dict(part))
        return sd

    def _optim_sd(self) -> dict[str, Any]:
        if not self._optim_list:
            return {}
        return get_optimizer_state_dict(self._model, self._optim_list, options=_OPTIM_OPTIONS)

    def _train_state(self, step: int) -> dict[str, Any]:
        return {
            "step": int(step),
            "dataloader": self.dataloader.state_dict() if self.dataloader is not None else None,
            "lr_schedulers": [{"last_epoch": s.last_epoch, "_step_count": getattr(s, "_step_count", None),
                               "last_lr": list(getattr(s, "_last_lr", []) or [])} for s in self._sched_list],
        }

    def _rank_state(self) -> dict[str, Any]:
        return {"rng": _rng_state(), "extra": {k: v.state_dict() for k, v in self.extra_states.items()}}

    def _warn_diverged_replicas(self, sd: dict[str, Any]) -> None:
        """Plain (non-DTensor) tensors are saved from one rank only (DCP deduplicates by key): warn when
        ranks disagree on them, e.g. router biases updated from loads that were not all-reduced."""
        if _world() == 1:
            return
        sums = {k: (float(v.double().sum()), float(v.double().abs().sum())) for k, v in sd.items()
                if isinstance(v, torch.Tensor) and not hasattr(v, "to_local")}
        seen: dict[str, tuple] = {}
        bad = set()
        for theirs in _all_gather_object(sums):
            for k, v in theirs.items():
                if seen.setdefault(k, v) != v:
                    bad.add(k)
        if bad and _rank() == 0:
            logger.error("checkpoint: replicated tensors differ across ranks; rank 0's copy is saved: %s",
                         sorted(bad)[:10])

    def _nonfinite_params(self) -> list[str]:
        names, flags = [], []
        for part in self.model_parts:
            for name, p in part.named_parameters():
                local = _local(p.detach())
                if local.numel() and local.is_floating_point():
                    names.append(name)
                    flags.append(torch.isfinite(local).all())
        if not flags:
            return []
        ok = torch.stack(flags).cpu()
        return [n for n, good in zip(names, ok.tolist()) if not good]

    # -------------------------------------------------------------------------------- save
    def _due(self, step: int, force: bool) -> bool:
        return force or (step > 0 and step % self.cfg.interval == 0)

    def save(self, step: int, force: bool = False, final: bool | None = None) -> bool:
        """Save when `step % interval == 0` or `force` (and checkpointing is enabled); `final`
        (default: force) marks the end of training for `export_hf = "end"`. Returns whether a
        checkpoint was written. Raises CheckpointSaveError if the write failed on any rank."""
        final = force if final is None else final
        saved = False
        if self.cfg.enable and self._due(step, force) and self.last_saved_step != step:
            self._save(step)
            saved = True
        export = getattr(self.cfg, "export_hf", "")
        if (export == "each" and saved) or (export in ("each", "end") and final):
            if self.last_exported_step != step:
                self.export_hf(step)
        return saved

    def _save(self, step: int) -> None:
        rank = _rank()
        final_dir = os.path.join(self.folder, f"step-{step}")
        tmp = final_dir + ".tmp"
        if self.check_finite:
            bad = [n for names in _all_gather_object(self._nonfinite_params()) for n in names]
            if bad:
                raise CheckpointSaveError(
                    f"refusing to save checkpoint {final_dir}: non-finite values in {len(set(bad))} parameter(s), "
                    f"e.g. {sorted(set(bad))[:5]}; the previous checkpoint stays the latest")
        prep_err = None
        if rank == 0:
            try:
                os.makedirs(self.folder, exist_ok=True)
                for name in _incomplete_entries(self.folder):
                    path = os.path.join(self.folder, name)
                    if name.endswith(".tmp"):  # leftovers of interrupted saves (ours): remove
                        logger.warning("checkpoint: removing incomplete save %s", path)
                        shutil.rmtree(path, ignore_errors=True)
                    else:  # step-N without a marker: not ours to delete (being copied in by hand?)
                        logger.warning("checkpoint: ignoring %s (no %s marker)", path, MARKER)
                os.makedirs(tmp)
            except OSError as e:
                prep_err = f"{type(e).__name__}: {e}"
        prep_err = _broadcast_object(prep_err)
        if prep_err:
            raise CheckpointSaveError(f"saving checkpoint {final_dir} failed: cannot create {tmp}: {prep_err}"
                                      + (" (disk full)" if "No space left" in prep_err else ""))

        # phase 1: every rank writes its shards and its rank file
        err: str | None = None
        disk_full = False
        try:
            state = {"model": self._model_sd()}
            self._warn_diverged_replicas(state["model"])
            if self._optim_list:
                state["optimizer"] = self._optim_sd()
            _dcp_save(state, tmp)
            _torch_save_durable(self._rank_state(), os.path.join(tmp, f"rank-{rank}.pt"))
        except (KeyboardInterrupt, SystemExit):
            raise  # the temp directory stays behind, ignored by load and removed by the next save
        except BaseException as e:  # DCP raises CheckpointException (a BaseException) on any rank's failure
            err, disk_full = _short_error(e), _is_disk_full(e)
        errors = [x for x in _all_gather_object((rank, err, disk_full)) if x[1] is not None]

        # phase 2: rank 0 writes the sidecars and the marker, then renames into place
        if not errors and rank == 0:
            try:
                _torch_save_durable(self._train_state(step), os.path.join(tmp, TRAIN_STATE))
                meta = _base_meta(step, self.args, ["model"] + (["optimizer"] if self._optim_list else [])
                                  + ["train_state", "rng"] + (["extra"] if self.extra_states else []), self.layout)
                _json_durable(meta, os.path.join(tmp, META))
                _finalize_dir(tmp, final_dir)
            except BaseException as e:
                errors = [(0, _short_error(e), _is_disk_full(e))]
        errors = _broadcast_object(errors)
        if errors:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            _barrier()
            full = any(d for _, _, d in errors)
            what = "disk full" if full else "write error"
            detail = "; ".join(f"rank {r}: {m}" for r, m, _ in errors)
            prev = list_checkpoints(self.folder)
            keep = f"the previous checkpoint step-{max(prev)} is intact" if prev else "no earlier checkpoint exists"
            raise CheckpointSaveError(f"saving checkpoint {final_dir} failed ({what}): {detail}; the partial "
                                      f"directory was removed and {keep}")
        _barrier()
        self.last_saved_step = step
        if rank == 0:
            logger.info("checkpoint: saved step %d to %s", step, final_dir)
            self._purge(step)
        _barrier()

    def _purge(self, step: int) -> None:
        found = list_checkpoints(self.folder)
        later = [s for s in found if s > step]
        if later:
            logger.warning("checkpoint: %s hold(s) later steps %s than this run's step %d (from an abandoned run?); "
                           "a resume with load_step=-1 picks the highest step", self.folder, later, step)
        k = self.cfg.keep_latest_k
        if k <= 0:
            return
        for s in sorted(found)[:-k]:
            if s == step:
                continue
            logger.info("checkpoint: deleting step-%d (keep_latest_k=%d)", s, k)
            shutil.rmtree(found[s], ignore_errors=True)

    # -------------------------------------------------------------------------------- load
    def available_steps(self) -> list[int]:
        return sorted(_broadcast_object(list(list_checkpoints(self.folder)) if _rank() == 0 else None))

    def load(self, step: int = -1) -> int:
        """Restore checkpoint `step` (-1: the latest complete one) of this run's folder; returns the
        restored step, 0 when there is nothing to resume. A requested step that does not exist, an
        incomplete or foreign checkpoint, or one saved for another model raises CheckpointError."""
        if not self.cfg.enable and step < 0:
            return 0
        found = self.available_steps()
        if step < 0:
            if not found:
                partial = _incomplete_entries(self.folder) if _rank() == 0 else []
                if partial:
                    logger.warning("checkpoint: ignoring incomplete saves %s in %s", partial, self.folder)
                return 0
            step = max(found)
        elif step not in found:
            tmp = os.path.join(self.folder, f"step-{step}.tmp")
            raw = os.path.join(self.folder, f"step-{step}")
            why = (f" (step-{step}.tmp is an incomplete save)" if os.path.exists(tmp) else
                   f" (step-{step} is incomplete: no {MARKER} marker)" if os.path.isdir(raw) else "")
            raise CheckpointError(f"checkpoint step {step} not found in {self.folder}{why}; available steps: "
                                  f"{found if found else 'none'}")
        return self.load_path(os.path.join(self.folder, f"step-{step}"))

    def load_path(self, path: str | os.PathLike) -> int:
        """Restore from a checkpoint directory (a full trainer checkpoint, or a model-only one)."""
        path = os.path.abspath(os.fspath(path))
        if not _is_complete(path):
            if not os.path.isdir(path):
                raise CheckpointError(f"checkpoint {path} does not exist")
            raise CheckpointError(f"checkpoint {path} is incomplete (no {MARKER} marker or .metadata): "
                                  "its save was interrupted")
        meta = read_meta(path)
        _check_args(path, meta, self.args)
        contents = meta.get("contents", ["model"])
        model_sd = self._model_sd()
        state: dict[str, Any] = {"model": model_sd}
        with_optim = "optimizer" in contents and bool(self._optim_list)
        if with_optim:
            state["optimizer"] = self._optim_sd()
        self._check_keys(path, state)
        _dcp_load(state, path)
        self._set_model(state["model"])
        if with_optim:
            set_optimizer_state_dict(self._model, self._optim_list, state["optimizer"], options=_OPTIM_OPTIONS)
        step = int(meta.get("step", 0))
        if "train_state" in contents:
            self._load_train_state(path)
        if "rng" in contents or "extra" in contents:
            self._load_rank_state(path, meta)
        self.last_saved_step = step
        if _rank() == 0:
            logger.info("checkpoint: restored %s (%s) at step %d", path, ", ".join(contents), step)
        return step

    def _check_keys(self, path: str, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint import FileSystemReader

        stored = set(FileSystemReader(path).read_metadata().state_dict_metadata)
        for top, sub in state.items():
            want = {f"{top}.{k}" for k in sub}
            missing = sorted(want - stored)
            if missing:
                hint = (" (was the optimizer changed, e.g. adamw <-> muon?)" if top == "optimizer"
                        else " (a different model?)")
                raise CheckpointError(f"checkpoint {path} lacks {len(missing)} {top} entr(ies) this run needs, e.g. "
                                      f"{[m[len(top) + 1:] for m in missing[:5]]}{hint}")

    def _load_train_state(self, path: str) -> None:
        ts = torch.load(os.path.join(path, TRAIN_STATE), weights_only=False)
        if self.dataloader is not None and ts.get("dataloader") is not None:
            self.dataloader.load_state_dict(ts["dataloader"])
        saved = ts.get("lr_schedulers") or []
        if self._sched_list and saved:
            # The schedule is a function of the step: restore the position and recompute this run's lrs
            # (param groups may be split differently under another layout).
            for s in self._sched_list:
                s.last_epoch = saved[0]["last_epoch"]
                if saved[0].get("_step_count") is not None:
                    s._step_count = saved[0]["_step_count"]
                if hasattr(s, "get_lr") and hasattr(s, "base_lrs"):
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        lrs = s.get_lr()
                    for group, lr in zip(s.optimizer.param_groups, lrs):
                        group["lr"] = lr
                    s._last_lr = [g["lr"] for g in s.optimizer.param_groups]

    def _load_rank_state(self, path: str, meta: dict) -> None:
        rank = _rank()
        own = os.path.join(path, f"rank-{rank}.pt")
        src = own if os.path.exists(own) else os.path.join(path, "rank-0.pt")
        if not os.path.exists(src):
            return
        rs = torch.load(src, weights_only=False)
        if src == own:
            _set_rng_state(rs["rng"])
        elif rank == 0 or meta.get("world_size") != _world():
            logger.warning("checkpoint: %s was saved by %s ranks, this run has %d: RNG states not restored on rank %d",
                           path, meta.get("world_size"), _world(), rank)
        for name, obj in self.extra_states.items():
            if name in rs.get("extra", {}):
                obj.load_state_dict(rs["extra"][name])

    # ------------------------------------------------------------------------ initial HF load
    def maybe_initial_load_hf(self) -> bool:
        """Load `cfg.initial_load_hf` (an HF directory, or a model-only checkpoint from hf-to-dcp) into the
        model when this run has no checkpoint yet. Returns whether it loaded."""
        path = getattr(self.cfg, "initial_load_hf", "")
        if not path:
            return False
        if self.cfg.enable and self.available_steps():
            return False
        path = os.path.abspath(os.path.expanduser(path))
        if not os.path.isdir(path):
            raise CheckpointError(f"checkpoint.initial_load_hf={path} does not exist or is not a directory")
        if os.path.isfile(os.path.join(path, ".metadata")):  # a DCP (hf-to-dcp output): weights only
            self._load_model_only(path)
        else:
            load_hf_into_parts(self.model_parts, path)
        if _rank() == 0:
            logger.info("checkpoint: initialised the model from %s", path)
        return True

    def _load_model_only(self, path: str) -> None:
        if not _is_complete(path):
            raise CheckpointError(f"checkpoint {path} is incomplete (no {MARKER} marker): its save was interrupted")
        meta = read_meta(path)
        _check_args(path, meta, self.args)
        state = {"model": self._model_sd()}
        self._check_keys(path, state)
        _dcp_load(state, path)
        self._set_model(state["model"])

    def _set_model(self, sd: dict[str, Any]) -> None:
        for part in self.model_parts:
            keys = set(get_model_state_dict(part))
            set_model_state_dict(part, {k: v for k, v in sd.items() if k in keys})

    # ------------------------------------------------------------------------------- HF export
    def gather_full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full (unsharded) native state dict on CPU at rank 0 (None elsewhere); all ranks must call.
        Each tensor is all-gathered within its mesh (full_tensor) and, under pipeline parallel, sent
        to rank 0 by the lowest rank holding it. Memory: the whole model on rank 0's CPU."""
        from torch.distributed.tensor import DTensor

        rank = _rank()
        local = self._model_sd()
        meta = {k: (tuple(v.shape), v.dtype) for k, v in local.items()}
        everyone = _all_gather_object(meta)
        owner: dict[str, int] = {}
        for r, m in enumerate(everyone):
            for k in m:
                if k not in owner or (owner[k] != 0 and r == 0):
                    owner[k] = r
        mine: dict[str, torch.Tensor] = {}
        for k, v in local.items():  # same key order on every rank of a mesh (same module tree)
            full = v.full_tensor() if isinstance(v, DTensor) else v
            if owner[k] == rank:
                mine[k] = full.detach().to("cpu", copy=True)
            del full
        if not _dist_on():
            return mine
        out: dict[str, torch.Tensor] = {}
        dev = _p2p_device()
        for k in sorted(owner):
            src = owner[k]
            if src == 0:
                if rank == 0:
                    out[k] = mine.pop(k)
                continue
            if rank == src:
                dist.send(mine.pop(k).to(dev), dst=0)
            elif rank == 0:
                shape, dtype = everyone[src][k]
                buf = torch.empty(shape, dtype=dtype, device=dev)
                dist.recv(buf, src=src)
                out[k] = buf.cpu()
        return out if rank == 0 else None

    def export_hf(self, step: int | None = None, path: str | os.PathLike | None = None,
                  dtype: torch.dtype | str | None = None, max_shard_size: int | str = "5GB") -> str:
        """Write the current model in HF format (config.json + safetensors, loadable by transformers) to
        `path` (default `<dump_folder>/hf/step-N`). All ranks call; rank 0 writes. dtype defaults to the
        model's `torch_dtype` (router biases stay fp32)."""
        from moonlight.convert import save_hf
        from moonlight.model import Moonlight

        if self.args is None:
            raise CheckpointError("export_hf: the model parts carry no ModelArgs (.args)")
        if path is None:
            if step is None:
                raise ValueError("export_hf needs a step or a path")
            path = os.path.join(self.dump_folder, "hf", f"step-{step}")
        path = os.path.abspath(os.fspath(path))
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if dtype is None:
            dtype = getattr(torch, self.args.torch_dtype, None)
        from moonlight.train.lora import lora_scales, merge_lora_state_dict

        scales = {k: v for part in self.model_parts for k, v in lora_scales(part).items()}
        sd = self.gather_full_state_dict()
        err = None
        if _rank() == 0:
            try:
                if scales:  # LoRA/DoRA: export the merged weights under the base keys
                    sd = merge_lora_state_dict(sd, scales)
                with torch.device("meta"):
                    model = Moonlight(self.args)
                missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
                missing = [k for k in missing if k in model.state_dict()]
                if missing or unexpected:
                    raise CheckpointError(f"export_hf: gathered state is missing {missing[:5]} / has unexpected "
                                          f"{unexpected[:5]}")
                save_hf(model, path, max_shard_size=max_shard_size, dtype=dtype, overwrite=True)
                logger.info("checkpoint: exported HF checkpoint to %s", path)
            except BaseException as e:
                err = e
        err_msg = _broadcast_object(None if err is None else _short_error(err))
        if err is not None:
            raise err
        if err_msg is not None:
            raise CheckpointSaveError(f"HF export to {path} failed on rank 0: {err_msg}")
        self.last_exported_step = step
        return path
