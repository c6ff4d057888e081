"""The on-disk checkpoint format: step directories, atomic durable writes, the COMPLETE marker,
meta.json, and model-only checkpoints.

    <folder>/step-40/       a complete checkpoint: DCP shards, meta.json, the trainer's extra state,
                            and COMPLETE (written last; each file's size and CRC-32)
    <folder>/step-50.tmp/   a save in progress or interrupted: ignored by readers

Nothing is unpickled freely: DCP's metadata goes through a restricted unpickler, tensors through
torch.load(weights_only=True), everything else is JSON or safetensors. Design: docs/checkpoints.md.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import json
import os
import pathlib
import pickle
import re
import shutil
import tempfile
import warnings
import zlib
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import MetadataIndex, StorageMeta
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from moonlight import distributed
from moonlight.config import RUNTIME_FIELDS, ModelArgs
from moonlight.errors import CheckpointError, CheckpointSaveError, MoonlightError
from moonlight.outputs import check_replaceable, publish_mode, remove_own_dir, storage_problem

FORMAT = "moonlight-dcp"
FORMAT_VERSION = 2  # 2: COMPLETE records each file's size and CRC-32 (1: names only, still read)
MARKER = "COMPLETE"
META = "meta.json"
DCP_METADATA = ".metadata"
STEP_DIR = re.compile(r"^step-(0|[1-9]\d*)$")  # step-4, never step-004: one name per step
TEMP_STEP_DIR = re.compile(r"^step-(\d+)\.tmp$")
PADDED_STEP_DIR = re.compile(r"^step-0\d+$")
# Every file a step directory may hold: what overwrite=True may replace.
DCP_OUTPUT = re.compile(
    r"^(\.metadata|__\d+_\d+\.distcp|meta\.json|COMPLETE|train_state\.json"
    r"|rank-\d+\.safetensors)$"
)


def step_dir_name(step: int) -> str:
    return f"step-{step}"


# ------------------------------------------------------------------------------------- DCP


class _ReadWhenWritten(DefaultSavePlanner):
    """Saves a state dict of meta tensors (shapes and dtypes only), each tensor read by `read(key)`
    only when DCP writes it."""

    def __init__(self, read: Callable[[str], torch.Tensor]):
        super().__init__()
        self.read = read

    def lookup_object(self, index: MetadataIndex) -> Any:
        obj = super().lookup_object(index)
        return self.read(index.fqn) if isinstance(obj, torch.Tensor) and obj.is_meta else obj


def dcp_save(state: dict, path: str, read: Callable[[str], torch.Tensor] | None = None) -> None:
    """dcp.save; with `read`, the meta tensors of `state` are read one at a time as they are written,
    one file per tensor (DCP holds every tensor of a file until the file is written)."""
    kwargs: dict[str, Any] = {"checkpoint_id": path}
    if read is not None:
        kwargs = {
            "storage_writer": dcp.FileSystemWriter(path, single_file_per_rank=False),
            "planner": _ReadWhenWritten(read),
        }
    with warnings.catch_warnings():  # "torch.distributed is disabled ... single process" is our intent
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        dcp.save(state, no_dist=not distributed.is_distributed(), **kwargs)


def dcp_async_save(state: dict, path: str, process_group=None) -> tuple[Any, DefaultStager]:
    """dcp.async_save: copies the state to CPU now (a real copy even of CPU tensors, which DCP's
    default staging only references, so training may change them while they are written), writes it
    in a background thread. Returns the future to wait on and the stager to close after it."""
    stager = DefaultStager(
        StagingOptions(
            use_pinned_memory=torch.accelerator.is_available(),
            use_shared_memory=False,
            use_async_staging=False,
            use_non_blocking_copy=False,
        )
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        future = dcp.async_save(
            state,
            checkpoint_id=path,
            process_group=process_group,
            async_stager=stager,
            no_dist=not distributed.is_distributed(),
        )
    return future, stager


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's .metadata is a pickle; this unpickler builds only DCP's own metadata classes, torch sizes,
    dtypes and layouts, and paths, so a planted .metadata cannot run code (tensors themselves are read
    by DCP with torch.load(weights_only=True))."""

    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("torch.distributed.checkpoint."):
            obj = getattr(importlib.import_module(module), name, None)
            if isinstance(obj, type) and obj.__module__.startswith("torch.distributed.checkpoint."):
                return obj
        elif module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        elif (module, name) == ("torch.serialization", "_get_layout"):
            return torch.serialization._get_layout
        elif module == "pathlib" and name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"):
            return getattr(pathlib, name)
        raise CheckpointError(
            f"{self.path} asks to unpickle {module}.{name}, which no checkpoint metadata "
            "holds: refusing to load it (a planted or foreign file?)"
        )


class _SafeReader(dcp.FileSystemReader):
    """FileSystemReader whose metadata is read with the restricted unpickler above."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        path = os.path.join(os.fspath(self.path), DCP_METADATA)
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f, path).load()
        except CheckpointError:
            raise
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as e:
            raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def dcp_load(state: dict, path: str) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        dcp.load(state, storage_reader=_SafeReader(path), no_dist=not distributed.is_distributed())


def stored_tensors(path: str) -> dict[str, Any]:
    """DCP key -> storage metadata (shape, dtype) of a checkpoint directory, read without tensors."""
    return _SafeReader(path).read_metadata().state_dict_metadata


# ------------------------------------------------------------------------------ durable files


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems do not allow fsync on directories
        pass
    finally:
        os.close(fd)


def write_durable(path: str, data: bytes) -> None:
    """Write bytes to path, flushed and fsync'd."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_json_durable(obj: Any, path: str) -> None:
    write_durable(path, json.dumps(obj, indent=2, sort_keys=True).encode())


def read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def user_error_in(exc: BaseException) -> MoonlightError | None:
    """The MoonlightError that a DCP CheckpointException wraps (a `read` callback's), if any."""
    failures = getattr(exc, "failures", None)
    found = [f[0] if isinstance(f, tuple) else f for f in failures.values()] if isinstance(failures, dict) else []
    return next((f for f in found if isinstance(f, MoonlightError)), None)


def short_error(exc: BaseException) -> str:
    """One line for an exception, with each rank's failure for DCP's CheckpointException."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        parts = []
        for rank, f in failures.items():
            inner = f[0] if isinstance(f, tuple) else f
            parts.append(f"rank {rank}: {type(inner).__name__}: {inner}")
        return "; ".join(parts)
    return f"{type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------- step directories


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER)) and os.path.isfile(os.path.join(path, DCP_METADATA))


def list_checkpoints(folder: str | os.PathLike) -> dict[int, str]:
    """step -> path of every COMPLETE checkpoint directory in folder (step-N with the marker and DCP
    metadata); temp and partial directories, and symlinks (see misnamed_checkpoints), are left out."""
    folder = os.fspath(folder)
    out: dict[int, str] = {}
    if not os.path.isdir(folder):
        return out
    for name in os.listdir(folder):
        m = STEP_DIR.match(name)
        path = os.path.join(folder, name)
        if m and not os.path.islink(path) and is_complete(path):
            out[int(m.group(1))] = path
    return dict(sorted(out.items()))


def misnamed_checkpoints(folder: str | os.PathLike) -> list[str]:
    """What in folder moonlight must neither read nor write as a checkpoint, each with its fix: a complete
    checkpoint named with a zero-padded step ('step-004 (rename it to step-4)', a hand copy?), a symlink
    named like a step (a save or rotation would write or delete through it)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return []
    out = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if (STEP_DIR.match(name) or TEMP_STEP_DIR.match(name)) and os.path.islink(path):
            out.append(f"{name} (a symlink: replace it with the directory itself)")
        elif PADDED_STEP_DIR.match(name) and is_complete(path):
            out.append(f"{name} (rename it to step-{int(name[5:])})")
    return out


def incomplete_entries(folder: str) -> list[str]:
    """Names of interrupted saves (step-N.tmp) and marker-less step-N directories in folder."""
    if not os.path.isdir(folder):
        return []
    return [
        name
        for name in sorted(os.listdir(folder))
        if TEMP_STEP_DIR.match(name) or (STEP_DIR.match(name) and not is_complete(os.path.join(folder, name)))
    ]


def resolve_checkpoint(path: str | os.PathLike, step: int = -1) -> str:
    """A checkpoint directory from either the directory itself or a folder of step-N directories
    (the latest complete one, or `step`). Raises CheckpointError naming what is wrong."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint path {path} is not a directory")
    if is_complete(path) and step < 0:
        return path
    if os.path.isfile(os.path.join(path, DCP_METADATA)) and not os.path.isfile(os.path.join(path, MARKER)):
        raise CheckpointError(
            f"checkpoint {path} is incomplete (no {MARKER} marker): its save was interrupted or is still running"
        )
    found = list_checkpoints(path)
    if not found:
        partial, misnamed = incomplete_entries(path), misnamed_checkpoints(path)
        hint = (f" (incomplete saves ignored: {partial})" if partial else "") + (
            f" (not read: {', '.join(misnamed)})" if misnamed else ""
        )
        raise CheckpointError(f"no complete checkpoint (step-N directory with {MARKER} and .metadata) in {path}{hint}")
    if step < 0:
        return found[max(found)]
    if step not in found:
        raise CheckpointError(f"checkpoint step {step} not found in {path}; available steps: {sorted(found)}")
    return found[step]


# --------------------------------------------------------------------------------- integrity

_CHUNK = 16 << 20


def file_record(path: str) -> dict[str, Any]:
    """{"size", "crc32"} of a file, read in chunks (CRC-32 runs at several GB/s: a fast check against
    torn or overwritten bytes, not against tampering)."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return {"size": size, "crc32": f"{crc:08x}"}


def share(names: list[str]) -> list[str]:
    """This rank's share of a sorted list of file names (every rank checks a different part)."""
    return sorted(names)[distributed.rank() :: distributed.world_size()]


def file_records(path: str, names: list[str]) -> dict[str, dict[str, Any]]:
    return {name: file_record(os.path.join(path, name)) for name in names}


def recorded_files(path: str) -> dict[str, dict[str, Any]]:
    """name -> {"size", "crc32"} from a checkpoint's COMPLETE marker; {} for a marker written before
    format_version 2 (names only: nothing to verify)."""
    marker = read_json(os.path.join(path, MARKER))
    files = marker.get("files") if isinstance(marker, dict) else None
    return files if isinstance(files, dict) else {}


def integrity_problems(path: str, names: list[str], recorded: dict[str, dict[str, Any]]) -> list[str]:
    """'file: what is wrong' for each of `names` whose size or CRC-32 differs from COMPLETE's record."""
    problems = []
    for name in names:
        want = recorded[name]
        p = os.path.join(path, name)
        if not os.path.isfile(p):
            problems.append(f"{p}: missing")
            continue
        size = os.path.getsize(p)
        if size != want.get("size"):
            problems.append(f"{p}: {size} bytes, COMPLETE records {want.get('size')}")
        elif file_record(p)["crc32"] != want.get("crc32"):
            problems.append(f"{p}: checksum mismatch (bytes changed since the save)")
    return problems


def verify_checkpoint(path: str) -> list[str]:
    """Integrity problems of a checkpoint directory, checked by every rank for its share of the files
    (a collective: every rank calls it). Empty when intact."""
    try:
        recorded = recorded_files(path)
        mine = integrity_problems(path, share(list(recorded)), recorded)
    except CheckpointError as e:
        mine = [str(e)]
    return sorted({p for problems in distributed.all_gather_object(mine) for p in problems})


def damage_summary(problems: list[str]) -> str:
    return problems[0] + (f" (and {len(problems) - 1} more file(s))" if len(problems) > 1 else "")


def check_intact(path: str) -> None:
    """Raise CheckpointError naming the first damaged file of a checkpoint (a collective)."""
    problems = verify_checkpoint(path)
    if problems:
        raise CheckpointError(f"checkpoint {path} is damaged: {damage_summary(problems)}")


def finalize_dir(tmp: str, final: str, records: dict[str, dict[str, Any]] | None = None) -> None:
    """fsync every file of tmp, write the fsync'd marker (each file's size and CRC-32: from `records`,
    computed here for files it lacks), then atomically rename tmp -> final."""
    records = dict(records or {})
    for name in sorted(os.listdir(tmp)):
        p = os.path.join(tmp, name)
        if os.path.isfile(p):
            fsync_path(p)
            if name not in records:
                records[name] = file_record(p)
    write_json_durable({"complete": True, "version": FORMAT_VERSION, "files": records}, os.path.join(tmp, MARKER))
    fsync_path(tmp)
    parent = os.path.dirname(final)
    if os.path.lexists(final) and (os.path.islink(final) or not is_complete(final)):  # not ours to delete
        raise CheckpointError(
            f"{final} exists without a {MARKER} marker (not written by moonlight, or being "
            "copied in) or is a symlink: move it out of the way or delete it"
        )
    if os.path.exists(final):  # a complete checkpoint of that step: never replaced silently
        raise CheckpointError(
            f"{final} already holds a complete checkpoint: refusing to replace it; move it away "
            "(or resume from it) and save again"
        )
    os.replace(tmp, final)
    fsync_path(parent)


# -------------------------------------------------------------------------------------- meta


def base_meta(
    step: int, args: ModelArgs | None, contents: list[str], parallelism: dict | None = None, lora: dict | None = None
) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "contents": contents,
        "model_args": dataclasses.asdict(args) if args is not None else None,
        "world_size": distributed.world_size(),
        "parallelism": parallelism or {},
        "lora": lora,
        "torch_version": torch.__version__,
        "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def saved_lora(meta: dict) -> dict | None:
    """The [lora] settings of the run that wrote a checkpoint (None: not a LoRA/DoRA run). Checkpoints
    written before meta.json had "parallelism" and "lora" kept them in "layout"."""
    return meta.get("lora") or (meta.get("layout") or {}).get("lora")


def read_meta(path: str) -> dict[str, Any]:
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
        raise CheckpointError(
            f"{path} has no {META}: not a checkpoint written by moonlight "
            "(the trainer or `python -m moonlight.convert hf-to-dcp`)"
        )
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{meta_path}: format {meta.get('format') if isinstance(meta, dict) else None!r} is not {FORMAT!r}"
        )
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path}: format_version {meta['format_version']} is newer than this code "
            f"({FORMAT_VERSION}); update moonlight"
        )
    return meta


def model_args_from_meta(meta: dict) -> ModelArgs | None:
    """The ModelArgs a checkpoint was saved with (fields unknown to this version dropped)."""
    saved = meta.get("model_args")
    if not saved:
        return None
    known = {f.name for f in dataclasses.fields(ModelArgs)}
    return ModelArgs(**{k: v for k, v in saved.items() if k in known})


def model_args_mismatch(saved: dict[str, Any], current: ModelArgs, this: str = "this run") -> list[str]:
    """'field=saved but this has field=current' for every model-args field that changes the weights'
    shapes or function (RUNTIME_FIELDS may differ)."""
    cur = dataclasses.asdict(current)
    out = []
    for key in sorted(set(saved) | set(cur)):
        if key in RUNTIME_FIELDS:
            continue
        if key not in cur:
            out.append(f"{key}={saved[key]!r} (unknown to this version)")
        elif key not in saved:
            continue  # a field added after the checkpoint was written: its default applies
        elif saved[key] != cur[key]:
            out.append(f"{key}={saved[key]!r} but {this} has {key}={cur[key]!r}")
    return out


def check_model_args(path: str, meta: dict, args: ModelArgs | None) -> None:
    """Raise CheckpointError if the checkpoint at path was saved for another model than args."""
    if args is None or not meta.get("model_args"):
        return
    diffs = model_args_mismatch(meta["model_args"], args)
    if diffs:
        name = os.path.basename(os.path.normpath(path))
        raise CheckpointError(
            f"checkpoint {name} ({path}) was saved for a different model: it was saved for "
            + "; ".join(diffs)
            + ". Use the model config it was saved with, or start from its HF export."
        )


# --------------------------------------------------------------------------- model-only files


def write_model_only_checkpoint(
    state_dict: dict[str, torch.Tensor],
    out: str | os.PathLike,
    args: ModelArgs,
    step: int = 0,
    overwrite: bool = False,
    extra_meta: dict | None = None,
    read: Callable[[str], torch.Tensor] | None = None,
) -> str:
    """A single-process, model-only checkpoint in the trainer's naming ("model." + native key), written
    atomically (a temporary directory next to out -> out). Loadable by the trainer's resume and
    `dcp-to-hf`. `overwrite` replaces an earlier checkpoint; a directory holding other files is refused.
    With `read` (native key -> tensor), `state_dict` holds meta tensors and each tensor is read only
    when it is written: one tensor in memory at a time."""
    out = os.path.abspath(os.fspath(out))
    check_replaceable(out, DCP_OUTPUT, overwrite, "a moonlight checkpoint")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=os.path.dirname(out))
    try:
        dcp_save(
            {f"model.{k}": v for k, v in state_dict.items()},
            tmp,
            read=read and (lambda key: read(key.removeprefix("model."))),
        )
        meta = base_meta(step, args, ["model"])
        meta["world_size"] = 1
        meta.update(extra_meta or {})
        write_json_durable(meta, os.path.join(tmp, META))
        publish_mode(tmp)
        if os.path.isdir(out):
            remove_own_dir(out, DCP_OUTPUT)
        finalize_dir(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = storage_problem(e, os.path.dirname(out))
        if reason:
            raise CheckpointSaveError(
                f"writing checkpoint {out} failed: {reason} ({short_error(e)}); nothing was replaced"
            ) from None
        if inner := user_error_in(e):  # e.g. a non-finite tensor that `read` refused
            raise inner from None
        raise
    return out
