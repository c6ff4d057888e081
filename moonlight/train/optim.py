"""Optimizers and gradient clipping for Moonlight training (the LR schedule is in
moonlight.train.schedule, the MoE bias update in moonlight.train.balance).

Muon as Moonlight was trained (arXiv:2502.16982): Nesterov momentum 0.95, 5 Newton-Schulz steps on
``X / (||X||_F + 1e-7)``, ``W <- W*(1 - lr*wd) - lr * 0.2*sqrt(max(A, B)) * O``. Parameters may be
DTensors: momentum and weight decay stay on the local shard, NS runs on the full matrix
(`moonlight.train.muon`). Every optimizer is a standard ``torch.optim.Optimizer``, so DCP and
``LambdaLR`` work on it. Details: docs/optimizers.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.optim.adam import adam

from moonlight.distributed import local_tensor
from moonlight.errors import failing
from moonlight.train.muon import (
    NS_COEFFICIENTS,
    NSSettings,
    orthogonalize,
    plan_orthogonalization,
    zeropower_via_newtonschulz,
)

__all__ = [
    "NS_COEFFICIENTS",
    "zeropower_via_newtonschulz",
    "muon_lr_scale",
    "Muon",
    "AdamW",
    "Optimizers",
    "is_adamw_param_name",
    "build_optimizers",
    "OptimizerSection",
    "clip_grad_norm_",
]

# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def muon_lr_scale(shape: Sequence[int]) -> float:
    """Moonlight's update-RMS matching factor 0.2*sqrt(max(A, B)) of one (expert) matrix."""
    A, B = shape[-2], shape[-1]
    return 0.2 * math.sqrt(max(A, B))


def _grad_like_param(p: Tensor, g: Tensor) -> Tensor:
    """The gradient as a tensor laid out like the parameter (a DTensor grad may come back with
    other placements than its parameter, e.g. Partial or Replicate)."""
    if isinstance(p, DTensor):
        if not isinstance(g, DTensor):
            raise TypeError("DTensor parameter with a plain-tensor gradient")
        if g.device_mesh != p.device_mesh or tuple(g.placements) != tuple(p.placements):
            g = g.redistribute(p.device_mesh, p.placements)
    return g


def _init_state(state: dict, p: Tensor, master_weights: bool, *buffers: str) -> None:
    """A parameter's state on its first step: zero `buffers`, fp32 with master weights (plus the fp32
    master copy), else in p's dtype. A DTensor parameter gets DTensor state with the same placements
    (DCP can reshard it)."""
    dtype = torch.float32 if master_weights else p.dtype
    for name in buffers:
        state[name] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
    if master_weights:
        state["master"] = p.detach().to(torch.float32, copy=True)


# --------------------------------------------------------------------------------------------
# Muon
# --------------------------------------------------------------------------------------------


class Muon(torch.optim.Optimizer):
    """Muon for 2-D matrices and 3-D stacked expert weights ``[E, A, B]`` (per-expert NS).

    Args:
        lr, weight_decay: as AdamW (decoupled decay ``W *= 1 - lr*wd``; Moonlight uses 0.1).
        momentum, nesterov: ``buf = mu*buf + g``; the NS input is ``g + mu*buf`` when nesterov,
            else ``buf``. (torch.optim.Muon uses a lerp form, which differs by the constant
            factor 1-mu and so gives the same orthogonalized update up to eps.)
        ns_steps, ns_coefficients, eps: Newton-Schulz settings.
        ns_dtype: dtype NS runs in (bf16 as Moonlight; fp32 for exact tests).
        master_weights: precision-aware mode. Keep an fp32 copy of the parameter
            (``state['master']``) and fp32 momentum; the update is applied to the fp32 copy and
            copied back into the (bf16) parameter.
        process_group: where the Newton-Schulz exchange runs (None: the world).
        replicas: a mesh over whose dims every parameter is copied unless its own DTensor mesh
            shards it (the world mesh without pp); its copies then share one orthogonalization.

    DTensor parameters: momentum/decay run on the local shard; each full (expert) matrix is
    orthogonalized by one rank of the group sharing it and the result scattered back (see
    `moonlight.train.muon`). ``step`` first updates every momentum, then exchanges and
    orthogonalizes all matrices at once (two all-to-alls on ``process_group``, default the world:
    every rank of it that holds a shared matrix must step its Muon together). Momentum, decay and
    update are foreach ops over a param group's tensors, and same-shaped matrices run NS as one stack,
    so a step launches a few ops per shape, not a few per matrix (bit for bit the same weights).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = 1e-7,
        ns_dtype: torch.dtype = torch.bfloat16,
        master_weights: bool = False,
        process_group: dist.ProcessGroup | None = None,
        replicas: DeviceMesh | None = None,
    ):
        if lr < 0 or weight_decay < 0 or momentum < 0:
            raise ValueError("lr, weight_decay and momentum must be >= 0")
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            ns_coefficients=tuple(ns_coefficients),
            eps=eps,
            ns_dtype=ns_dtype,
            master_weights=master_weights,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim not in (2, 3):
                    raise ValueError(f"Muon takes 2-D matrices or 3-D [E, A, B] expert weights, got {tuple(p.shape)}")
        self.process_group = process_group
        self.replicas = replicas
        self._plans: dict = {}  # parameters with a gradient (as a tuple of ids) -> their MatrixPlans

    def _orthogonalize(self, work: list[tuple[dict, Tensor, Tensor]]) -> list[Tensor]:
        """NS of every (param group, param, local update) in ``work``; returns the local slices."""
        params = [p for _, p, _ in work]
        key = tuple(id(p) for p in params)
        if key not in self._plans:  # the same parameters get gradients step after step
            self._plans = {key: plan_orthogonalization(params, [g["ns_steps"] for g, _, _ in work], self.replicas)}
        dtypes = {g["ns_dtype"] for g, _, _ in work} or {self.defaults["ns_dtype"]}
        if len(dtypes) > 1:
            raise ValueError(f"Muon: all param groups need one ns_dtype (the exchange runs in it), got {dtypes}")
        settings = [NSSettings(g["ns_steps"], g["ns_coefficients"], g["eps"]) for g, _, _ in work]
        first = self.param_groups[0]["params"][0]
        return orthogonalize(
            self._plans[key],
            [u for _, _, u in work],
            settings,
            dtypes.pop(),
            local_tensor(first).device,
            self.process_group,
        )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []  # (group, param, local update): momentum first, then every NS in one exchange
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    _init_state(self.state[p], p, group["master_weights"], "momentum_buffer")
            if not params:
                continue
            # one op per step for all of the group's tensors (a Python loop would launch one per tensor)
            mu = group["momentum"]
            bufs = [local_tensor(self.state[p]["momentum_buffer"]) for p in params]
            grads = [local_tensor(_grad_like_param(p, p.grad)) for p in params]
            torch._foreach_mul_(bufs, mu)
            torch._foreach_add_(bufs, grads)  # a bf16 gradient into fp32 momentum: promoted exactly
            updates = torch._foreach_add(grads, bufs, alpha=mu) if group["nesterov"] else bufs
            work += [(group, p, u) for p, u in zip(params, updates)]
        outs = self._orthogonalize(work)
        by_step: dict = {}  # the tensors that take the same decay and step size: one foreach op each
        for (group, p, _), o_l in zip(work, outs):
            master = group["master_weights"]
            target = local_tensor(self.state[p]["master"]) if master else local_tensor(p)
            entry = by_step.setdefault((id(group), muon_lr_scale(p.shape)), (group, [], [], []))
            entry[1].append(target)
            entry[2].append(o_l)
            if master:
                entry[3].append(local_tensor(p))
        for (_, scale), (group, targets, updates, params) in by_step.items():
            lr, wd = group["lr"], group["weight_decay"]
            torch._foreach_mul_(targets, 1 - lr * wd)
            torch._foreach_add_(targets, updates, alpha=-lr * scale)  # the NS dtype is promoted exactly
            if params:  # master weights: the (bf16) parameters are their rounding, all in one op
                torch._foreach_copy_(params, targets)
        return loss


# --------------------------------------------------------------------------------------------
# AdamW with optional fp32 master weights
# --------------------------------------------------------------------------------------------


class AdamW(torch.optim.Optimizer):
    """AdamW (torch.optim.AdamW math, decoupled decay) with an optional precision-aware mode.

    ``master_weights=True``: fp32 master copy (``state['master']``) and fp32 moments; the update
    is applied to the master copy and copied back into the (bf16) parameter. Used by
    ``build_optimizers(..., precision_aware=True)``; otherwise build_optimizers uses
    ``torch.optim.AdamW``. Works on local shards, so DTensors on any mesh are fine.

    The update is torch's own (``torch.optim.adam.adam``), fused where torch has the kernel
    (``fused=None``: CPU and CUDA), on all of a param group's tensors at once; bf16 gradients are
    cast to fp32 for it `ADAMW_BUCKET_NUMEL` elements at a time, which bounds that extra memory.
    """

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.95),
        eps=1e-8,
        weight_decay=0.1,
        master_weights=True,
        fused: bool | None = None,
    ):
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, master_weights=master_weights, fused=fused
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["fused"] is None:
                group["fused"] = _fused_supported(group["params"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            fused, master = group.get("fused", False), group["master_weights"]
            for p in params:
                state = self.state[p]
                if "exp_avg" not in state:
                    _init_state(state, p, master, "exp_avg", "exp_avg_sq")
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                if fused and state["step"].device != local_tensor(p).device:  # the fused kernel's place for it
                    state["step"] = state["step"].to(local_tensor(p).device)
            for bucket in _buckets(params, ADAMW_BUCKET_NUMEL):
                states = [self.state[p] for p in bucket]
                targets = [local_tensor(s["master"] if master else p) for s, p in zip(states, bucket)]
                exp_avgs = [local_tensor(s["exp_avg"]) for s in states]
                grads = [local_tensor(_grad_like_param(p, p.grad)) for p in bucket]
                if any(g.dtype != m.dtype for g, m in zip(grads, exp_avgs)):  # bf16 grads, fp32 state
                    grads, bf16_grads = [torch.empty_like(m) for m in exp_avgs], grads
                    torch._foreach_copy_(grads, bf16_grads)
                b1, b2 = group["betas"]
                adam(
                    targets,
                    grads,
                    exp_avgs,
                    [local_tensor(s["exp_avg_sq"]) for s in states],
                    [],
                    [s["step"] for s in states],
                    foreach=not fused,
                    fused=fused,
                    decoupled_weight_decay=True,
                    amsgrad=False,
                    beta1=b1,
                    beta2=b2,
                    lr=group["lr"],
                    weight_decay=group["weight_decay"],
                    eps=group["eps"],
                    maximize=False,
                )
                if master:  # the (bf16) parameters are the masters' rounding, all in one op
                    torch._foreach_copy_([local_tensor(p) for p in bucket], targets)
        return loss


# Elements per bucket of our AdamW: the fp32 copies of a bucket's bf16 gradients live at the same time.
ADAMW_BUCKET_NUMEL = 2**28


def _buckets(params: list[Tensor], numel: int) -> list[list[Tensor]]:
    """``params`` in order, cut into runs of at most ``numel`` local elements (a larger one alone)."""
    out: list[list[Tensor]] = []
    size = 0
    for p in params:
        n = local_tensor(p).numel()
        if not out or (size + n > numel and out[-1]):
            out.append([])
            size = 0
        out[-1].append(p)
        size += n
    return out


def _fused_supported(params: Iterable[Tensor]) -> bool:
    """Whether torch's fused AdamW kernel takes these parameters: floating point, on CPU or CUDA."""
    return all(local_tensor(p).device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)


# --------------------------------------------------------------------------------------------
# Containers and builders
# --------------------------------------------------------------------------------------------


class Optimizers:
    """Several optimizers driven as one (Muon for matrices + AdamW for the rest).

    ``.optimizers`` is the plain list (pass it to DCP's get/set_optimizer_state_dict).
    ``param_groups`` is the concatenation of all groups (the dicts themselves: setting
    ``g['lr']`` on them changes the optimizers).
    """

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]):
        self.optimizers = list(optimizers)

    def __iter__(self):
        return iter(self.optimizers)

    def __len__(self):
        return len(self.optimizers)

    def __getitem__(self, i):
        return self.optimizers[i]

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for o in self.optimizers:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {str(i): o.state_dict() for i, o in enumerate(self.optimizers)}

    def load_state_dict(self, state_dict: dict):
        for i, o in enumerate(self.optimizers):
            o.load_state_dict(state_dict[str(i)])


def is_adamw_param_name(name: str) -> bool:
    """Matrices that Moonlight trains with AdamW, by name: the embedding (any name containing
    'embed', e.g. ``model.embed_tokens.weight``) and the output head ('lm_head')."""
    return "embed" in name or "lm_head" in name


def _mesh_key(p: Tensor):
    return id(p.device_mesh) if isinstance(p, DTensor) else None


def _split_by_mesh(params: list[Tensor]) -> list[list[Tensor]]:
    # torch's foreach AdamW groups tensors per param group; DTensor foreach ops reject mixed
    # meshes, so each param group holds parameters of one mesh only.
    groups: dict = {}
    for p in params:
        groups.setdefault(_mesh_key(p), []).append(p)
    return list(groups.values())


def build_optimizers(
    named_params: Iterable[tuple[str, Tensor]],
    name: str = "muon",
    lr: float = 4.2e-4,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    precision_aware: bool = False,
    ns_dtype: torch.dtype = torch.bfloat16,
    replica_mesh: DeviceMesh | None = None,
) -> Optimizers:
    """Moonlight's optimizer split; returns an ``Optimizers`` container ([Muon, AdamW] or [AdamW]).

    name="muon": Muon for 2-D matrices and 3-D stacked expert weights, except the embedding and
    lm_head (``is_adamw_param_name``); AdamW (same lr and wd, decay on norms too, as in the paper)
    for those and every 1-D parameter. name="adamw": AdamW for everything.
    Parameters with requires_grad False are skipped (the router bias is a buffer anyway).
    precision_aware=True: fp32 master weights + fp32 optimizer state for both optimizers
    (our ``AdamW``/``Muon`` with ``master_weights=True``); otherwise ``torch.optim.AdamW``.
    Empty optimizers are left out. ``replica_mesh``: Muon's ``replicas`` (see `Muon`).
    """
    if name not in ("muon", "adamw"):
        raise ValueError(f"unknown optimizer {name!r}")
    muon_params, adamw_params, seen = [], [], set()
    for pname, p in named_params:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if name == "muon" and p.ndim >= 2 and not is_adamw_param_name(pname):
            if p.ndim > 3:
                raise ValueError(f"{pname}: Muon takes 2-D or 3-D [E, A, B] params, got {tuple(p.shape)}")
            muon_params.append(p)
        else:
            adamw_params.append(p)
    opts: list[torch.optim.Optimizer] = []
    if muon_params:
        opts.append(
            Muon(
                [{"params": ps} for ps in _split_by_mesh(muon_params)],
                lr=lr,
                weight_decay=weight_decay,
                momentum=momentum,
                nesterov=nesterov,
                ns_steps=ns_steps,
                ns_dtype=ns_dtype,
                master_weights=precision_aware,
                replicas=replica_mesh,
            )
        )
    if adamw_params:
        groups = [{"params": ps} for ps in _split_by_mesh(adamw_params)]
        if precision_aware:
            opts.append(AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, master_weights=True))
        else:
            # fused: one kernel for the whole update (torch's default is foreach: about ten passes)
            opts.append(
                torch.optim.AdamW(
                    groups,
                    lr=lr,
                    betas=betas,
                    eps=eps,
                    weight_decay=weight_decay,
                    fused=_fused_supported(adamw_params) or None,
                )
            )
    return Optimizers(opts)


@dataclass
class OptimizerSection:
    name: Literal["adamw", "muon"] = "adamw"
    """"adamw", or "muon" (Muon for matrices, AdamW for embedding, lm_head and 1-D params)."""
    lr: float = 1e-3
    """Peak learning rate (after warmup)."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.95
    """AdamW second-moment decay."""
    eps: float = 1e-8
    """AdamW denominator epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay (AdamW and Muon)."""
    momentum: float = 0.95
    """Muon momentum."""
    nesterov: bool = True
    """Muon: Nesterov momentum."""
    ns_steps: int = 5
    """Newton-Schulz iterations (Muon)."""
    precision_aware: bool = False
    """fp32 master weights with bf16 gradients and moments."""

    def problems(self) -> list[str]:
        return failing(
            [
                (self.lr > 0, f"optimizer.lr must be > 0 (got {self.lr})"),
                (0 <= self.beta1 < 1, f"optimizer.beta1 must be in [0, 1) (got {self.beta1})"),
                (0 <= self.beta2 < 1, f"optimizer.beta2 must be in [0, 1) (got {self.beta2})"),
                (self.eps > 0, f"optimizer.eps must be > 0 (got {self.eps})"),
                (self.weight_decay >= 0, f"optimizer.weight_decay must be >= 0 (got {self.weight_decay})"),
                (0 <= self.momentum < 1, f"optimizer.momentum must be in [0, 1) (got {self.momentum})"),
                (self.ns_steps >= 1, f"optimizer.ns_steps must be >= 1 (got {self.ns_steps})"),
            ]
        )

    def build(
        self,
        named_params: Iterable[tuple[str, Tensor]],
        ns_dtype: torch.dtype = torch.bfloat16,
        replica_mesh: DeviceMesh | None = None,
    ) -> Optimizers:
        """`build_optimizers` with this section's settings (ns_dtype and replica_mesh: the run's, not the config's)."""
        return build_optimizers(
            named_params,
            name=self.name,
            lr=self.lr,
            weight_decay=self.weight_decay,
            betas=(self.beta1, self.beta2),
            eps=self.eps,
            momentum=self.momentum,
            nesterov=self.nesterov,
            ns_steps=self.ns_steps,
            precision_aware=self.precision_aware,
            ns_dtype=ns_dtype,
            replica_mesh=replica_mesh,
        )


# --------------------------------------------------------------------------------------------
# Gradient clipping across meshes
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def clip_grad_norm_(
    params: Iterable[Tensor] | Tensor,
    max_norm: float,
    norm_type: float = 2.0,
    foreach: bool | None = None,
    pp_group: dist.ProcessGroup | None = None,
) -> Tensor:
    """Clip gradients by their global norm; returns the total norm (a plain fp32 tensor).

    Works with plain tensors and with DTensor grads on several DIFFERENT meshes (torch's
    clip_grad_norm_ fails then): the grads are grouped by mesh, each group's norm is computed
    with DTensor ops and made full (``full_tensor()``), and the groups are combined. Plain-tensor
    grads are counted once (assumed identical on the ranks that hold them, as after a dp
    all-reduce). ``pp_group``: all-reduce the combined norm**p (max for inf) over pipeline
    stages that hold different parameters. A non-finite total norm is returned as is and the
    grads are then left untouched (the trainer decides to skip the step).
    """
    params = [params] if isinstance(params, Tensor) else list(params)
    grads = [p.grad for p in params if p.grad is not None]
    norm_type = float(norm_type)
    by_mesh: dict = {}
    for g in grads:
        by_mesh.setdefault(_mesh_key(g), []).append(g)
    # On the parameters' device even with no gradient here (a pipeline stage whose parameters are all
    # frozen): NCCL reduces device tensors only, and the trainer stacks the norm with the loss.
    device = local_tensor(grads[0] if grads else params[0]).device if params else torch.device("cpu")
    norms = []
    for gs in by_mesh.values():
        n = torch.nn.utils.get_total_norm(gs, norm_type, foreach=foreach)
        if isinstance(n, DTensor):
            n = n.full_tensor()
        norms.append(n.to(device=device, dtype=torch.float32))
    inf = math.isinf(norm_type)
    if not norms:
        total = torch.zeros((), dtype=torch.float32, device=device)
    elif inf:
        total = torch.stack(norms).max()
    else:
        total = torch.stack(norms).pow(norm_type).sum()
    if pp_group is not None:
        dist.all_reduce(total, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM, group=pp_group)
    if not inf:
        total = total.pow(1.0 / norm_type)
    # No host sync: a non-finite norm scales by 1, leaving the grads as they are.
    coef = torch.where(torch.isfinite(total), torch.clamp(max_norm / (total + 1e-6), max=1.0), 1.0)
    locals_ = [local_tensor(g) for g in grads]
    if locals_:
        buckets: dict = {}
        for t in locals_:
            buckets.setdefault((t.device, t.dtype), []).append(t)
        for (dev, dt), ts in buckets.items():
            torch._foreach_mul_(ts, coef.to(device=dev, dtype=dt))
    return total
