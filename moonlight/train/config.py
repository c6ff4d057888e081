"""The TOML job configuration (`JobConfig`): its sections and the checks across them. A section that
configures one component lives beside it and builds it (`cfg.optimizer.build(params)`); the others
live here; all are importable from here (docs/design.md).

    cfg = load_config("train.toml", ["--training.steps=20", "--parallelism.tp", "2"])
    cfg.validate()                      # every section's checks + cross-section ones (no world size)
    print(cfg.to_toml())                # the resolved config (saved as <dump_folder>/config.toml)

Reading the file and the `--section.key=value` overrides (type checks, errors naming the key with a
did-you-mean) and writing TOML is `moonlight.train.config_io`'s. Defaults are those of the shipped
CPU debug job, not of the 16B recipe. Rules owned elsewhere are delegated: pipeline layouts and
schedules to `moonlight.parallel.pipeline`, degrees vs the world size to `ParallelDims`.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import pathlib
from dataclasses import dataclass, field
from typing import Any, Literal

from moonlight.checkpoint.config import CheckpointSection
from moonlight.config import ModelArgs
from moonlight.data.loader import FORMATS, DataSection
from moonlight.errors import ConfigError, failing
from moonlight.model.lora import LoRASection
from moonlight.outputs import inside
from moonlight.parallel.pipeline_layout import SCHEDULES, layout_problems, schedule_problems
from moonlight.train.config_io import (
    BadValue,
    apply_overrides,
    apply_table,
    coerce,
    field_types,
    read_toml,
    to_toml,
    type_name,
)
from moonlight.train.metrics import MetricsSection
from moonlight.train.optim import OptimizerSection
from moonlight.train.schedule import LRSchedulerSection

__all__ = [
    "ConfigError",
    "JobSection",
    "ModelSection",
    "TrainingSection",
    "OptimizerSection",
    "LRSchedulerSection",
    "ParallelismSection",
    "ActivationCheckpointSection",
    "DataSection",
    "ValidationSection",
    "CheckpointSection",
    "MetricsSection",
    "MoESection",
    "LoRASection",
    "JobConfig",
    "load_config",
    "parse_args",
]


DTypeName = Literal["float32", "bfloat16"]
PPSchedule = Literal[SCHEDULES]


# Names the run writes directly in job.dump_folder (and abandoned-<time>, a rollback's), which checkpoint.folder
# and metrics.tb_folder must not take.
RUN_OUTPUTS = ("config.toml", "metrics.jsonl", ".lock", "hf", "adapter", "profile")


@dataclass
class JobSection:
    dump_folder: str = "./outputs"
    """Run output folder: config.toml, checkpoints, tensorboard, profiles."""
    description: str = "Moonlight debug model on CPU"
    """One line naming the run, printed first."""

    def problems(self) -> list[str]:
        return failing([(bool(self.dump_folder), "job.dump_folder must not be empty")])


@dataclass
class ModelSection:
    name: Literal["debug", "moonlight-16b-a3b"] = "debug"
    """Preset name."""
    hf_config: str = ""
    """Optional path to an HF config.json; "" = use the preset."""
    kernels: Literal["auto", "torch", "triton"] = "auto"
    """"auto": Triton on CUDA, PyTorch elsewhere; "torch" or "triton" force one."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """ModelArgs field overrides, e.g. [model.overrides] num_hidden_layers = 4 (CLI:
    --model.overrides.num_hidden_layers=4). Keys are checked against ModelArgs when the model is built."""

    def problems(self) -> list[str]:
        errs = []
        fields = field_types(ModelArgs)
        for key, value in self.overrides.items():
            try:
                if key in fields:  # an unknown key is named, with a did-you-mean, when the model is built
                    coerce(value, fields[key])
            except BadValue:
                errs.append(
                    f"model.overrides.{key} expects {type_name(fields[key])}, got {type(value).__name__} {value!r}"
                )
        return errs


@dataclass
class TrainingSection:
    steps: int = 200
    """Optimizer steps to train (a resumed run continues up to this step)."""
    seed: int = 42
    """Seed of the initial weights, data order and dropout."""
    global_batch_size: int = 8
    """Sequences per optimizer step across all data-parallel ranks."""
    local_batch_size: int = 4
    """Micro-batch per rank; grad accumulation = global / (local * dp)."""
    seq_len: int = 256
    """Tokens per sequence (documents are packed into windows of this length)."""
    max_norm: float = 1.0
    """Gradient clipping norm; 0 disables clipping."""
    dtype: DTypeName = "float32"
    """Parameter (storage) dtype."""
    mixed_precision_param: DTypeName = "float32"
    """Compute dtype of FSDP-gathered parameters."""
    mixed_precision_reduce: DTypeName = "float32"
    """Dtype of the gradient reduce-scatter / all-reduce."""
    gc_freq: int = 50
    """Run gc.collect() every N steps (automatic GC is disabled); 0 = leave GC alone."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms(True): bitwise-repeatable runs, slower."""
    on_nonfinite: Literal["skip", "stop"] = "skip"
    """A NaN/Inf loss or grad norm: skip the optimizer step, or stop the run."""
    max_consecutive_nonfinite: int = 5
    """With on_nonfinite="skip": stop after this many skipped steps in a row."""
    compile: bool = False
    """torch.compile each decoder block's forward (regional compilation, as torchtitan)."""
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"
    """The torch.compile backend; aot_eager traces the same graphs without generating code."""
    collective_timeout_s: float = 600.0
    """How long a collective waits for the other ranks before the run stops, naming those that did not
    answer (a rank stopped or stuck); raise it when one step (or a checkpoint save) legitimately takes longer."""

    def problems(self) -> list[str]:
        out = failing(
            [
                (self.steps > 0, f"training.steps must be > 0 (got {self.steps})"),
                (
                    0 <= self.seed < 2**64,
                    f"training.seed must be in [0, 2**64) (got {self.seed})",
                ),  # torch's and numpy's
                (self.seq_len > 0, f"training.seq_len must be > 0 (got {self.seq_len})"),
                (self.global_batch_size > 0, f"training.global_batch_size must be > 0 (got {self.global_batch_size})"),
                (self.local_batch_size > 0, f"training.local_batch_size must be > 0 (got {self.local_batch_size})"),
                (self.max_norm >= 0, f"training.max_norm must be >= 0 (0 = no clipping; got {self.max_norm})"),
                (self.gc_freq >= 0, f"training.gc_freq must be >= 0 (got {self.gc_freq})"),
                (
                    self.collective_timeout_s > 0,
                    f"training.collective_timeout_s must be > 0 (got {self.collective_timeout_s})",
                ),
                (
                    self.max_consecutive_nonfinite >= 1,
                    f"training.max_consecutive_nonfinite must be >= 1 (got {self.max_consecutive_nonfinite})",
                ),
            ]
        )
        if self.global_batch_size > 0 and self.local_batch_size > 0 and self.global_batch_size % self.local_batch_size:
            out.append(
                f"training.global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"training.local_batch_size ({self.local_batch_size})"
            )
        return out


@dataclass
class ParallelismSection:
    dp_replicate: int = 1
    """HSDP replicas (data parallel without sharding, across groups of dp_shard ranks)."""
    dp_shard: int = -1
    """FSDP degree; -1 = whatever is left of the world size."""
    cp: int = 1
    """Context parallel: every sequence split over cp ranks (zig-zag chunks; seq_len % (2 * cp) == 0)."""
    tp: int = 1
    """Tensor parallel degree (attention heads, MLPs and the vocabulary split over tp ranks)."""
    sequence_parallel: bool = True
    """With tp > 1: norms and residuals on sequence-sharded activations."""
    ep: int = 1
    """Expert parallel degree (routed experts split over ep ranks; tokens move by all-to-all)."""
    pp: int = 1
    """Pipeline parallel stages."""
    pp_schedule: PPSchedule = "1F1B"
    """Pipeline schedule (1F1B, GPipe, Interleaved1F1B, ZBVZeroBubble, DualPipeV, ...)."""
    pp_layout: list[int] = field(default_factory=list)
    """Decoder layers per pipeline stage, in stage order (pp * pp_virtual_stages entries);
    empty = chosen by the cost model."""
    pp_virtual_stages: int = 1
    """Stages per pipeline rank (2+ for interleaved schedules, 2 for V schedules)."""
    pp_microbatches: int = 0
    """Pipeline micro-batches per local batch; 0 = training.local_batch_size (one sequence each)."""
    fsdp_reshard_after_forward: Literal["default", "always", "never"] = "default"
    """Free each FSDP unit's gathered weights after its forward. "default" (torchtitan's rule): yes
    without pipeline parallel, no with it (a stage's backward follows its forward soon)."""

    def problems(self) -> list[str]:
        """Each degree on its own; how they fit the world and the model is `ParallelDims.validate`'s."""
        out = [
            f"parallelism.{k} must be >= 1 (got {getattr(self, k)})"
            for k in ("dp_replicate", "cp", "tp", "ep", "pp", "pp_virtual_stages")
            if getattr(self, k) < 1
        ]
        out += failing(
            [
                (
                    self.dp_shard == -1 or self.dp_shard >= 1,
                    f"parallelism.dp_shard must be -1 (the rest) or >= 1 (got {self.dp_shard})",
                ),
                (
                    self.pp_microbatches >= 0,
                    f"parallelism.pp_microbatches must be >= 0 (0 = auto; got {self.pp_microbatches})",
                ),
            ]
        )
        if self.pp >= 1 and self.pp_virtual_stages >= 1:
            out += schedule_problems(self.pp_schedule, self.pp_virtual_stages)
            out += layout_problems(self.pp_layout or None, None, self.pp, self.pp_virtual_stages)
        return out


@dataclass
class ActivationCheckpointSection:
    mode: Literal["none", "selective", "full", "op"] = "none"
    """Recompute in backward: none, selective (attention), full (block), op (torchtitan's op-level)."""

    def problems(self) -> list[str]:
        return []


@dataclass
class ValidationSection:
    enable: bool = False
    """Evaluate the loss on held-out data during training."""
    path: str = ""
    """Held-out data, read like data.path (same tokenizer, keys and seq_len; never shuffled)."""
    format: Literal[("", *FORMATS)] = ""
    """"" = data.format."""
    interval: int = 100
    """Validate every `interval` steps and after the last one."""
    steps: int = 4
    """Batches per validation, each of training.global_batch_size sequences; the same ones every time."""

    def problems(self) -> list[str]:
        if not self.enable:
            return []
        return failing(
            [
                (bool(self.path), "validation.path must name the held-out data (or set validation.enable = false)"),
                (self.interval >= 1, f"validation.interval must be >= 1 (got {self.interval})"),
                (self.steps >= 1, f"validation.steps must be >= 1 (got {self.steps})"),
            ]
        )


@dataclass
class MoESection:
    bias_update_rate: float | None = None
    """Aux-loss-free balancing: b += rate * sign(mean_load - load); 0 freezes the bias. Unset: 1e-3,
    or 0 (frozen) in a LoRA/DoRA run."""
    aux_loss_coeff: float = 0.001
    """Sequence-level balance loss coefficient; 0 disables it."""

    def problems(self) -> list[str]:
        return failing(
            [
                (
                    self.bias_update_rate is None or self.bias_update_rate >= 0,
                    f"moe.bias_update_rate must be >= 0 (got {self.bias_update_rate})",
                ),
                (self.aux_loss_coeff >= 0, f"moe.aux_loss_coeff must be >= 0 (got {self.aux_loss_coeff})"),
            ]
        )

    def bias_rate(self, lora: bool) -> float:
        """The bias update rate in effect: as set, else 1e-3 (0 with LoRA: the base model stays frozen)."""
        if self.bias_update_rate is not None:
            return self.bias_update_rate
        return 0.0 if lora else 1e-3


@dataclass
class JobConfig:
    job: JobSection = field(default_factory=JobSection)
    model: ModelSection = field(default_factory=ModelSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    lr_scheduler: LRSchedulerSection = field(default_factory=LRSchedulerSection)
    parallelism: ParallelismSection = field(default_factory=ParallelismSection)
    activation_checkpoint: ActivationCheckpointSection = field(default_factory=ActivationCheckpointSection)
    data: DataSection = field(default_factory=DataSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    moe: MoESection = field(default_factory=MoESection)
    lora: LoRASection = field(default_factory=LoRASection)

    # ------------------------------------------------------------------ output
    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return to_toml(self.to_dict())

    # -------------------------------------------------------------- validation
    def validate(self) -> "JobConfig":
        """Every section's checks plus the cross-section ones that do not need the world size; raises
        ConfigError listing every problem found. Returns self."""
        errs: list[str] = []
        self.job.dump_folder = os.path.expanduser(self.job.dump_folder)  # "~/run", not ./~/run
        for name in SECTIONS:
            section = getattr(self, name)
            errs += section.problems(self.training.steps) if name == "lr_scheduler" else section.problems()
        if self.lora.enable:
            errs += [
                f"lora.enable = true supports data parallel (FSDP/HSDP) only: set parallelism.{k} = 1 "
                f"(got {getattr(self.parallelism, k)}; the LoRA/DoRA recipe is TP1/PP1/EP1/CP1)"
                for k in ("tp", "ep", "pp", "cp")
                if getattr(self.parallelism, k) != 1
            ]
        if self.training.compile and self.activation_checkpoint.mode == "op":
            errs.append(
                "training.compile = true does not work with activation_checkpoint.mode = 'op' (torch.compile "
                "cannot run inside op-level selective checkpointing's dispatch mode): use mode 'selective' "
                "or 'full' with compile, or 'op' without it"
            )
        if self.checkpoint.frozen_weights == "reload" and not (self.lora.enable and self.checkpoint.initial_load_hf):
            errs.append(
                "checkpoint.frozen_weights = 'reload' re-reads the frozen base weights from "
                "checkpoint.initial_load_hf: it needs lora.enable = true and checkpoint.initial_load_hf set "
                "(or use 'save')"
            )
        tops = {}
        for key, sub in (("checkpoint.folder", self.checkpoint.folder), ("metrics.tb_folder", self.metrics.tb_folder)):
            parts = pathlib.PurePath(sub).parts if sub and inside(sub) else ("",)
            top = parts[0] if parts else "."
            if top in RUN_OUTPUTS or top == "." or top.startswith("abandoned-") or top in tops:
                errs.append(
                    f"{key} = {sub!r} collides with "
                    + (f"{tops[top]}" if top in tops else f"the run's own {top!r} in job.dump_folder")
                    + ": pick another folder name"
                )
            elif top:
                tops[top] = key
        dump = os.path.realpath(self.job.dump_folder)
        held_out = self.validation.enable and self.validation.path
        for key, path in (("data.path", self.data.path), ("validation.path", held_out)):
            source = os.path.realpath(os.path.expanduser(path)) if path else ""
            if os.path.isdir(source) and os.path.commonpath([dump, source]) == source:
                errs.append(
                    f"job.dump_folder = {self.job.dump_folder!r} lies inside {key} = {path!r}: the next run "
                    "would read this run's metrics.jsonl and checkpoints as data; use a dump folder outside it"
                )
            elif path and not os.path.isdir(source):  # a file or a glob: none of it may be the run's own output
                ours = [f for f in glob.glob(os.path.expanduser(path), recursive=True) if self._is_run_output(f)]
                if ours:
                    errs.append(
                        f"{key} = {path!r} matches {ours[0]}, inside job.dump_folder = "
                        f"{self.job.dump_folder!r}: the run would read its own outputs as data; narrow "
                        f"{key} or use a dump folder outside it"
                    )
        if errs:
            raise ConfigError(
                f"invalid config: {errs[0]}"
                if len(errs) == 1
                else f"invalid config, {len(errs)} problems: " + "; ".join(f"({i}) {e}" for i, e in enumerate(errs, 1))
            )
        return self

    def _is_run_output(self, path: str) -> bool:
        """Whether a path is (inside) something this run writes in job.dump_folder."""
        dump, real = os.path.realpath(self.job.dump_folder), os.path.realpath(path)
        if os.path.commonpath([dump, real]) != dump or real == dump:
            return False
        top = pathlib.PurePath(os.path.relpath(real, dump)).parts[0]
        own = {
            *RUN_OUTPUTS,
            *(
                top
                for folder in (self.checkpoint.folder, self.metrics.tb_folder)
                for top in pathlib.PurePath(folder).parts[:1]
            ),
        }
        return top in own or top.startswith(("abandoned-", "metrics.jsonl."))

    def skips_frozen_weights(self) -> bool:
        """Whether checkpoints leave the frozen weights out (checkpoint.frozen_weights)."""
        mode = self.checkpoint.frozen_weights
        return mode == "reload" or (mode == "auto" and self.lora.enable and bool(self.checkpoint.initial_load_hf))

    def grad_accum_steps(self, dp_degree: int) -> int:
        """Micro-batches per optimizer step on each rank for a data-parallel degree
        (dp_replicate * dp_shard); raises ConfigError if the global batch does not split."""
        t = self.training
        per_micro = t.local_batch_size * dp_degree
        if t.global_batch_size % per_micro:
            raise ConfigError(
                f"training.global_batch_size ({t.global_batch_size}) must be a multiple of "
                f"training.local_batch_size * data-parallel degree = {t.local_batch_size} * {dp_degree} = {per_micro}"
            )
        return t.global_batch_size // per_micro


SECTIONS: dict[str, type] = field_types(JobConfig)  # [section] name -> its dataclass, in JobConfig's order


# Keys naming files or directories. A relative one is read from the working directory (as every
# command-line tool and torchrun's workers do), not from the config file's folder.
PATH_KEYS = (
    ("data", "path"),
    ("validation", "path"),
    ("data", "tokenizer"),
    ("model", "hf_config"),
    ("checkpoint", "initial_load_hf"),
    ("lora", "init_adapter"),
)


def _check_relative_paths(cfg: JobConfig, table: dict[str, Any], config_file: str) -> None:
    """A relative path the config file sets that is missing here but exists next to the config file:
    say so (the user likely ran from another folder) instead of a missing-file error later."""
    here = os.path.dirname(os.path.abspath(config_file))
    for sec, key in PATH_KEYS:
        value = table.get(sec, {}).get(key)
        if value != getattr(getattr(cfg, sec), key):  # overridden on the command line
            continue
        if (
            isinstance(value, str)
            and value
            and value != "byte"
            and not os.path.isabs(os.path.expanduser(value))
            and not any(c in value for c in "*?[")
            and not os.path.exists(value)
            and os.path.exists(os.path.join(here, value))
            and here != os.getcwd()
        ):
            raise ConfigError(
                f"{sec}.{key} = {value!r} (in {config_file}) does not exist here: relative paths are "
                f"read from the working directory {os.getcwd()}, not from the config file's folder, "
                f"where it does exist; run from {here}, or set {sec}.{key} to "
                f"{os.path.join(here, value)!r}"
            )


def load_config(path: str | None, overrides: list[str] | None = None) -> JobConfig:
    """Defaults <- TOML file (if path) <- CLI overrides. Does not call validate(). Relative paths are
    the working directory's (PATH_KEYS)."""
    cfg = JobConfig()
    if path:
        table = read_toml(path)
        apply_table(cfg, SECTIONS, table, f" (in {path})")
    apply_overrides(cfg, SECTIONS, list(overrides or []))
    if path:
        _check_relative_paths(cfg, table, path)
    return cfg


def parse_args(argv: list[str]) -> JobConfig:
    """`--config FILE` (or `--config=FILE`, `--job.config_file FILE`) plus overrides ->
    a validated JobConfig. Meant for train.py: parse_args(sys.argv[1:])."""
    path = None
    rest: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("--config", "--job.config_file"):
            if i + 1 >= len(argv):
                raise ConfigError(f"{a} needs a file name")
            path = argv[i + 1]
            i += 2
            continue
        if a.startswith(("--config=", "--job.config_file=")):
            path = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    return load_config(path, rest).validate()
