"""Trainer save/resume: atomic DCP saves of model + optimizer + train state, restored exactly, also
onto another parallel configuration.

    ckpt = Checkpointer(cfg.checkpoint, dump_folder, model_parts, optimizers, lr_schedulers, dataloader)
    start = ckpt.load(cfg.checkpoint.load_step)   # 0: nothing to resume
    ckpt.save(step)                               # when step % interval == 0 (force=True: always)

Every rank calls every method (they hold collectives); one process works without a process group.
A kill at any point leaves the previous checkpoint the latest one. A LoRA run from a base
checkpoint may leave its frozen weights out of every save. Design: docs/checkpoints.md.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import random
import shutil
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from moonlight import distributed
from moonlight.checkpoint import format as fmt
from moonlight.config import ModelArgs
from moonlight.errors import CheckpointError, CheckpointSaveError
from moonlight.model.lora import is_adapter_name
from moonlight.outputs import storage_problem

logger = logging.getLogger(__name__)

TRAIN_STATE = "train_state.json"
_OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def rank_state_file(rank: int) -> str:
    return f"rank-{rank}.safetensors"


# ------------------------------------------------------------------------------ model parts


class _MergedParts(nn.Module):
    """A view of several pipeline model parts as one module with global FQNs (parts keep global layer
    keys, "layers.N", so their trees merge without collisions). Only used to name parameters for DCP's
    state-dict helpers when one optimizer spans several parts."""


def _merge_into(dst: nn.Module, src: nn.Module, where: str) -> None:
    for kind, table in (("parameter", "_parameters"), ("buffer", "_buffers")):
        mine = getattr(dst, table)
        for name, t in getattr(src, table).items():
            if t is None:
                continue
            if name in mine and mine[name] is not t:
                raise CheckpointError(f"model parts both hold {kind} {where}{name}")
            mine[name] = t
    dst._non_persistent_buffers_set |= src._non_persistent_buffers_set & set(src._buffers)
    for name, child in src._modules.items():
        if child is None:
            continue
        cur = dst._modules.get(name)
        if cur is None:
            dst._modules[name] = child
        elif cur is not child:
            if not isinstance(cur, _MergedParts):
                node = _MergedParts()
                _merge_into(node, cur, f"{where}{name}.")
                dst._modules[name] = cur = node
            _merge_into(cur, child, f"{where}{name}.")


def merge_model_parts(parts: list[nn.Module]) -> nn.Module:
    if len(parts) == 1:
        return parts[0]
    root = _MergedParts()
    for p in parts:
        _merge_into(root, p, "")
    return root


def model_args_of(parts: list[nn.Module]) -> ModelArgs | None:
    return next((p.args for p in parts if isinstance(getattr(p, "args", None), ModelArgs)), None)


def model_state_dict(parts: list[nn.Module], trainable_only: bool = False) -> dict[str, Any]:
    """The (possibly sharded) state dict of every local model part, by global FQN; `trainable_only`
    leaves out the frozen parameters (requires_grad=False; buffers stay)."""
    options = StateDictOptions(ignore_frozen_params=trainable_only)
    sd: dict[str, Any] = {}
    for part in parts:
        sd.update(get_model_state_dict(part, options=options))
    return sd


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


def restore_schedule_position(scheduler, saved: dict[str, Any]) -> None:
    """Put a scheduler at a saved position, through state_dict(): the schedule is a function of the
    step, so this run's own base lrs and lambdas are kept (param groups may be split differently
    under another parallelism) and the lrs are recomputed by one step() from the position before."""
    own = scheduler.state_dict()
    own.update(last_epoch=int(saved["last_epoch"]) - 1, _step_count=max(int(saved.get("_step_count", 1)) - 1, 0))
    scheduler.load_state_dict(own)
    with warnings.catch_warnings():  # "step() before optimizer.step()": a restore, not a training step
        warnings.simplefilter("ignore")
        scheduler.step()


# ------------------------------------------------------------------------------------ RNG


def _rng_tensors_and_json() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def _set_rng(tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    version, internal, gauss = values["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = values["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ----------------------------------------------------------------------------------- Checkpointer


@dataclasses.dataclass
class _PendingSave:
    """A save whose data is (being) written and whose COMPLETE marker is not."""

    step: int
    tmp: str
    final_dir: str
    train_state: dict[str, Any]  # captured when the save started
    future: Any = None  # async_mode: DCP's background write
    stager: Any = None  # and its staging (CPU copies), closed once written
    err: str | None = None
    storage: str | None = None  # 'disk full' / 'read-only filesystem' when that is why it failed
    previous_saved_step: int | None = None


class Checkpointer:
    """Save/resume everything a run needs; see the module docstring for the protocol and the files.

    cfg: a `CheckpointSection` (enable, interval, keep_latest_k, folder, load_step). model_parts:
    this rank's model part(s) (one, or one per local pipeline stage). optimizers: an `Optimizers`
    container, a list of them, or plain optimizers. lr_schedulers: an `LRSchedulers` (or list).
    dataloader: anything with state_dict/load_state_dict whose JSON state is the same on every rank
    (saved once, by rank 0). extra_states: name -> object with a JSON state_dict/load_state_dict,
    saved per rank (on load: this rank's, else rank 0's). parallelism: optional dict describing the
    parallel configuration, and lora: the [lora] settings of a LoRA/DoRA run, both recorded in
    meta.json. skip_frozen: saves leave out the frozen parameters, which `base_weights` (a directory,
    recorded in meta.json) holds. load_base(path): reads the frozen weights from a base directory into
    the model parts (needed to resume such a checkpoint).
    """

    def __init__(
        self,
        cfg,
        dump_folder: str | os.PathLike,
        model_parts: list[nn.Module] | nn.Module,
        optimizers=None,
        lr_schedulers=None,
        dataloader=None,
        extra_states: dict[str, Any] | None = None,
        parallelism: dict | None = None,
        lora: dict | None = None,
        base_weights: str | None = None,
        skip_frozen: bool = False,
        load_base: Callable[[str], None] | None = None,
    ):
        self.cfg = cfg
        self.dump_folder = os.path.abspath(os.fspath(dump_folder))
        self.folder = os.path.join(self.dump_folder, cfg.folder)
        self.model_parts = [model_parts] if isinstance(model_parts, nn.Module) else list(model_parts)
        self.optimizers = optimizers
        self.lr_schedulers = lr_schedulers
        self.dataloader = dataloader
        self.extra_states = dict(extra_states or {})
        self.parallelism, self.lora = dict(parallelism or {}), lora
        if skip_frozen and not base_weights:
            raise ValueError("skip_frozen needs base_weights: the directory the frozen weights are re-read from")
        self.base_weights = os.path.abspath(base_weights) if base_weights else None
        self.skip_frozen = skip_frozen
        self.load_base = load_base
        self.args = model_args_of(self.model_parts)
        self._model = merge_model_parts(self.model_parts)
        self._optim_list = _flatten_optimizers(optimizers)
        self._sched_list = _flatten_schedulers(lr_schedulers)
        self.last_saved_step: int | None = None
        self.pinned_step: int | None = None  # kept by keep_latest_k rotation (the last step before a divergence)
        self._pending: _PendingSave | None = None  # the save whose COMPLETE is not written yet
        self._async_pg = None

    # ------------------------------------------------------------------------------- state
    def _optim_sd(self) -> dict[str, Any]:
        if not self._optim_list:
            return {}
        return get_optimizer_state_dict(self._model, self._optim_list, options=_OPTIM_OPTIONS)

    def _train_state(self, step: int) -> dict[str, Any]:
        return {
            "step": int(step),
            "dataloader": self.dataloader.state_dict() if self.dataloader is not None else None,
            "lr_schedulers": [s.state_dict() for s in self._sched_list],
        }

    def _write_rank_state(self, path: str) -> None:
        tensors, values = _rng_tensors_and_json()
        values["extra"] = {k: v.state_dict() for k, v in self.extra_states.items()}
        fmt.write_durable(path, save(tensors, metadata={"json": json.dumps(values)}))

    def _warn_diverged_replicas(self, sd: dict[str, Any]) -> None:
        """Plain (non-DTensor) tensors are saved from one rank only (DCP deduplicates by key): warn when
        ranks disagree on them, e.g. router biases updated from loads that were not all-reduced."""
        if distributed.world_size() == 1:
            return
        sums = {
            k: (float(v.double().sum()), float(v.double().abs().sum()))
            for k, v in sd.items()
            if isinstance(v, torch.Tensor) and not isinstance(v, DTensor)
        }
        seen: dict[str, tuple] = {}
        bad = set()
        for theirs in distributed.all_gather_object(sums):
            for k, v in theirs.items():
                if seen.setdefault(k, v) != v:
                    bad.add(k)
        if bad and distributed.rank() == 0:
            logger.error(
                "checkpoint: replicated tensors differ across ranks; rank 0's copy is saved: %s", sorted(bad)[:10]
            )

    def _nonfinite_params(self) -> list[str]:
        names, flags = [], []
        for part in self.model_parts:
            for name, p in part.named_parameters():
                local = distributed.local_tensor(p.detach())
                if local.numel() and local.is_floating_point():
                    names.append(name)
                    flags.append(torch.isfinite(local).all())
        if not flags:
            return []
        ok = torch.stack(flags).cpu()
        return [n for n, good in zip(names, ok.tolist()) if not good]

    # -------------------------------------------------------------------------------- save
    def due(self, step: int, force: bool = False) -> bool:
        """Whether `save(step, force)` writes a checkpoint."""
        return (
            self.cfg.enable and (force or (step > 0 and step % self.cfg.interval == 0)) and self.last_saved_step != step
        )

    def save(self, step: int, force: bool = False) -> bool:
        """Save when `step % interval == 0` or `force` (and checkpointing is enabled). Returns whether a
        checkpoint was written. Raises CheckpointSaveError if the write failed on any rank."""
        if not self.due(step, force):
            return False
        self._save(step)
        return True

    def _save(self, step: int) -> None:
        self.wait()  # at most one save in flight
        rank = distributed.rank()
        final_dir = os.path.join(self.folder, fmt.step_dir_name(step))
        tmp = final_dir + ".tmp"
        bad = [n for names in distributed.all_gather_object(self._nonfinite_params()) for n in names]
        if bad:
            raise CheckpointSaveError(
                f"refusing to save checkpoint {final_dir}: non-finite values in {len(set(bad))} parameter(s), "
                f"e.g. {sorted(set(bad))[:5]}; the previous checkpoint stays the latest"
            )
        prep_err = None
        if rank == 0:
            try:
                os.makedirs(self.folder, exist_ok=True)
                for name in fmt.incomplete_entries(self.folder):
                    path = os.path.join(self.folder, name)
                    if fmt.TEMP_STEP_DIR.match(name):  # leftovers of our interrupted saves: remove
                        logger.warning("checkpoint: removing incomplete save %s", path)
                        shutil.rmtree(path, ignore_errors=True)
                    else:  # step-N without a marker: not ours to delete (being copied in by hand?)
                        logger.warning("checkpoint: ignoring %s (no %s marker)", path, fmt.MARKER)
                os.makedirs(tmp)
            except OSError as e:
                reason = storage_problem(e)
                prep_err = f"{type(e).__name__}: {e}" + (f" ({reason})" if reason else "")
        prep_err = distributed.broadcast_object(prep_err)
        if prep_err:
            raise CheckpointSaveError(f"saving checkpoint {final_dir} failed: cannot create {tmp}: {prep_err}")

        # phase 1: every rank writes its shards and its rank file (async: DCP stages the state to CPU
        # here and writes it in the background; phase 2 then runs in wait(), at the next save or the end)
        save = _PendingSave(step, tmp, final_dir, self._train_state(step))
        try:
            state = {"model": model_state_dict(self.model_parts, trainable_only=self.skip_frozen)}
            self._warn_diverged_replicas(state["model"])
            if self._optim_list:
                state["optimizer"] = self._optim_sd()
            self._write_rank_state(os.path.join(tmp, rank_state_file(rank)))
            if self.cfg.async_mode == "async":
                save.future, save.stager = fmt.dcp_async_save(state, tmp, self._async_group())
            else:
                fmt.dcp_save(state, tmp)
        except (KeyboardInterrupt, SystemExit):
            raise  # the temp directory stays behind, ignored by load and removed by the next save
        except BaseException as e:  # DCP raises CheckpointException (a BaseException) on any rank's failure
            save.err, save.storage = fmt.short_error(e), storage_problem(e, self.folder)
        self._pending = save
        if save.future is None:
            self.wait()
        else:  # due() is false for a step in flight; _finalize restores the previous step if this one fails
            save.previous_saved_step, self.last_saved_step = self.last_saved_step, step

    def _async_group(self):
        """A process group of its own for the background writes, so they never interleave with the
        training's collectives on the default group (None in one process)."""
        if self._async_pg is None and distributed.is_distributed():
            self._async_pg = torch.distributed.new_group(backend="gloo")
        return self._async_pg

    def wait(self) -> None:
        """Finish the save in flight, if any: wait for every rank's data, then write COMPLETE (atomic
        rename into place) and rotate. All ranks call. Raises CheckpointSaveError if it failed."""
        save, self._pending = self._pending, None
        if save is None:
            return
        if save.future is not None:
            try:
                save.future.result()
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as e:
                save.err, save.storage = fmt.short_error(e), storage_problem(e, self.folder)
            save.stager.close()
        self._finalize(save)

    def _finalize(self, save: _PendingSave) -> None:
        rank, step, tmp, final_dir = distributed.rank(), save.step, save.tmp, save.final_dir
        err, storage = save.err, save.storage
        errors = [x for x in distributed.all_gather_object((rank, err, storage)) if x[1] is not None]
        records: dict[str, Any] = {}
        if not errors:  # every rank checksums a share of the step's files, for COMPLETE
            mine: dict[str, Any] = {}
            try:
                mine = fmt.file_records(
                    tmp, fmt.share([n for n in os.listdir(tmp) if os.path.isfile(os.path.join(tmp, n))])
                )
                err = None
            except OSError as e:
                err = fmt.short_error(e)
            for r, part, e in distributed.all_gather_object((rank, mine, err)):
                records.update(part)
                if e is not None:
                    errors.append((r, e, storage_problem(None, self.folder)))

        # phase 2: rank 0 writes the sidecars and the marker, then renames into place
        if not errors and rank == 0:
            try:
                fmt.write_json_durable(save.train_state, os.path.join(tmp, TRAIN_STATE))
                meta = fmt.base_meta(
                    step,
                    self.args,
                    ["model"]
                    + (["optimizer"] if self._optim_list else [])
                    + ["train_state", "rng"]
                    + (["extra"] if self.extra_states else []),
                    self.parallelism,
                    self.lora,
                )
                if self.base_weights:  # the run's initial_load_hf: a PEFT export names it as the base model
                    meta["base_model"] = self.base_weights
                if self.skip_frozen:
                    meta["frozen_weights_from"] = self.base_weights
                fmt.write_json_durable(meta, os.path.join(tmp, fmt.META))
                fmt.finalize_dir(tmp, final_dir, records)
            except BaseException as e:
                errors = [(0, fmt.short_error(e), storage_problem(e, self.folder))]
        errors = distributed.broadcast_object(errors)
        if errors:
            self.last_saved_step = save.previous_saved_step if save.future is not None else self.last_saved_step
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            distributed.barrier()
            what = next((d for _, _, d in errors if d), "write error")
            detail = "; ".join(f"rank {r}: {m}" for r, m, _ in errors)
            prev = fmt.list_checkpoints(self.folder)
            keep = f"the previous checkpoint step-{max(prev)} is intact" if prev else "no earlier checkpoint exists"
            raise CheckpointSaveError(
                f"saving checkpoint {final_dir} failed ({what}): {detail}; the partial directory was removed and {keep}"
            )
        distributed.barrier()
        self.last_saved_step = step
        if rank == 0:
            logger.info("checkpoint: saved step %d to %s", step, final_dir)
            self._purge(step)
        distributed.barrier()

    def _purge(self, step: int) -> None:
        found = fmt.list_checkpoints(self.folder)
        later = [s for s in found if s > step]
        if later:
            logger.warning(
                "checkpoint: %s hold(s) later steps %s than this run's step %d (from an abandoned run?); "
                "a resume with load_step=-1 picks the highest step",
                self.folder,
                later,
                step,
            )
        k = self.cfg.keep_latest_k
        if k <= 0:
            return
        for s in sorted(found)[:-k]:
            if s in (step, self.pinned_step):
                continue
            logger.info("checkpoint: deleting step-%d (keep_latest_k=%d)", s, k)
            shutil.rmtree(found[s], ignore_errors=True)

    def set_aside_later(self, step: int, dest: str) -> tuple[list[int], str]:
        """Move the complete checkpoints after `step` (the branch a rollback to `step` abandons) into
        `<dest>/<checkpoint folder name>` (inside the checkpoint folder itself when that lies on another
        filesystem), so the resumed run neither replaces nor rotates them away. Returns the moved steps
        and where they went. A collective."""
        moved, where, err = [], "", None
        if distributed.rank() == 0:
            later = {s: p for s, p in fmt.list_checkpoints(self.folder).items() if s > step}
            where = os.path.join(dest, os.path.basename(os.path.normpath(self.cfg.folder)))
            try:
                for s, path in later.items():
                    try:
                        os.makedirs(where, exist_ok=True)
                        os.replace(path, os.path.join(where, os.path.basename(path)))
                    except OSError as e:
                        if e.errno != errno.EXDEV:
                            raise
                        where = os.path.join(self.folder, os.path.basename(dest))
                        os.makedirs(where, exist_ok=True)
                        os.replace(path, os.path.join(where, os.path.basename(path)))
                    moved.append(s)
            except OSError as e:
                reason = storage_problem(e) or e.strerror
                err = (
                    f"cannot move the later checkpoints {sorted(later)} of {self.folder} aside into {where} "
                    f"({reason}): move them away by hand, then resume"
                )
        moved, where, err = distributed.broadcast_object((moved, where, err))
        if err:
            raise CheckpointError(err)
        return moved, where

    # -------------------------------------------------------------------------------- load
    def available_steps(self) -> list[int]:
        """The complete steps of the folder; a checkpoint named step-004 (moonlight reads step-4) or a step
        that is a symlink is a CheckpointError rather than ignored or followed."""
        found = (
            (list(fmt.list_checkpoints(self.folder)), fmt.misnamed_checkpoints(self.folder))
            if distributed.rank() == 0
            else None
        )
        found, misnamed = distributed.broadcast_object(found)
        if misnamed:
            raise CheckpointError(
                f"{self.folder} holds entries named like checkpoints that moonlight neither "
                f"writes nor reads: {', '.join(misnamed)}"
            )
        return sorted(found)

    def load(self, step: int = -1) -> int:
        """Restore checkpoint `step` (-1: the latest complete one) of this run's folder; returns the
        restored step, 0 when there is nothing to resume. A requested step that does not exist, an
        incomplete or foreign checkpoint, or one saved for another model raises CheckpointError."""
        if not self.cfg.enable and step < 0:
            return 0
        found = self.available_steps()
        if step < 0:
            if not found:
                partial = fmt.incomplete_entries(self.folder) if distributed.rank() == 0 else []
                if partial:
                    logger.warning("checkpoint: ignoring incomplete saves %s in %s", partial, self.folder)
                return 0
        elif step not in found:
            tmp = os.path.join(self.folder, f"step-{step}.tmp")
            raw = os.path.join(self.folder, fmt.step_dir_name(step))
            why = (
                f" (step-{step}.tmp is an incomplete save)"
                if os.path.exists(tmp)
                else f" (step-{step} is incomplete: no {fmt.MARKER} marker)"
                if os.path.isdir(raw)
                else ""
            )
            raise CheckpointError(
                f"checkpoint step {step} not found in {self.folder}{why}; available steps: {found if found else 'none'}"
            )
        chosen = self._intact_step(found, step)
        earlier = [s for s in found if s < chosen]
        hint = (
            f"; resume from the earlier step-{max(earlier)} with --checkpoint.load_step={max(earlier)}"
            if earlier
            else ""
        )
        return self.load_path(os.path.join(self.folder, fmt.step_dir_name(chosen)), verified=True, hint=hint)

    def _intact_step(self, found: list[int], step: int) -> int:
        """`step` if its files match COMPLETE's sizes and checksums; with step = -1, the newest intact
        one (a fallback is reported in one warning line). A damaged requested step, or no intact step
        at all, raises CheckpointError naming the damaged file and the newest intact step."""
        damaged: dict[int, list[str]] = {}
        for s in [step] if step >= 0 else sorted(found, reverse=True):
            problems = fmt.verify_checkpoint(os.path.join(self.folder, fmt.step_dir_name(s)))
            if not problems:
                if damaged and distributed.rank() == 0:
                    newest = max(damaged)
                    logger.warning(
                        "checkpoint: step-%d is damaged (%s); resuming from step-%d, the newest intact checkpoint",
                        newest,
                        damaged[newest][0],
                        s,
                    )
                return s
            damaged[s] = problems
        bad = max(damaged)
        others = sorted((s for s in found if s not in damaged), reverse=True)  # empty when all were checked
        good = next(
            (s for s in others if not fmt.verify_checkpoint(os.path.join(self.folder, fmt.step_dir_name(s)))), None
        )
        hint = (
            f"; the newest intact checkpoint is step-{good}: resume from it with --checkpoint.load_step={good}"
            if good is not None
            else "; no intact checkpoint is left in " + self.folder
        )
        raise CheckpointError(f"checkpoint step-{bad} is damaged: {fmt.damage_summary(damaged[bad])}{hint}")

    def load_path(
        self, path: str | os.PathLike, model_only: bool = False, verified: bool = False, hint: str = ""
    ) -> int:
        """Restore from a checkpoint directory (a full trainer checkpoint, or a model-only one such as
        `python -m moonlight.convert hf-to-dcp` writes); `model_only` restores just the weights. Its
        files are checked against COMPLETE's sizes and checksums unless `verified`. A file that cannot
        be read (damage a format_version 1 marker has no checksums to find) is a CheckpointError ending
        in `hint`."""
        path = os.path.abspath(os.fspath(path))
        if not fmt.is_complete(path):
            if not os.path.isdir(path):
                raise CheckpointError(f"checkpoint {path} does not exist")
            raise CheckpointError(
                f"checkpoint {path} is incomplete (no {fmt.MARKER} marker or .metadata): its save was interrupted"
            )
        if not verified:
            fmt.check_intact(path)
        meta = fmt.read_meta(path)
        fmt.check_model_args(path, meta, self.args)
        self._check_lora(path, meta)
        contents = ["model"] if model_only else meta.get("contents", ["model"])
        base = meta.get("frozen_weights_from")
        if base:
            self._load_frozen_weights(path, base)
        state: dict[str, Any] = {"model": model_state_dict(self.model_parts, trainable_only=bool(base))}
        with_optim = "optimizer" in contents and bool(self._optim_list)
        if with_optim:
            state["optimizer"] = self._optim_sd()
        self._check_keys(path, state)
        try:
            fmt.dcp_load(state, path)
        except (KeyboardInterrupt, SystemExit, CheckpointError):
            raise
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            v1 = (
                " (its COMPLETE marker, format_version 1, records no checksums to check it against)"
                if not fmt.recorded_files(path)
                else ""
            )
            raise CheckpointError(
                f"checkpoint {path} cannot be read, its files are damaged{v1}: {fmt.short_error(e)[:300]}{hint}"
            ) from None
        for part in self.model_parts:
            keys = set(get_model_state_dict(part))
            set_model_state_dict(
                part, {k: v for k, v in state["model"].items() if k in keys}, options=StateDictOptions(strict=not base)
            )
        if with_optim:
            set_optimizer_state_dict(self._model, self._optim_list, state["optimizer"], options=_OPTIM_OPTIONS)
        step = int(meta.get("step", 0))
        if "train_state" in contents:
            self._load_train_state(path)
        if "rng" in contents or "extra" in contents:
            self._load_rank_state(path, meta)
        if not model_only:
            self.last_saved_step = step
        if distributed.rank() == 0:
            logger.info("checkpoint: restored %s (%s) at step %d", path, ", ".join(contents), step)
        return step

    def _check_lora(self, path: str, meta: dict) -> None:
        """The adapters are resumed only under the [lora] settings they were trained with: another rank
        does not fit them, and another alpha, DoRA or target list would silently change or drop them."""
        saved, mine = fmt.saved_lora(meta), self.lora
        if saved and not mine:
            settings = ", ".join(f"lora.{k} = {saved[k]!r}" for k in ("rank", "alpha", "dora", "targets") if k in saved)
            raise CheckpointError(
                f"checkpoint {path} is a LoRA/DoRA run's: resume it with lora.enable = true "
                f"({settings}), or start a new run (another job.dump_folder) from its merged export "
                "(python -m moonlight.convert dcp-to-hf) as checkpoint.initial_load_hf"
            )
        if not saved or not mine:
            return
        diffs = [
            f"{key} = {saved[key]!r} (this run: {mine[key]!r})"
            for key in ("rank", "alpha", "dora", "targets")
            if key in saved
            and key in mine
            and (sorted(saved[key]) != sorted(mine[key]) if key == "targets" else saved[key] != mine[key])
        ]
        if diffs:
            raise CheckpointError(
                f"checkpoint {path} was saved with lora.{'; lora.'.join(diffs)}: resume with those "
                "settings, or start a new run (another job.dump_folder) from its merged export "
                "(python -m moonlight.convert dcp-to-hf) as checkpoint.initial_load_hf"
            )

    def _load_frozen_weights(self, path: str, base: str) -> None:
        """A checkpoint saved without its frozen weights: read them from its base first."""
        if self.load_base is None or self.base_weights is None:
            raise CheckpointError(
                f"checkpoint {path} holds only the trained weights; its frozen base weights are "
                f"read from {base}: set checkpoint.initial_load_hf = {base!r} to resume it"
            )
        if self.base_weights != base:
            if not getattr(self.cfg, "other_base", False):  # adapters on other weights: a different model
                raise CheckpointError(
                    f"checkpoint {path} was trained on the frozen weights in {base}, not "
                    f"checkpoint.initial_load_hf = {self.base_weights}: set it to {base!r}, or, "
                    "if this is the same base moved, set checkpoint.other_base = true"
                )
            if distributed.rank() == 0:
                logger.warning(
                    "checkpoint: %s was saved with its frozen weights in %s; reading them from %s "
                    "(checkpoint.initial_load_hf, checkpoint.other_base) instead",
                    path,
                    base,
                    self.base_weights,
                )
        self.load_base(self.base_weights)

    def _check_keys(self, path: str, state: dict[str, Any]) -> None:
        stored = set(fmt.stored_tensors(path))
        for top, sub in state.items():
            missing = sorted({f"{top}.{k}" for k in sub} - stored)
            if missing:
                hint = (
                    " (was the optimizer changed, e.g. adamw <-> muon?)"
                    if top == "optimizer"
                    else " (it holds no LoRA/DoRA adapters: start a LoRA run from it with checkpoint.initial_load_hf)"
                    if all(is_adapter_name(m) for m in missing)
                    else " (a different model?)"
                )
                raise CheckpointError(
                    f"checkpoint {path} lacks {len(missing)} {top} entr(ies) this run needs, e.g. "
                    f"{[m[len(top) + 1 :] for m in missing[:5]]}{hint}"
                )

    def _load_train_state(self, path: str) -> None:
        ts = fmt.read_json(os.path.join(path, TRAIN_STATE))
        if self.dataloader is not None and ts.get("dataloader") is not None:
            self.dataloader.load_state_dict(ts["dataloader"])
        saved = ts.get("lr_schedulers") or []
        if saved:
            for s in self._sched_list:
                restore_schedule_position(s, saved[0])

    def _load_rank_state(self, path: str, meta: dict) -> None:
        rank = distributed.rank()
        own = os.path.join(path, rank_state_file(rank))
        src = own if os.path.exists(own) else os.path.join(path, rank_state_file(0))
        if not os.path.exists(src):
            return
        try:
            with safe_open(src, "pt") as f:
                values = json.loads(f.metadata()["json"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"cannot read {src}: {e}") from None
        if src == own:
            _set_rng(tensors, values)
        elif rank == 0 or meta.get("world_size") != distributed.world_size():
            logger.warning(
                "checkpoint: %s was saved by %s ranks, this run has %d: RNG states not restored on rank %d",
                path,
                meta.get("world_size"),
                distributed.world_size(),
                rank,
            )
        for name, obj in self.extra_states.items():
            if name in values.get("extra", {}):
                obj.load_state_dict(values["extra"][name])
