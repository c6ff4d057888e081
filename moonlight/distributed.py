"""Process-group helpers that also work without a process group (one process), the default device
and its backend, the plain tensor behind a DTensor's local shard or a functional collective's
result, and the host-to-device copy that does not wait for the device. Everything above the model
layer reaches torch.distributed's rank, world size and object collectives through these, so a
single process needs no set-up. Joining a torchrun job sets a collective timeout and keeps the job's
store, through which the ranks that stop answering (or that alone met an error) are named."""

from __future__ import annotations

import datetime
import os
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.tensor import DTensor

from moonlight.errors import ConfigError


_STORE: list[Any] = []  # the job's key-value store once init_process_group ran: who answered, who failed


def init_process_group(backend: str, timeout_s: float) -> None:
    """Join the torchrun job (its env:// variables) with collectives that give up after `timeout_s`; the
    job's store is kept to name the ranks that stop answering (see silent_ranks)."""
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise ConfigError(
                f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} is set but {key} is not: launch with "
                f"torchrun --nproc_per_node={os.environ.get('WORLD_SIZE')} ..., or unset WORLD_SIZE "
                "for a single process"
            )
    store, rank, world = next(dist.rendezvous("env://"))
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s)
    )
    _STORE[:] = [store]


def is_collective_timeout(e: BaseException) -> bool:
    """Whether an exception is a collective that gave up waiting (gloo's "Timed out waiting ...", NCCL's
    watchdog)."""
    return isinstance(e, RuntimeError) and any(
        m in str(e) for m in ("Timed out waiting", "collective operation timeout")
    )


def _mark_and_collect(tag: str, wait_s: float, until: Any) -> set[int]:
    """Set this rank's `tag` key in the job's store, then wait up to wait_s for `until(ranks seen)`;
    returns the ranks whose key is set."""
    store, me, world = _STORE[0], rank(), world_size()
    store.set(f"moonlight/{tag}/{me}", "1")
    deadline = time.monotonic() + wait_s
    while True:
        seen = {r for r in range(world) if store.check([f"moonlight/{tag}/{r}"])}
        if until(seen) or time.monotonic() > deadline:
            return seen
        time.sleep(0.1)


def silent_ranks(wait_s: float = 5.0) -> list[int] | None:
    """After a collective timed out on this rank: the ranks that did not time out too within wait_s (they
    stopped or hang elsewhere); None when unknown (no store)."""
    if not _STORE or not is_distributed():
        return None
    try:
        seen = _mark_and_collect("timeout", wait_s, lambda s: len(s) == world_size())
    except (RuntimeError, OSError):  # the store is gone with the rank that hosted it
        return None
    return sorted(set(range(world_size())) - seen)


def reported_by_rank0(wait_s: float = 3.0) -> bool:
    """A user error on this rank: whether rank 0 met one too (and printed it), so this rank need not. Without
    the job's store (the error came before joining it) every rank is taken to meet the same error."""
    if not _STORE or not is_distributed():
        return True
    try:
        return 0 in _mark_and_collect("error", wait_s if rank() else 0.0, lambda s: 0 in s)
    except (RuntimeError, OSError):  # the store is gone with the rank that hosted it: say it here
        return False


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (just [obj] in one process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def default_device(local_rank: int = 0) -> torch.device:
    """This process's device: GPU `local_rank` where CUDA is available, else the CPU."""
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def checked_device(name: str, what: str = "device") -> torch.device:
    """A device named by the user, if this machine has it: the CPU or the accelerator torch was built
    for (an index below its device count); else a ConfigError naming the default device."""
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    accelerator = torch.accelerator.current_accelerator()
    here = device is not None and (
        device.type == "cpu"
        or (
            accelerator is not None
            and device.type == accelerator.type
            and (device.index is None or device.index < torch.accelerator.device_count())
        )
    )
    if not here:
        others = f" or {accelerator.type}:N (N < {torch.accelerator.device_count()})" if accelerator else ""
        raise ConfigError(f"{what} {name!r}: no such device on this machine; use {default_device().type!r}{others}")
    return device


def backend_for(device_type: str) -> str:
    """The process-group backend torch pairs with a device type (NCCL for CUDA, gloo for the CPU)."""
    return dist.get_default_backend_for_device(device_type)


def init_single_process_group(device_type: str) -> None:
    """A one-rank process group (in-process store, no launcher), for a single process that still
    wants the parallel machinery: FSDP2 on a 1-rank mesh applies the mixed-precision policy."""
    if not is_distributed():
        dist.init_process_group(backend_for(device_type), store=dist.HashStore(), rank=0, world_size=1)


def p2p_device() -> torch.device:
    """Where point-to-point tensors must live for this backend (NCCL: the current GPU)."""
    if is_distributed() and "nccl" in str(dist.get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def collective_result(t: torch.Tensor) -> torch.Tensor:
    """A functional collective's output as a plain tensor: waited for if it is still in flight."""
    return funcol.wait_tensor(t) if isinstance(t, funcol.AsyncCollectiveTensor) else t


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; a plain tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t  # isinstance: torch.compile traces it, not hasattr


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """t on `device`. From the host without a host sync: copied non-blocking, from pinned memory on
    CUDA (a copy from pageable memory waits for the work already queued on the device)."""
    device = torch.device(device)
    if t.device.type != "cpu" or device.type == "cpu":
        return t.to(device)  # a non-blocking copy to the host could be read before it lands
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)
