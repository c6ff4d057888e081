"""Process-group helpers that also work without a process group (one process), the default device
and its backend, the plain tensor behind a DTensor's local shard or a functional collective's
result, and the host-to-device copy that does not wait for the device. Everything above the model
layer reaches torch.distributed's rank, world size and object collectives through these, so a
single process needs no set-up."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.tensor import DTensor

from moonlight.errors import ConfigError


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
    here = device is not None and (device.type == "cpu" or (
        accelerator is not None and device.type == accelerator.type
        and (device.index is None or device.index < torch.accelerator.device_count())))
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
