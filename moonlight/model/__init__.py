"""The Moonlight model (`moonlight.model.model`) and what transforms it: LoRA/DoRA adapters (`lora`),
model converters (`converters`), the loss from hidden states (`loss`).

`from moonlight.model import Moonlight` loads the model on first use (PEP 562), so that the job config can
import the light `moonlight.model.lora` without the model and its kernels.
"""

import importlib

__all__ = [
    "MLA",
    "MLP",
    "MoE",
    "Block",
    "DocumentMask",
    "GroupedExperts",
    "LocalDispatcher",
    "Moonlight",
    "RMSNorm",
    "Router",
]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("moonlight.model.model"), name)
    raise AttributeError(f"module 'moonlight.model' has no attribute {name!r}")
