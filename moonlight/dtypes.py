"""Dtype names as configs and command lines spell them."""

from __future__ import annotations

import torch

from moonlight.errors import ConfigError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def to_dtype(name: str | torch.dtype | None, what: str = "dtype") -> torch.dtype | None:
    """'bfloat16' / 'bf16' / 'torch.bfloat16' / a torch.dtype -> torch.dtype; None stays None."""
    if name is None or isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.")
    if key not in DTYPES:
        raise ConfigError(f"{what} {name!r} is not a dtype we train in; use one of {sorted(DTYPES)}")
    return DTYPES[key]


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """x in fp32, or in its own dtype when that is wider (an fp64 run stays fp64: upcasts never go down)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def is_mixed(param_dtype: str | torch.dtype | None, reduce_dtype: str | torch.dtype | None) -> bool:
    """Whether FSDP's mixed-precision policy casts anything: either dtype is set and not fp32."""
    return any(to_dtype(d) not in (None, torch.float32) for d in (param_dtype, reduce_dtype))
