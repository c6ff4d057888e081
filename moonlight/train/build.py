"""What a training run is built from, before the loop starts: model args from the config, the [lora]
adapters, the initial weights, the process group, the dump-folder lock and the runtime checks.

The trainer and the planner (`python -m moonlight.plan`) both build through these functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import os
from collections.abc import Callable

import torch
import torch.distributed as dist

from moonlight.checkpoint.format import DCP_METADATA, model_args_from_meta, read_meta, saved_lora
from moonlight.checkpoint.state import Checkpointer
from moonlight.config import ModelArgs
from moonlight.distributed import backend_for, broadcast_object, default_device, init_process_group
from moonlight.dtypes import to_dtype
from moonlight.errors import CheckpointError, ConfigError
from moonlight.hf import HFCheckpoint
from moonlight.model.converters import ModelConverter
from moonlight.model.lora import hide_adapters, init_dora_magnitude
from moonlight.outputs import refuse_link
from moonlight.parallel.load import load_hf_sharded
from moonlight.train.config import JobConfig
from moonlight.train.lock import DumpFolderLock

logger = logging.getLogger(__name__)


def build_model_args(cfg: JobConfig) -> ModelArgs:
    """The preset (or a HF config.json, or the model args of the model-only DCP checkpoint that
    initial_load_hf names) with [model.overrides], kernels and the aux-loss coefficient."""
    hf_config = cfg.model.hf_config or cfg.checkpoint.initial_load_hf
    if hf_config and not os.path.exists(hf_config):  # name the key, not only the config.json it was read for
        key = "model.hf_config" if cfg.model.hf_config else "checkpoint.initial_load_hf"
        raise ConfigError(
            f"{key} = {hf_config!r} does not exist: point it at a Hugging Face checkpoint directory"
            + (" (or a config.json)" if cfg.model.hf_config else " or a `python -m moonlight.convert hf-to-dcp` output")
        )
    if hf_config and not cfg.model.hf_config and os.path.isfile(os.path.join(hf_config, DCP_METADATA)):
        base = model_args_from_meta(read_meta(hf_config))  # `python -m moonlight.convert hf-to-dcp` output
        if base is None:
            raise ConfigError(
                f"checkpoint.initial_load_hf = {hf_config} records no model args in its meta.json: "
                "set model.hf_config to the model's config.json"
            )
    else:
        base = ModelArgs.from_hf_config(hf_config) if hf_config else ModelArgs.preset(cfg.model.name)
    fields = {f.name for f in dataclasses.fields(ModelArgs)}
    for key in cfg.model.overrides:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"model.overrides.{key} is not a ModelArgs field{hint}; valid: {sorted(fields)}")
    return dataclasses.replace(
        base, **{**cfg.model.overrides, "kernels": cfg.model.kernels, "aux_loss_alpha": cfg.moe.aux_loss_coeff}
    )


def build_converters(cfg: JobConfig) -> list[ModelConverter]:
    """The model converters the job config asks for, in the order they apply (see convert_model)."""
    return [cfg.lora.build()] if cfg.lora.enable else []


def check_token_ids(store, vocab_size: int, what: str) -> None:
    """Moonlight's tokenizer has 2 more ids than embedding rows: check the ids the data really uses."""
    largest = max(int(tokens.max()) for tokens in store.tokens if tokens.size)
    if largest >= vocab_size:
        raise ConfigError(
            f"the {what} holds token id {largest} but the model's vocab_size is "
            f"{vocab_size}: raise model vocab_size or change data.tokenizer"
        )


def load_initial_weights(ckpt: Checkpointer, path: str, lora: bool = False) -> bool:
    """Weights for a fresh run (one with no checkpoint in ckpt's folder; returns whether it loaded):
    an HF directory, each rank reading only its slices, or a model-only DCP checkpoint from
    `python -m moonlight.convert hf-to-dcp`. With LoRA the checkpoint holds the base weights, and
    DoRA's magnitudes start at their row norms."""
    if ckpt.cfg.enable and ckpt.available_steps():
        return False
    read_base_weights(ckpt, path, lora)
    return True


def read_base_weights(ckpt: Checkpointer, path: str, lora: bool = False) -> None:
    """The base weights from `path` (HF or model-only DCP) into ckpt's model parts; the adapters of a
    LoRA run are left alone and DoRA's magnitudes set to the loaded weights' row norms."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint.initial_load_hf={path} does not exist or is not a directory")
    with contextlib.ExitStack() as stack:
        for part in ckpt.model_parts if lora else []:
            stack.enter_context(hide_adapters(part))
        if os.path.isfile(os.path.join(path, DCP_METADATA)):
            meta = read_meta(path)
            # without its base it would read the base from itself, endlessly; with it the adapters would be dropped
            if meta.get("frozen_weights_from") or saved_lora(meta):
                raise CheckpointError(
                    f"checkpoint.initial_load_hf = {path} is a LoRA/DoRA run's checkpoint, not a base model: start "
                    "from its merged model (python -m moonlight.convert dcp-to-hf), or from its base with its "
                    "adapter as lora.init_adapter (python -m moonlight.convert dcp-to-peft)"
                )
            ckpt.load_path(path, model_only=True)
        else:
            checkpoint = HFCheckpoint(path)
            for part in ckpt.model_parts:
                load_hf_sharded(part, checkpoint=checkpoint)
    if lora:
        for part in ckpt.model_parts:
            init_dora_magnitude(part)


def use_tf32(device: torch.device) -> None:
    """fp32 matmuls and convolutions in TF32 on GPUs (fp32 runs, fp32 islands of bf16 runs); CPUs keep
    full fp32, so CPU runs stay bit-identical."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"


def init_distributed(timeout_s: float = 600.0) -> tuple[int, int, torch.device]:
    """Join the torchrun job (NCCL on GPUs, gloo on CPU), its collectives giving up after timeout_s; a
    single process needs no process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = default_device(local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    use_tf32(device)
    if world > 1 and not dist.is_initialized():
        init_process_group(backend_for(device.type), timeout_s)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world, device


def take_dump_folder_lock(
    dump_folder: str, rank: int, also: tuple[str, ...] = (), check: Callable[[], None] = lambda: None
) -> DumpFolderLock:
    """Rank 0 locks the dump folder (and `also`, the checkpoint folder, where a symlink puts it), then runs
    `check` (the run's own paths); every rank raises the same ConfigError if another trainer holds the
    lock or the check fails."""
    lock = DumpFolderLock(dump_folder, also)
    error = None
    if rank == 0:
        try:
            lock.acquire()
            check()
        except ConfigError as e:
            lock.release()
            error = str(e)
    error = broadcast_object(error)
    if error:
        raise ConfigError(error)
    return lock


def check_run_paths(cfg: JobConfig) -> None:
    """The files and folders the run writes in its dump folder are its own: never a symlink (a write would
    land outside it) nor the other kind of entry (a directory where config.toml goes, a file where the
    HF exports go), found now rather than when the first write fails, maybe after training."""
    dump = cfg.job.dump_folder
    refuse_link(os.path.join(dump, "config.toml"))
    refuse_link(os.path.join(dump, "metrics.jsonl"))
    folders = [cfg.checkpoint.folder] if cfg.checkpoint.enable else []
    folders += ["hf"] if cfg.checkpoint.export_hf else []
    folders += ["adapter"] if cfg.lora.enable and cfg.lora.export_adapter else []
    folders += [cfg.metrics.tb_folder] if cfg.metrics.enable_tensorboard else []
    for folder in folders:
        path = os.path.join(dump, folder)
        if os.path.lexists(path) and not os.path.isdir(path):
            refuse_link(path, "folder")


def check_seq_len(cfg: JobConfig, args: ModelArgs) -> None:
    if cfg.training.seq_len > args.max_position_embeddings:
        raise ConfigError(
            f"training.seq_len = {cfg.training.seq_len} exceeds the model's max_position_embeddings = "
            f"{args.max_position_embeddings}: lower training.seq_len (or raise "
            "model.overrides.max_position_embeddings for a model trained for longer contexts)"
        )


def check_runtime(cfg: JobConfig, args: ModelArgs, device: torch.device) -> None:
    """Settings that are valid on their own but not for this model or device."""
    check_seq_len(cfg, args)
    if args.kernels == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise ConfigError(
            f"model.kernels = 'triton' needs a CUDA GPU (this device is {device.type}); use "
            "model.kernels = 'auto' or 'torch', or set TRITON_INTERPRET=1 to interpret the kernels"
        )


def available_memory_bytes() -> int | None:
    """MemAvailable of this host (Linux), None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_host_memory(
    cfg: JobConfig, args: ModelArgs, world_size: int, device: torch.device, full_init: bool = False
) -> None:
    """On CPU, before any weight is materialized: the weights and their gradients of every rank on this host
    (a lower bound of what training needs: `python -m moonlight.plan` estimates all of it) must fit in its
    available memory, or the run would be killed for memory minutes later, or swap for hours."""
    available = available_memory_bytes()
    if device.type != "cpu" or available is None:
        return
    itemsize = torch.empty(0, dtype=to_dtype(cfg.training.dtype)).element_size()
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    copies = 1 if cfg.lora.enable else 2  # weights + gradients (LoRA: the frozen weights have none)
    weights = args.num_params() * itemsize
    per_rank = copies * weights / max(world_size, 1)  # sharded
    if full_init:  # the model is initialized whole on every rank before sharding
        per_rank = max(per_rank, weights)
    need = per_rank * local_ranks
    if need > available:
        gib = 2**30
        raise ConfigError(
            f"this {args.num_params() / 1e9:.1f}B-parameter model needs at least {need / gib:.1f} GiB "
            f"of host memory for its weights (and gradients) alone ({local_ranks} rank(s) here), but "
            f"{available / gib:.1f} GiB is available: train it on GPUs, over more hosts, or pick a "
            "smaller model (python -m moonlight.plan estimates a configuration's memory)"
        )


def warn_about_data(cfg: JobConfig, loader, validation_loader=None) -> None:
    """Settings that train on what was probably not meant: repeated epochs, validation on the training data."""
    t = cfg.training
    planned, per_epoch = t.steps * t.global_batch_size, loader.sequences_per_epoch
    if planned > per_epoch:
        logger.warning(
            "data: %d steps of %d sequences read %d sequences, %.1f epochs of the %d in %s: the data repeats",
            t.steps,
            t.global_batch_size,
            planned,
            planned / per_epoch,
            per_epoch,
            cfg.data.path,
        )
    if (
        validation_loader is not None
        and validation_loader.store.fingerprint() == loader.store.fingerprint()
        and validation_loader.store.num_tokens == loader.store.num_tokens
    ):
        logger.warning(
            "validation: validation.path %s holds the same documents as data.path %s: the validation "
            "loss is a training loss, not a held-out one",
            cfg.validation.path,
            cfg.data.path,
        )
