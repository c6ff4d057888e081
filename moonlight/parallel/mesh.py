"""Parallel degrees (ParallelDims) and the device meshes it needs (build_mesh).

The world is one 5-D mesh ``("pp", "dp_replicate", "dp_shard", "cp", "tp")``, outermost first, so
``tp`` peers are consecutive ranks. Derived meshes are kept by name in `ParallelMesh`: ``dp``
(ranks reading different data), ``cp``, ``dp_cp`` (ranks holding different tokens), ``routing``
(MoE load counters), ``fsdp``, ``replicas``, ``ep`` and ``expert_fsdp``.

Expert parallel borrows data- and context-parallel ranks, or spans TP ranks when ``ep`` does not
divide ``dp_shard * cp`` (then each TP rank routes its own sequence shard).
Design and the rank arithmetic: docs/parallelism.md.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moonlight import distributed
from moonlight.config import ModelArgs
from moonlight.errors import ParallelConfigError
from moonlight.parallel.pipeline_layout import layout_problems


@dataclass
class ParallelDims:
    """Degrees of each parallelism. ``dp_shard=-1`` takes whatever the others leave of the world.

    ``world_size`` defaults to ``torch.distributed.get_world_size()`` when a process group exists.
    """

    dp_replicate: int = 1
    dp_shard: int = -1
    cp: int = 1
    tp: int = 1
    ep: int = 1
    pp: int = 1
    world_size: int | None = None

    def __post_init__(self):
        if self.world_size is None:
            self.world_size = distributed.world_size()
        for name in ("dp_replicate", "cp", "tp", "ep", "pp", "world_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ParallelConfigError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(self.dp_shard, int) or (self.dp_shard < 1 and self.dp_shard != -1):
            raise ParallelConfigError(
                f"dp_shard must be a positive integer or -1 (use the remaining ranks), got {self.dp_shard!r}"
            )
        if self.dp_shard == -1:
            others = self.dp_replicate * self.cp * self.tp * self.pp
            if self.world_size % others:
                raise ParallelConfigError(
                    f"cannot resolve dp_shard=-1: dp_replicate({self.dp_replicate}) x cp({self.cp}) x tp({self.tp}) x "
                    f"pp({self.pp}) = {others} does not divide world_size={self.world_size}; change those degrees or "
                    "the number of ranks"
                )
            self.dp_shard = self.world_size // others
        product = self.dp_replicate * self.dp_shard * self.cp * self.tp * self.pp
        if product != self.world_size:
            raise ParallelConfigError(
                f"dp_replicate({self.dp_replicate}) x dp_shard({self.dp_shard}) x cp({self.cp}) x tp({self.tp}) x "
                f"pp({self.pp}) = {product} but world_size = {self.world_size}: the degrees must multiply to the "
                "number of ranks (set dp_shard=-1 to fill the rest)"
            )

    # ------------------------------------------------------------------ sizes
    @property
    def dp(self) -> int:
        """Number of data-parallel replicas of the batch (ranks that read different data)."""
        return self.dp_replicate * self.dp_shard

    @property
    def dp_cp(self) -> int:
        """Ranks that hold different tokens (dp x cp): gradients are averaged over them."""
        return self.dp * self.cp

    @property
    def ep_spans_tp(self) -> bool:
        """Whether the expert-parallel groups take tensor-parallel ranks: ``ep`` does not divide
        ``dp_shard * cp`` but divides ``dp_shard * cp * tp``. Every tp rank then routes only its own
        sequence shard (see the module docstring)."""
        tokens = self.dp_shard * self.cp
        return tokens % self.ep != 0 and (tokens * self.tp) % self.ep == 0

    @property
    def expert_shard(self) -> int:
        """How many ranks of one dp_replicate group share an EP rank's experts (FSDP shards them over these)."""
        return self.dp_shard * self.cp * (self.tp if self.ep_spans_tp else 1) // self.ep

    def validate(
        self,
        model_args: ModelArgs,
        pp_layout: Sequence[int] | None = None,
        vp: int = 1,
        *,
        sequence_parallel: bool = False,
        seq_len: int | None = None,
    ) -> "ParallelDims":
        """Check these degrees against a model before any mesh or module is built.

        ``pp_layout``: decoder layers per (virtual) stage, ``pp * vp`` entries, in order; ``None``
        means an even split is intended (then only ``num_hidden_layers >= pp * vp`` is checked).
        ``sequence_parallel`` needs ``tp > 1`` (rejected otherwise, so a config never believes it runs
        SP when it does not) and, when ``seq_len`` is given, ``seq_len % tp == 0``. Context parallel
        needs ``seq_len % (2 * cp) == 0`` (the zig-zag chunks) and, with SP, each cp slice divisible by tp.
        EP spanning TP (`ep_spans_tp`) needs ``sequence_parallel``.
        Returns self; raises ParallelConfigError naming what to change.
        """
        a = model_args
        errors = []
        if self.tp > 1:
            if a.num_attention_heads % self.tp:
                errors.append(
                    f"num_attention_heads={a.num_attention_heads} is not divisible by tp={self.tp}: "
                    "tensor parallel splits whole attention heads; pick tp dividing the head count"
                )
            if a.vocab_size % self.tp:
                errors.append(
                    f"vocab_size={a.vocab_size} is not divisible by tp={self.tp}: the embedding and "
                    "lm_head are split by vocabulary rows; pick tp dividing the vocabulary (or pad it)"
                )
            for name in ("intermediate_size",):
                if a.first_k_dense_replace and getattr(a, name) % self.tp:
                    errors.append(f"{name}={getattr(a, name)} is not divisible by tp={self.tp}")
            shared = a.n_shared_experts * a.moe_intermediate_size
            if shared and a.first_k_dense_replace < a.num_hidden_layers and shared % self.tp:
                errors.append(
                    f"the shared-expert width {shared} (n_shared_experts x moe_intermediate_size) is "
                    f"not divisible by tp={self.tp}"
                )
        if self.ep > 1:
            if a.n_routed_experts % self.ep:
                errors.append(
                    f"n_routed_experts={a.n_routed_experts} is not divisible by ep={self.ep}: every "
                    "expert-parallel rank holds the same number of experts; pick ep dividing it"
                )
            tokens = self.dp_shard * self.cp
            borrowed = f"dp_shard={self.dp_shard}" + (f" x cp={self.cp}" if self.cp > 1 else "")
            if self.tp == 1 and tokens % self.ep:
                errors.append(
                    f"ep={self.ep} does not divide {borrowed}: expert parallel borrows its ranks "
                    "from the data-parallel shard and context-parallel dimensions (not from pp or "
                    "dp_replicate); use an ep that divides dp_shard * cp, or raise dp_shard"
                )
            elif (tokens * self.tp) % self.ep:
                spanned = "dp_shard" + (" x cp" if self.cp > 1 else "") + " x tp"
                errors.append(
                    f"ep={self.ep} divides neither {borrowed} nor {spanned}={tokens * self.tp}: "
                    "expert parallel "
                    "borrows its ranks from dp_shard x cp, or (with sequence parallel) from dp_shard x "
                    "cp x tp; use an ep that divides one of them"
                )
            elif self.ep_spans_tp and not sequence_parallel:
                errors.append(
                    f"ep={self.ep} does not divide {borrowed}, so the expert groups take tensor-parallel "
                    "ranks, which needs sequence_parallel=True (each tp rank then routes only its own "
                    "sequence shard); set sequence_parallel=true, or use an ep that divides dp_shard * cp"
                )
            if a.first_k_dense_replace >= a.num_hidden_layers:
                errors.append(
                    f"ep={self.ep} but the model has no MoE layer (first_k_dense_replace="
                    f"{a.first_k_dense_replace} >= num_hidden_layers={a.num_hidden_layers}); use ep=1"
                )
        if not isinstance(vp, int) or vp < 1:
            errors.append(f"vp (virtual stages per pipeline rank) must be a positive integer, got {vp!r}")
        elif self.pp == 1 and vp > 1:
            errors.append(f"vp={vp} needs pipeline parallel (pp > 1); set vp=1")
        else:
            errors += layout_problems(pp_layout, a.num_hidden_layers, self.pp, vp)
        if sequence_parallel:
            if self.tp == 1:
                errors.append(
                    "sequence_parallel=True needs tensor parallel (tp > 1): it splits the sequence "
                    "over the tp ranks; set tp > 1 or sequence_parallel=False"
                )
            elif seq_len is not None and (seq_len // self.cp) % self.tp:
                errors.append(
                    f"seq_len={seq_len} is not divisible by cp x tp = {self.cp} x {self.tp}: sequence "
                    "parallel splits every (context-parallel slice of a) sequence evenly over the tp "
                    f"ranks; use a seq_len that is a multiple of "
                    f"{math.lcm(self.cp * self.tp, 2 * self.cp if self.cp > 1 else 1)}"
                )
        if self.cp > 1:
            if seq_len is not None and seq_len % (2 * self.cp):
                errors.append(
                    f"seq_len={seq_len} is not divisible by 2 x cp = {2 * self.cp}: context parallel cuts "
                    f"every sequence into 2 * cp equal chunks; use a seq_len that is a multiple of "
                    f"{2 * self.cp}"
                )
        if errors:
            raise ParallelConfigError(f"invalid parallel configuration {self.describe()}: " + "; ".join(errors))
        return self

    def describe(self) -> str:
        return (
            f"(world_size={self.world_size}: pp={self.pp} x dp_replicate={self.dp_replicate} x "
            f"dp_shard={self.dp_shard} x cp={self.cp} x tp={self.tp}; ep={self.ep}"
            f"{' over dp_shard x cp x tp' if self.ep_spans_tp else ''})"
        )


# The expert mesh's FSDP dim: EP over dp_shard x cp / EP spanning dp_shard x cp x tp.
EXPERT_SHARD_DIMS = ("dp_shard_mod_ep", "dp_shard_tp_mod_ep")


class ParallelMesh:
    """The world mesh plus the derived meshes, looked up by name: ``mesh["tp"]``, ``mesh["cp"]``,
    ``mesh["dp"]``, ``mesh["dp_cp"]``, ``mesh["routing"]``, ``mesh["sequence_parts"]``, ``mesh["ep"]``,
    ``mesh["fsdp"]``, ``mesh["expert_fsdp"]``, ``mesh["pp"]``, ``mesh["dp_replicate"]``,
    ``mesh["dp_shard"]``, ``mesh["dp_shard_cp"]``, ``mesh["replicas"]``, and ``mesh["dp_shard_mod_ep"]``
    (EP over dp_shard x cp) or ``mesh["dp_shard_tp_mod_ep"]`` (EP spanning TP). A tuple of world dim
    names slices the world mesh.
    """

    def __init__(self, dims: ParallelDims, world: DeviceMesh, named: dict[str, DeviceMesh]):
        self.dims = dims
        self.world = world
        self._named = named

    def __getitem__(self, name: str | tuple[str, ...]) -> DeviceMesh:
        if isinstance(name, tuple):
            return self.world[name]
        if name in self._named:
            return self._named[name]
        raise KeyError(
            f"no mesh named {name!r} in {self.dims.describe()}; available: "
            f"{sorted(self._named)}" + (" ('ep' exists only when ep > 1)" if name in ("ep", *EXPERT_SHARD_DIMS) else "")
        )

    def __contains__(self, name: str) -> bool:
        return name in self._named

    @property
    def device_type(self) -> str:
        return self.world.device_type

    # Data loading: which slice of the global batch this rank reads.
    @property
    def dp_rank(self) -> int:
        return self._named["dp"].get_local_rank()

    @property
    def dp_size(self) -> int:
        return self._named["dp"].size()

    @property
    def pp_rank(self) -> int:
        return self._named["pp"].get_local_rank()

    @property
    def tp_rank(self) -> int:
        return self._named["tp"].get_local_rank()

    @property
    def cp_rank(self) -> int:
        return self._named["cp"].get_local_rank()

    def __repr__(self) -> str:
        return f"ParallelMesh({self.dims.describe()}, {sorted(self._named)})"


def build_mesh(dims: ParallelDims, device_type: str | None = None) -> ParallelMesh:
    """Build the world mesh ``("pp", "dp_replicate", "dp_shard", "cp", "tp")`` and the derived meshes.

    The process group must already be initialized (the caller picks the backend: nccl on GPUs,
    gloo on CPUs). Size-1 dimensions are kept, so every name always exists (except ``ep`` and the
    expert mesh's FSDP dim, which exist only when ``dims.ep > 1``, and ``sequence_parts``).
    """
    device_type = device_type or distributed.default_device().type
    # (dp_shard, cp) is one root dim unflattened two ways: into the world's (dp_shard, cp) and, for
    # expert parallel over it, into (dp_shard_mod_ep, ep); FSDP shards over it whole.
    root = init_device_mesh(
        device_type,
        (dims.pp, dims.dp_replicate, dims.dp_shard * dims.cp, dims.tp),
        mesh_dim_names=("pp", "dp_replicate", "dp_shard_cp", "tp"),
    )
    world = root._unflatten(2, (dims.dp_shard, dims.cp), ("dp_shard", "cp"))
    named = {name: world[name] for name in ("pp", "dp_replicate", "dp_shard", "cp", "tp")}
    named["dp"] = world["dp_replicate", "dp_shard"]._flatten("dp")
    named["dp_shard_cp"] = root["dp_shard_cp"]
    named["dp_cp"] = root["dp_replicate", "dp_shard_cp"]._flatten("dp_cp")
    named["routing"] = named["dp_cp"]
    named["fsdp"] = root["dp_replicate", "dp_shard_cp"] if dims.dp_replicate > 1 else root["dp_shard_cp"]
    named["expert_fsdp"] = named["fsdp"]
    named["replicas"] = root["dp_replicate", "dp_shard_cp", "tp"]
    if dims.ep_spans_tp:
        try:
            named["sequence_parts"] = world["cp", "tp"]._flatten("sequence_parts")
        except KeyError:  # torch 2.11 refuses this slice of an unflattened mesh: a mesh over the same ranks
            grid = root.mesh.reshape(dims.pp, dims.dp_replicate, dims.dp_shard, dims.cp * dims.tp)
            named["sequence_parts"] = DeviceMesh(
                device_type, grid, mesh_dim_names=("pp", "dp_replicate", "dp_shard", "sequence_parts")
            )["sequence_parts"]
    if dims.ep > 1:
        if dims.ep_spans_tp:
            # (dp_shard_cp, tp) flattened, then split into (dp_shard * cp * tp // ep, ep): a mesh of its own
            # over the same ranks (torch's _unflatten splits one dim only), so ep and expert_fsdp share its root
            shard = EXPERT_SHARD_DIMS[1]
            named["routing"] = root["dp_replicate", "dp_shard_cp", "tp"]._flatten("routing")
            sparse = DeviceMesh(
                device_type,
                root.mesh.reshape(dims.pp, dims.dp_replicate, dims.expert_shard, dims.ep),
                mesh_dim_names=("pp", "dp_replicate", shard, "ep"),
            )
        else:
            shard = EXPERT_SHARD_DIMS[0]
            sparse = root._unflatten(2, (dims.expert_shard, dims.ep), (shard, "ep"))
        named["ep"] = sparse["ep"]
        named[shard] = sparse[shard]
        named["expert_fsdp"] = sparse["dp_replicate", shard] if dims.dp_replicate > 1 else sparse[shard]
    return ParallelMesh(dataclasses.replace(dims), world, named)
