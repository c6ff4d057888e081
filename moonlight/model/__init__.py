from moonlight.model.model import (
    MLA,
    MLP,
    MoE,
    Block,
    DocumentMask,
    GroupedExperts,
    LocalDispatcher,
    Moonlight,
    RMSNorm,
    Router,
)

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
