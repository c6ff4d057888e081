"""Moonlight-16B-A3B in plain PyTorch.

`from moonlight import ModelArgs, Moonlight` loads them on first use (PEP 562), so that importing a
cheap submodule (moonlight.train.config, moonlight.errors) does not import the model and its kernels.
"""

import importlib

__all__ = ["ModelArgs", "Moonlight"]
_HOMES = {"ModelArgs": "moonlight.config", "Moonlight": "moonlight.model"}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'moonlight' has no attribute {name!r}")
