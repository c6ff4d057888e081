"""Model converters: transforms of a built, unsharded model before it is parallelized.

LoRA/DoRA adapters (`moonlight.model.lora.LoRAConverter`) are one; FP8 linears would be another.
The trainer and the planner build the list from the job config (`moonlight.train.build`) and apply
it with one call, `convert_model`, so neither names a particular transform.

The loss reads `lm_head.weight` directly only while the head is the model's own nn.Linear (marked
`plain_linear`); a head a converter puts in its place makes its logits with its own forward.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from torch import nn


class ModelConverter(Protocol):
    def convert(self, model: nn.Module) -> None:
        """Swap or add modules of the whole model, in place (it may still be on the meta device)."""

    def init_weights(self, model: nn.Module) -> None:
        """Initialize what `convert` added, once a meta-device model part has been materialized."""

    def describe(self, parts: Iterable[nn.Module]) -> str:
        """One line for the run's start-up log."""


def convert_model(model: nn.Module, converters: Sequence[ModelConverter]) -> nn.Module:
    """Apply every converter in order (in place); returns the model."""
    for converter in converters:
        converter.convert(model)
    return model


def init_converted_weights(parts: Iterable[nn.Module], converters: Sequence[ModelConverter]) -> None:
    """`init_weights` of every converter on every materialized model part."""
    for part in parts:
        for converter in converters:
            converter.init_weights(part)
