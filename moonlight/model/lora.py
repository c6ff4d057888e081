"""LoRA and DoRA adapters for fine-tuning, applied to a built model by module name.

    names = apply_lora(model, targets=DEFAULT_TARGETS, rank=8, alpha=16.0, dora=False)
    merge_lora(model)                    # fold adapters into the base weights: a plain Moonlight again

A `LoRALinear` keeps the base weight as ``<name>.weight`` and adds ``<name>.lora_a.weight`` [r, in],
``<name>.lora_b.weight`` [out, r] (zeros) and, for DoRA, ``<name>.magnitude`` [out]. scale = alpha / r.

    LoRA: y = x W^T + scale * dropout(x) A^T B^T
    DoRA: y = m / ||W + scale B A||_row * (W + scale B A) x   (the norm detached, as PEFT)

`LoRASection` ([lora]) builds the model converter, `LoRAConverter`. Details: docs/fine-tuning.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterable, Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from moonlight.errors import ConfigError, failing

__all__ = [
    "DEFAULT_TARGETS",
    "LoRAConverter",
    "LoRASection",
    "LoRALinear",
    "apply_lora",
    "merge_lora",
    "merge_lora_state_dict",
    "lora_modules",
    "lora_scales",
    "reset_lora_parameters",
    "init_dora_magnitude",
    "hide_adapters",
    "is_adapter_name",
    "count_params",
]

# "The attention linears" of MLA. q_proj exists when q_lora_rank is None (Moonlight), q_a_proj/q_b_proj
# otherwise: those three may match nothing; any other target that matches no module is an error.
DEFAULT_TARGETS = ("attn.q_proj", "attn.q_a_proj", "attn.q_b_proj", "attn.kv_a_proj", "attn.kv_b_proj", "attn.o_proj")
_ALTERNATIVE_TARGETS = {"attn.q_proj", "attn.q_a_proj", "attn.q_b_proj"}
_ADAPTER_SUFFIXES = (".lora_a.weight", ".lora_b.weight", ".magnitude")


def is_adapter_name(name: str) -> bool:
    """Whether a parameter / state-dict key is a LoRA/DoRA adapter tensor."""
    return name.endswith(_ADAPTER_SUFFIXES)


class _Factor(nn.Module):
    """Holds one adapter matrix as ``.weight``. Deliberately not an nn.Linear: Moonlight.init_weights
    initializes every nn.Linear ~ N(0, std), which must not touch the adapters (B starts at zero)."""

    def __init__(self, out_features: int, in_features: int, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))


def _row_norm(w: torch.Tensor) -> torch.Tensor:
    """||w||_2 over the input dim (dim 1 of [out, in]), in at least fp32."""
    return torch.linalg.vector_norm(w.to(torch.promote_types(w.dtype, torch.float32)), dim=1)


class LoRALinear(nn.Linear):
    """An nn.Linear (same ``weight``/``bias``, frozen) plus a trainable low-rank update.

    Subclasses nn.Linear so code that initializes or inspects linears by type (Moonlight.init_weights)
    still sees the base layer."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dora: bool = False, dropout: float = 0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.alpha, self.use_dora = rank, float(alpha), dora
        self.scale = self.alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_a = _Factor(rank, self.in_features, **kw)
        self.lora_b = _Factor(self.out_features, rank, **kw)
        self.register_parameter("magnitude", nn.Parameter(torch.empty(self.out_features, **kw)) if dora else None)
        if not base.weight.is_meta:
            self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """A ~ kaiming-uniform (as nn.Linear / PEFT), B = 0, DoRA magnitude = ||W||_row."""
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)
        self.init_dora_magnitude()

    @torch.no_grad()
    def init_dora_magnitude(self) -> None:
        if self.magnitude is not None:  # W's row norms; B = 0 makes W + sBA = W
            delta = self.scale * (self.lora_b.weight @ self.lora_a.weight)
            self.magnitude.copy_(_row_norm(self.weight + delta).to(self.magnitude.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.weight, self.bias)
        a, b = self.lora_a.weight, self.lora_b.weight
        lora = F.linear(F.linear(self.dropout(x), a), b) * self.scale
        if self.magnitude is None:
            return base + lora
        # DoRA as PEFT: m / ||W + sBA||_row (detached) rescales the base and the low-rank path.
        weight = self.weight + self.scale * (b @ a)
        norm = _row_norm(weight).to(weight.dtype).detach()
        # PEFT: base + (m/n - 1) * base + (m/n) * lora, with base = x W^T (bias added after)
        if self.bias is not None:
            base = base - self.bias
        out = (self.magnitude / norm) * (base + lora)
        return out + self.bias if self.bias is not None else out

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        return merge_weight(self.weight, self.lora_a.weight, self.lora_b.weight, self.scale, self.magnitude)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"alpha={self.alpha}, dora={self.use_dora}"
        )


def merge_weight(
    weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, magnitude: torch.Tensor | None = None
) -> torch.Tensor:
    """W + scale * B A (LoRA) or m * (W + scale B A) / ||W + scale B A||_row (DoRA), computed in (at least)
    fp32 and returned in W's dtype."""
    dt = torch.promote_types(weight.dtype, torch.float32)
    w = weight.to(dt) + scale * (b.to(dt) @ a.to(dt))
    if magnitude is not None:
        w = w * (magnitude.to(dt) / torch.linalg.vector_norm(w, dim=1)).unsqueeze(1)
    return w.to(weight.dtype)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def apply_lora(
    model: nn.Module,
    targets: Iterable[str] = DEFAULT_TARGETS,
    rank: int = 8,
    alpha: float = 16.0,
    dora: bool = False,
    dropout: float = 0.0,
) -> list[str]:
    """Replace every nn.Linear whose name ends with one of `targets` (module-name suffixes, e.g.
    "attn.q_proj") by a LoRALinear; freeze every other parameter. Returns the adapted module names.
    Call before any parallel wrapping (FSDP may follow). Raises ValueError for a bad rank/alpha/
    dropout, a target that matches no module (the alternative MLA q projections excepted) or one that
    matches a module that is not an nn.Linear."""
    targets = list(targets)
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    if not targets:
        raise ValueError("LoRA targets is empty: name the modules to adapt, e.g. ['attn.q_proj']")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA adapters")
    modules = dict(model.named_modules())
    chosen: list[str] = []
    for target in targets:
        hits = [n for n in modules if n and _matches(n, target)]
        if not hits:
            if target in _ALTERNATIVE_TARGETS:
                continue
            linears = sorted(
                {
                    n.split(".", 2)[-1] if n.startswith("layers.") else n
                    for n, m in modules.items()
                    if isinstance(m, nn.Linear)
                }
            )
            raise ValueError(
                f"LoRA target {target!r} matches no module of the model; linear modules are named like {linears}"
            )
        for n in hits:
            if not isinstance(modules[n], nn.Linear):
                raise ValueError(
                    f"LoRA target {target!r} matches {n!r}, a {type(modules[n]).__name__}, not an nn.Linear"
                )
            if n not in chosen:
                chosen.append(n)
    if not chosen:
        raise ValueError(f"LoRA targets {targets} match no module of the model")
    for p in model.parameters():
        p.requires_grad_(False)
    for n in chosen:
        parent_name, _, child = n.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(modules[n], rank, alpha, dora=dora, dropout=dropout))
    return chosen


@dataclasses.dataclass
class LoRAConverter:
    """The model converter of a [lora] section: `apply_lora` with its settings (see ModelConverter)."""

    targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS
    rank: int = 8
    alpha: float = 16.0
    dora: bool = False
    dropout: float = 0.0
    adapted: list[str] = dataclasses.field(default_factory=list)  # the adapted linears, once converted

    def convert(self, model: nn.Module) -> None:
        try:
            self.adapted = apply_lora(
                model, self.targets, rank=self.rank, alpha=self.alpha, dora=self.dora, dropout=self.dropout
            )
        except ValueError as e:
            raise ConfigError(f"lora: {e} (lora.targets = {list(self.targets)})") from None

    def init_weights(self, model: nn.Module) -> None:
        reset_lora_parameters(model)

    def describe(self, parts: Iterable[nn.Module]) -> str:
        trainable, total = count_params(parts)
        return (
            f"{'DoRA' if self.dora else 'LoRA'} rank {self.rank} alpha {self.alpha:g} on {len(self.adapted)} "
            f"modules: trainable {trainable:,} of {total:,} params ({100 * trainable / total:.3f}%)"
        )


@dataclasses.dataclass
class LoRASection:
    enable: bool = False
    """Fine-tune low-rank adapters only (everything else frozen); see docs/fine-tuning.md."""
    rank: int = 8
    """Adapter rank r."""
    alpha: float = 16.0
    """Adapter scale = alpha / rank."""
    dora: bool = False
    """DoRA: also learn a per-output-row magnitude of the adapted weight."""
    dropout: float = 0.0
    """Dropout on the adapter path's input."""
    targets: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_TARGETS))
    """Module-name suffixes of the nn.Linear layers to adapt (default: the attention linears; the q
    projections that the model lacks, q_proj or q_a/q_b_proj, are skipped)."""
    export_adapter: Literal["", "end", "each"] = ""
    """Also write the adapters as a PEFT adapter (<dump_folder>/adapter/step-N): never, at the end, or
    at each checkpoint save."""
    init_adapter: str = ""
    """A PEFT adapter directory to start the adapters from (loaded after the base weights)."""

    def problems(self) -> list[str]:
        if not self.enable:
            return failing(
                [
                    (
                        not self.init_adapter and not self.export_adapter,
                        "lora.init_adapter / lora.export_adapter need lora.enable = true",
                    )
                ]
            )
        return failing(
            [
                (self.rank >= 1, f"lora.rank must be >= 1 (got {self.rank})"),
                (self.alpha > 0, f"lora.alpha must be > 0 (got {self.alpha})"),
                (0 <= self.dropout < 1, f"lora.dropout must be in [0, 1) (got {self.dropout})"),
                (
                    bool(self.targets) and all(self.targets),
                    f'lora.targets must name at least one module suffix, e.g. "attn.q_proj" (got {self.targets})',
                ),
            ]
        )

    def build(self) -> LoRAConverter:
        """The model converter that adds these adapters."""
        return LoRAConverter(self.targets, rank=self.rank, alpha=self.alpha, dora=self.dora, dropout=self.dropout)


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for n, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield n, m


def lora_scales(model: nn.Module) -> dict[str, float]:
    """Module name -> alpha / rank of every adapter (what `merge_lora_state_dict` needs)."""
    return {n: m.scale for n, m in lora_modules(model)}


@torch.no_grad()
def reset_lora_parameters(model: nn.Module) -> None:
    """(Re)initialize every adapter: after the base weights were materialized from the meta device."""
    for _, m in lora_modules(model):
        m.reset_lora_parameters()


@torch.no_grad()
def init_dora_magnitude(model: nn.Module) -> None:
    """Set every DoRA magnitude to the row norms of the current W + sBA: after loading base weights."""
    for _, m in lora_modules(model):
        m.init_dora_magnitude()


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put a plain nn.Linear back (in place; returns model).
    The merged weights keep W's dtype and requires_grad=False stays as set by apply_lora."""
    for n, m in list(lora_modules(model)):
        linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        linear.weight = nn.Parameter(m.merged_weight(), requires_grad=m.weight.requires_grad)
        if m.bias is not None:
            linear.bias = m.bias
        parent_name, _, child = n.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, linear)
    return model


def merge_lora_state_dict(sd: dict[str, torch.Tensor], scales: dict[str, float]) -> dict[str, torch.Tensor]:
    """A full native state dict with adapter keys -> the merged one with only the base keys (new dict).
    scales: module name -> alpha / rank (`lora_scales(model)`). Every adapter key must belong to a
    module in scales."""
    out = {k: v for k, v in sd.items() if not is_adapter_name(k)}
    for name, scale in scales.items():
        a, b = sd.get(f"{name}.lora_a.weight"), sd.get(f"{name}.lora_b.weight")
        w = sd.get(f"{name}.weight")
        if a is None or b is None or w is None:
            continue  # not held here (another pipeline stage)
        out[f"{name}.weight"] = merge_weight(w, a, b, scale, sd.get(f"{name}.magnitude"))
    leftover = [
        k for k in sd if is_adapter_name(k) and k.rsplit(".", 2 if k.endswith(".weight") else 1)[0] not in scales
    ]
    if leftover:
        raise ValueError(f"adapter keys without a known LoRA scale: {leftover[:5]}")
    return out


@contextlib.contextmanager
def hide_adapters(model: nn.Module):
    """Temporarily detach the adapter sub-modules/parameters so the model's parameters and state
    dict are those of the plain model (e.g. to load an HF checkpoint into the base weights)."""
    hidden = []
    for _, m in lora_modules(model):
        hidden.append((m, m._modules.pop("lora_a"), m._modules.pop("lora_b"), m._parameters.pop("magnitude", None)))
    try:
        yield model
    finally:
        for m, a, b, mag in hidden:
            m._modules["lora_a"], m._modules["lora_b"] = a, b
            m._parameters["magnitude"] = mag  # None for LoRA, as registered


def count_params(parts: Iterable[nn.Module]) -> tuple[int, int]:
    """(trainable, total) parameter counts (global sizes for DTensor parameters)."""
    seen, trainable, total = set(), 0, 0
    for part in parts:
        for p in part.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
    return trainable, total
