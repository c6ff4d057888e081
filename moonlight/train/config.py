"""The TOML job configuration: one dataclass per section, each with its own checks, and the job
(`JobConfig`) with the checks across sections.

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

from moonlight.config import ModelArgs
from moonlight.errors import ConfigError
from moonlight.parallel.pipeline_layout import SCHEDULES, layout_problems, schedule_problems
from moonlight.train.config_io import (BadValue, apply_overrides, apply_table, coerce, field_types, read_toml, to_toml,
                                       type_name)

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


def inside(path: str) -> bool:
    """Whether a path under job.dump_folder stays inside it (relative, no '..', no '~')."""
    parts = pathlib.PurePath(path).parts
    return not os.path.isabs(path) and ".." not in parts and not (parts and parts[0].startswith("~"))


# Names the run writes directly in job.dump_folder (and abandoned-<time>, a rollback's), which checkpoint.folder
# and metrics.tb_folder must not take.
RUN_OUTPUTS = ("config.toml", "metrics.jsonl", ".lock", "hf", "adapter", "profile")


def _require(checks: list[tuple[bool, str]]) -> list[str]:
    """The messages of the checks that fail."""
    return [msg for ok, msg in checks if not ok]


@dataclass
class JobSection:
    dump_folder: str = "./outputs"
    """Run output folder: config.toml, checkpoints, tensorboard, profiles."""
    description: str = "Moonlight debug model on CPU"
    """One line naming the run, printed first."""

    def problems(self) -> list[str]:
        return _require([(bool(self.dump_folder), "job.dump_folder must not be empty")])


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
                errs.append(f"model.overrides.{key} expects {type_name(fields[key])}, got {type(value).__name__} "
                            f"{value!r}")
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
        out = _require([
            (self.steps > 0, f"training.steps must be > 0 (got {self.steps})"),
            (0 <= self.seed < 2**64, f"training.seed must be in [0, 2**64) (got {self.seed})"),  # torch's and numpy's
            (self.seq_len > 0, f"training.seq_len must be > 0 (got {self.seq_len})"),
            (self.global_batch_size > 0, f"training.global_batch_size must be > 0 (got {self.global_batch_size})"),
            (self.local_batch_size > 0, f"training.local_batch_size must be > 0 (got {self.local_batch_size})"),
            (self.max_norm >= 0, f"training.max_norm must be >= 0 (0 = no clipping; got {self.max_norm})"),
            (self.gc_freq >= 0, f"training.gc_freq must be >= 0 (got {self.gc_freq})"),
            (self.collective_timeout_s > 0,
             f"training.collective_timeout_s must be > 0 (got {self.collective_timeout_s})"),
            (self.max_consecutive_nonfinite >= 1,
             f"training.max_consecutive_nonfinite must be >= 1 (got {self.max_consecutive_nonfinite})"),
        ])
        if self.global_batch_size > 0 and self.local_batch_size > 0 and self.global_batch_size % self.local_batch_size:
            out.append(f"training.global_batch_size ({self.global_batch_size}) must be a multiple of "
                       f"training.local_batch_size ({self.local_batch_size})")
        return out


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
        return _require([
            (self.lr > 0, f"optimizer.lr must be > 0 (got {self.lr})"),
            (0 <= self.beta1 < 1, f"optimizer.beta1 must be in [0, 1) (got {self.beta1})"),
            (0 <= self.beta2 < 1, f"optimizer.beta2 must be in [0, 1) (got {self.beta2})"),
            (self.eps > 0, f"optimizer.eps must be > 0 (got {self.eps})"),
            (self.weight_decay >= 0, f"optimizer.weight_decay must be >= 0 (got {self.weight_decay})"),
            (0 <= self.momentum < 1, f"optimizer.momentum must be in [0, 1) (got {self.momentum})"),
            (self.ns_steps >= 1, f"optimizer.ns_steps must be >= 1 (got {self.ns_steps})"),
        ])


@dataclass
class LRSchedulerSection:
    warmup_steps: int = 20
    """Linear warmup steps from 0 to optimizer.lr."""
    decay_type: Literal["cosine", "linear", "wsd"] = "cosine"
    """Decay after warmup: cosine, linear, or WSD (stable, then a linear decay)."""
    decay_ratio: float = 0.2
    """WSD only: the fraction of training.steps spent in the final (linear) decay."""
    min_lr_ratio: float = 0.1
    """Final lr = optimizer.lr * min_lr_ratio (the pretrain recipe: 4.2e-4 -> 4.2e-5)."""

    def problems(self, steps: int) -> list[str]:
        out = _require([
            (self.warmup_steps >= 0, f"lr_scheduler.warmup_steps must be >= 0 (got {self.warmup_steps})"),
            (self.warmup_steps <= steps,
             f"lr_scheduler.warmup_steps ({self.warmup_steps}) must be <= training.steps ({steps})"),
            (0 <= self.min_lr_ratio <= 1,
             f"lr_scheduler.min_lr_ratio must be in [0, 1], i.e. min lr <= optimizer.lr (got {self.min_lr_ratio})"),
            (0 <= self.decay_ratio <= 1, f"lr_scheduler.decay_ratio must be in [0, 1] (got {self.decay_ratio})"),
        ])
        if self.decay_type == "wsd" and 0 <= self.decay_ratio <= 1:
            decay_steps = round(self.decay_ratio * steps)
            if self.warmup_steps + decay_steps > steps:
                out.append(f"lr_scheduler.warmup_steps ({self.warmup_steps}) + decay steps (decay_ratio "
                           f"{self.decay_ratio} * {steps} = {decay_steps}) exceed training.steps ({steps})")
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
        out = [f"parallelism.{k} must be >= 1 (got {getattr(self, k)})"
               for k in ("dp_replicate", "cp", "tp", "ep", "pp", "pp_virtual_stages") if getattr(self, k) < 1]
        out += _require([
            (self.dp_shard == -1 or self.dp_shard >= 1,
             f"parallelism.dp_shard must be -1 (the rest) or >= 1 (got {self.dp_shard})"),
            (self.pp_microbatches >= 0,
             f"parallelism.pp_microbatches must be >= 0 (0 = auto; got {self.pp_microbatches})"),
        ])
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
class DataSection:
    format: Literal["jsonl", "hf", "megatron", "chat"] = "jsonl"
    """jsonl text, a local HF dataset, Megatron .bin/.idx, or chat conversations."""
    path: str = "data/corpus"
    """Relative to the working directory (not the config file). jsonl: a file, a directory (all *.jsonl
    and *.jsonl.gz) or a glob; hf: a save_to_disk directory or
    json/parquet/arrow/csv file(s); megatron: the prefix of <prefix>.bin/.idx (or either file);
    chat: jsonl file(s) as for jsonl, else an HF dataset as for hf."""
    text_key: str = "text"
    """jsonl / hf: the field holding a document's text."""
    split: str = "train"
    """Split to use when an hf path holds several."""
    tokenizer: str = "byte"
    """"byte", a directory with tiktoken.model, or a tokenizer.json (or its directory)."""
    on_bad_line: Literal["skip", "error"] = "skip"
    """A malformed line or row: skip it (counted, reported) or stop with file:line."""
    add_bos: bool = False
    """Prepend the tokenizer's bos to every document."""
    add_eos: bool = True
    """Appended to every document (set false for Megatron files made with --append-eod, or by
    `python -m moonlight.prepare_data --append-eos`)."""
    shuffle: bool = True
    """Shuffle the document order each epoch (seeded by training.seed and the epoch)."""
    messages_key: str = "messages"
    """chat: the field holding a conversation, a list of {role, content} (system/user/assistant)."""
    chat_overflow: Literal["truncate", "drop"] = "truncate"
    """chat: a conversation longer than seq_len + 1 tokens keeps its first seq_len + 1, or is dropped."""
    document_mask: bool = False
    """Packed documents attend only to themselves and RoPE positions restart at each one (always on
    for chat)."""

    def problems(self) -> list[str]:
        return _require([(bool(self.path), "data.path must not be empty"),
                         (self.format == "hf" or self.split == "train",
                          f"data.split = {self.split!r} applies to data.format = 'hf' only (a {self.format} dataset "
                          "has no splits): leave it at 'train'"),
                         (bool(self.text_key), "data.text_key must not be empty"),
                         (bool(self.tokenizer), "data.tokenizer must not be empty"),
                         (self.format != "chat" or bool(self.messages_key),
                          "data.messages_key must not be empty (the conversation field)")])


@dataclass
class ValidationSection:
    enable: bool = False
    """Evaluate the loss on held-out data during training."""
    path: str = ""
    """Held-out data, read like data.path (same tokenizer, keys and seq_len; never shuffled)."""
    format: Literal["", "jsonl", "hf", "megatron", "chat"] = ""
    """"" = data.format."""
    interval: int = 100
    """Validate every `interval` steps and after the last one."""
    steps: int = 4
    """Batches per validation, each of training.global_batch_size sequences; the same ones every time."""

    def problems(self) -> list[str]:
        if not self.enable:
            return []
        return _require([
            (bool(self.path), "validation.path must name the held-out data (or set validation.enable = false)"),
            (self.interval >= 1, f"validation.interval must be >= 1 (got {self.interval})"),
            (self.steps >= 1, f"validation.steps must be >= 1 (got {self.steps})"),
        ])


@dataclass
class CheckpointSection:
    enable: bool = False
    """Save checkpoints (and resume from the latest one in the dump folder)."""
    interval: int = 100
    """Save every N steps (and after the last step)."""
    keep_latest_k: int = 2
    """0 = keep all."""
    folder: str = "checkpoint"
    """Under job.dump_folder."""
    load_step: int = -1
    """-1 = the latest checkpoint in folder (if any)."""
    initial_load_hf: str = ""
    """HF checkpoint directory (or a model-only DCP checkpoint from `python -m moonlight.convert hf-to-dcp`)
    to start from when no checkpoint of this run exists."""
    export_hf: Literal["", "end", "each"] = ""
    """Also write an HF-format checkpoint (<dump_folder>/hf/step-N): never, at the end, or at each save
    ("each" keeps every export: keep_latest_k rotates the checkpoints only)."""
    async_mode: Literal["", "async"] = ""
    """"async": training goes on while a save is written (staged to CPU first; one save in flight,
    COMPLETE written when the next save starts or training ends). "" = the step waits for the save."""
    frozen_weights: Literal["auto", "save", "reload"] = "auto"
    """Frozen (not trained) weights: "save" them in every checkpoint, or "reload" them from
    initial_load_hf on resume, so a LoRA/DoRA checkpoint holds the adapters, buffers and optimizer
    state only. "auto": "reload" in a LoRA/DoRA run with initial_load_hf, else "save"."""
    other_base: bool = False
    """Resume a LoRA/DoRA checkpoint whose frozen weights were read from another directory than
    initial_load_hf (the same base, moved); otherwise that is refused: other weights under the adapters."""

    def problems(self) -> list[str]:
        return _require([
            (self.interval >= 1, f"checkpoint.interval must be >= 1 (got {self.interval})"),
            (self.keep_latest_k >= 0,
             f"checkpoint.keep_latest_k must be >= 0 (0 = keep all; got {self.keep_latest_k})"),
            (self.load_step >= -1, f"checkpoint.load_step must be -1 (latest) or a step >= 0 (got {self.load_step})"),
            (self.enable or self.load_step == -1, f"checkpoint.load_step = {self.load_step} resumes from a checkpoint, "
             "which checkpoint.enable = false turns off: set checkpoint.enable = true"),
            (bool(self.folder), "checkpoint.folder must not be empty"),
            # inside the (locked) dump folder: rotation and cleanup then delete only this run's saves
            (inside(self.folder),
             f"checkpoint.folder = {self.folder!r} must be a relative path inside job.dump_folder "
             "(point job.dump_folder elsewhere instead)"),
        ])


@dataclass
class MetricsSection:
    log_freq: int = 1
    """Print and record metrics every N steps (and the last step)."""
    enable_tensorboard: bool = False
    """Also write TensorBoard events under job.dump_folder/tb_folder."""
    tb_folder: str = "tb"
    """Under job.dump_folder."""
    device_peak_flops: float = 0.0
    """Peak FLOP/s of one device (rank) for MFU; 0 = a known GPU's spec peak, a timed matmul on other GPUs,
    a nominal 100 GFLOP/s per rank on CPU (comparable between runs, not between machines)."""
    profile_start: int = 0
    """First profiled step; 0 = profiling off."""
    profile_steps: int = 0
    """Steps recorded by torch.profiler from profile_start on."""

    def problems(self) -> list[str]:
        return _require([
            (self.log_freq >= 1, f"metrics.log_freq must be >= 1 (got {self.log_freq})"),
            (self.device_peak_flops >= 0, f"metrics.device_peak_flops must be >= 0 (got {self.device_peak_flops})"),
            (self.profile_start >= 0, f"metrics.profile_start must be >= 0 (got {self.profile_start})"),
            (self.profile_steps >= 0, f"metrics.profile_steps must be >= 0 (got {self.profile_steps})"),
            (self.profile_steps == 0 or self.profile_start >= 1,
             f"metrics.profile_steps={self.profile_steps} needs metrics.profile_start >= 1"),
            (bool(self.tb_folder) and inside(self.tb_folder),
             f"metrics.tb_folder = {self.tb_folder!r} must be a relative path inside job.dump_folder (point "
             "job.dump_folder elsewhere instead)"),
        ])


@dataclass
class MoESection:
    bias_update_rate: float | None = None
    """Aux-loss-free balancing: b += rate * sign(mean_load - load); 0 freezes the bias. Unset: 1e-3,
    or 0 (frozen) in a LoRA/DoRA run."""
    aux_loss_coeff: float = 0.001
    """Sequence-level balance loss coefficient; 0 disables it."""

    def problems(self) -> list[str]:
        return _require([
            (self.bias_update_rate is None or self.bias_update_rate >= 0,
             f"moe.bias_update_rate must be >= 0 (got {self.bias_update_rate})"),
            (self.aux_loss_coeff >= 0, f"moe.aux_loss_coeff must be >= 0 (got {self.aux_loss_coeff})"),
        ])

    def bias_rate(self, lora: bool) -> float:
        """The bias update rate in effect: as set, else 1e-3 (0 with LoRA: the base model stays frozen)."""
        if self.bias_update_rate is not None:
            return self.bias_update_rate
        return 0.0 if lora else 1e-3


@dataclass
class LoRASection:
    enable: bool = False
    """Fine-tune low-rank adapters only (everything else frozen); see moonlight/model/lora.py."""
    rank: int = 8
    """Adapter rank r."""
    alpha: float = 16.0
    """Adapter scale = alpha / rank."""
    dora: bool = False
    """DoRA: also learn a per-output-row magnitude of the adapted weight."""
    dropout: float = 0.0
    """Dropout on the adapter path's input."""
    targets: list[str] = field(default_factory=lambda: [
        "attn.q_proj", "attn.q_a_proj", "attn.q_b_proj", "attn.kv_a_proj", "attn.kv_b_proj", "attn.o_proj"])
    """Module-name suffixes of the nn.Linear layers to adapt (default: the attention linears; the q
    projections that the model lacks, q_proj or q_a/q_b_proj, are skipped)."""
    export_adapter: Literal["", "end", "each"] = ""
    """Also write the adapters as a PEFT adapter (<dump_folder>/adapter/step-N): never, at the end, or
    at each checkpoint save."""
    init_adapter: str = ""
    """A PEFT adapter directory to start the adapters from (loaded after the base weights)."""

    def problems(self) -> list[str]:
        if not self.enable:
            return _require([(not self.init_adapter and not self.export_adapter,
                              "lora.init_adapter / lora.export_adapter need lora.enable = true")])
        return _require([
            (self.rank >= 1, f"lora.rank must be >= 1 (got {self.rank})"),
            (self.alpha > 0, f"lora.alpha must be > 0 (got {self.alpha})"),
            (0 <= self.dropout < 1, f"lora.dropout must be in [0, 1) (got {self.dropout})"),
            (bool(self.targets) and all(self.targets),
             f"lora.targets must name at least one module suffix, e.g. \"attn.q_proj\" (got {self.targets})"),
        ])


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
            errs += [f"lora.enable = true supports data parallel (FSDP/HSDP) only: set parallelism.{k} = 1 "
                     f"(got {getattr(self.parallelism, k)}; the LoRA/DoRA recipe is TP1/PP1/EP1/CP1)"
                     for k in ("tp", "ep", "pp", "cp") if getattr(self.parallelism, k) != 1]
        if self.training.compile and self.activation_checkpoint.mode == "op":
            errs.append("training.compile = true does not work with activation_checkpoint.mode = 'op' (torch.compile "
                        "cannot run inside op-level selective checkpointing's dispatch mode): use mode 'selective' "
                        "or 'full' with compile, or 'op' without it")
        if self.checkpoint.frozen_weights == "reload" and not (self.lora.enable and self.checkpoint.initial_load_hf):
            errs.append("checkpoint.frozen_weights = 'reload' re-reads the frozen base weights from "
                        "checkpoint.initial_load_hf: it needs lora.enable = true and checkpoint.initial_load_hf set "
                        "(or use 'save')")
        tops = {}
        for key, sub in (("checkpoint.folder", self.checkpoint.folder), ("metrics.tb_folder", self.metrics.tb_folder)):
            parts = pathlib.PurePath(sub).parts if sub and inside(sub) else ("",)
            top = parts[0] if parts else "."
            if top in RUN_OUTPUTS or top == "." or top.startswith("abandoned-") or top in tops:
                errs.append(f"{key} = {sub!r} collides with " + (f"{tops[top]}" if top in tops else
                            f"the run's own {top!r} in job.dump_folder") + ": pick another folder name")
            elif top:
                tops[top] = key
        dump = os.path.realpath(self.job.dump_folder)
        held_out = self.validation.enable and self.validation.path
        for key, path in (("data.path", self.data.path), ("validation.path", held_out)):
            source = os.path.realpath(os.path.expanduser(path)) if path else ""
            if os.path.isdir(source) and os.path.commonpath([dump, source]) == source:
                errs.append(f"job.dump_folder = {self.job.dump_folder!r} lies inside {key} = {path!r}: the next run "
                            "would read this run's metrics.jsonl and checkpoints as data; use a dump folder outside it")
            elif path and not os.path.isdir(source):  # a file or a glob: none of it may be the run's own output
                ours = [f for f in glob.glob(os.path.expanduser(path), recursive=True) if self._is_run_output(f)]
                if ours:
                    errs.append(f"{key} = {path!r} matches {ours[0]}, inside job.dump_folder = "
                                f"{self.job.dump_folder!r}: the run would read its own outputs as data; narrow "
                                f"{key} or use a dump folder outside it")
        if errs:
            raise ConfigError(f"invalid config: {errs[0]}" if len(errs) == 1 else
                              f"invalid config, {len(errs)} problems: " + "; ".join(f"({i}) {e}" for i, e in
                                                                          enumerate(errs, 1)))
        return self

    def _is_run_output(self, path: str) -> bool:
        """Whether a path is (inside) something this run writes in job.dump_folder."""
        dump, real = os.path.realpath(self.job.dump_folder), os.path.realpath(path)
        if os.path.commonpath([dump, real]) != dump or real == dump:
            return False
        top = pathlib.PurePath(os.path.relpath(real, dump)).parts[0]
        own = {*RUN_OUTPUTS, *(top for folder in (self.checkpoint.folder, self.metrics.tb_folder)
                               for top in pathlib.PurePath(folder).parts[:1])}
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
PATH_KEYS = (("data", "path"), ("validation", "path"), ("data", "tokenizer"), ("model", "hf_config"),
             ("checkpoint", "initial_load_hf"), ("lora", "init_adapter"))


def _check_relative_paths(cfg: JobConfig, table: dict[str, Any], config_file: str) -> None:
    """A relative path the config file sets that is missing here but exists next to the config file:
    say so (the user likely ran from another folder) instead of a missing-file error later."""
    here = os.path.dirname(os.path.abspath(config_file))
    for sec, key in PATH_KEYS:
        value = table.get(sec, {}).get(key)
        if value != getattr(getattr(cfg, sec), key):  # overridden on the command line
            continue
        if (isinstance(value, str) and value and value != "byte" and not os.path.isabs(os.path.expanduser(value))
                and not any(c in value for c in "*?[") and not os.path.exists(value)
                and os.path.exists(os.path.join(here, value)) and here != os.getcwd()):
            raise ConfigError(f"{sec}.{key} = {value!r} (in {config_file}) does not exist here: relative paths are "
                              f"read from the working directory {os.getcwd()}, not from the config file's folder, "
                              f"where it does exist; run from {here}, or set {sec}.{key} to "
                              f"{os.path.join(here, value)!r}")


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
