"""The training loop: data -> model (per pipeline stage) -> loss -> backward -> clip -> optimizer ->
MoE bias update -> metrics -> checkpoint.

One `Trainer(cfg).train()` serves every parallel configuration. The parallel pieces (meshes, plans,
pipeline schedules) come from `moonlight.parallel`; this file only sequences them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import signal
import threading
import time

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from moonlight.checkpoint.export import export_hf, export_peft_adapter
from moonlight.checkpoint.state import Checkpointer
from moonlight.data.loader import build_dataloader
from moonlight.data.tokenizer import build_tokenizer
from moonlight.distributed import broadcast_object, local_tensor, to_device
from moonlight.dtypes import to_dtype
from moonlight.errors import ConfigError, NonFiniteError
from moonlight.hf_peft import load_peft_adapter
from moonlight.model import Moonlight
from moonlight.model.converters import convert_model, init_converted_weights
from moonlight.outputs import abandoned_folder, os_error_reason, refuse_link
from moonlight.train.balance import expert_load_imbalance, update_router_biases
from moonlight.train.build import (
    build_converters,
    build_model_args,
    check_host_memory,
    check_run_paths,
    check_runtime,
    check_token_ids,
    init_distributed,
    load_initial_weights,
    read_base_weights,
    take_dump_folder_lock,
    warn_about_data,
)
from moonlight.train.config import JobConfig
from moonlight.train.parallel_run import build_parallel_run, is_mixed_precision
from moonlight.train.metrics import memory_gib
from moonlight.train.report import RunReport, relative
from moonlight.train.optim import clip_grad_norm_
from moonlight.train.validation import Validator

# Models up to this size are initialized whole on every rank before sharding, so every parallel
# configuration starts from the same weights as a single-process run; larger ones initialize shard by shard.
_FULL_INIT_MAX_PARAMS = 2_000_000_000


class Trainer:
    def __init__(self, cfg: JobConfig):
        started = time.perf_counter()
        cfg.validate()
        self.cfg = cfg
        t = cfg.training
        self.rank, self.world_size, self.device = init_distributed(t.collective_timeout_s)
        ckpt_folder = os.path.join(cfg.job.dump_folder, cfg.checkpoint.folder)
        self.lock = take_dump_folder_lock(
            cfg.job.dump_folder,
            self.rank,  # before anything is written
            (ckpt_folder,) if cfg.checkpoint.enable else (),
            check=lambda: check_run_paths(cfg),
        )
        torch.manual_seed(t.seed)
        if t.deterministic:
            torch.use_deterministic_algorithms(True)

        self.model_args = build_model_args(cfg)
        check_runtime(cfg, self.model_args, self.device)
        check_host_memory(
            cfg,
            self.model_args,
            self.world_size,
            self.device,
            full_init=self.model_args.num_params() <= _FULL_INIT_MAX_PARAMS,
        )
        self.tokenizer = build_tokenizer(cfg.data.tokenizer)
        used = [
            i
            for i, on in ((self.tokenizer.bos_id, cfg.data.add_bos), (self.tokenizer.eos_id, cfg.data.add_eos))
            if on and i is not None
        ]  # a missing one is named by build_dataloader
        if used and max(used) >= self.model_args.vocab_size:
            raise ConfigError(
                f"the tokenizer's bos/eos ids reach {max(used)} but the model's vocab_size is "
                f"{self.model_args.vocab_size}: raise model vocab_size or change data.tokenizer"
            )

        self.converters = build_converters(cfg)  # LoRA/DoRA adapters, applied before any sharding
        self.bias_rate = cfg.moe.bias_rate(lora=cfg.lora.enable)  # the router bias's update rate
        self.aside: str | None = None  # a resume's abandoned-<time> folder (see _build_checkpointer)
        self.moved_steps: list[int] = []
        self.moved_to = ""
        self.parallel = self._build_parallel()
        if self.model_args.num_params() > _FULL_INIT_MAX_PARAMS:  # materialized from meta after sharding
            init_converted_weights(self.model_parts, self.converters)
        dp_rank, dp_world = self.parallel.dp_rank, self.parallel.dp_world
        self.grad_accum = cfg.grad_accum_steps(dp_world)
        self.n_forwards = n_forwards = self.grad_accum * self.parallel.microbatches_per_step
        for part in self.model_parts:
            for moe in part.moe_layers():  # every forward's aux loss adds its gradient: average them
                moe.aux_loss_coeff /= n_forwards  # as the model set it: 0 without seq_aux

        params = [(n, p) for part in self.model_parts for n, p in part.named_parameters()]
        # bf16 Newton-Schulz as Moonlight on GPUs; CPUs without bf16 units run it far slower than fp32
        ns_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.optimizers = cfg.optimizer.build(params, ns_dtype=ns_dtype, replica_mesh=self.parallel.replica_mesh)
        self.lr_schedulers = cfg.lr_scheduler.build(self.optimizers, total_steps=t.steps)
        self.dataloader = build_dataloader(
            cfg.data, self.tokenizer, t.seq_len, t.local_batch_size, dp_rank, dp_world, t.seed
        )
        self.document_mask = cfg.data.masks_documents()
        check_token_ids(self.dataloader.store, self.model_args.vocab_size, "data")
        self.validator = Validator(cfg, self.tokenizer, self.parallel, self.device) if cfg.validation.enable else None
        if self.validator is not None:
            check_token_ids(self.validator.loader.store, self.model_args.vocab_size, "validation data")
        if self.rank == 0:
            warn_about_data(cfg, self.dataloader, self.validator and self.validator.loader)
        self.step = 0
        # train_step also reports forward_backward_s (benchmarks: the step's time outside the optimizer);
        # on a GPU that waits for the device before and after forward+backward, two host syncs per step
        self.time_forward_backward = False
        # One process (FSDP2 on one rank for mixed precision) keeps its bf16 weights gathered from the first
        # forward to the last micro-batch's backward: one cast of the weights a step instead of two per
        # micro-batch, for one bf16 copy of the model held through the step. Bit for bit the same step.
        self.gather_once = self.world_size == 1
        self._last_inputs = None
        self._nonfinite_in_a_row = 0
        self._stop_signal: str | None = None  # the signal that asked this rank to stop (see train)
        self._ranks_stopping = 0  # how many ranks had asked to stop when the last step read its loss
        self.checkpointer = self._build_checkpointer()
        self.exported_step: int | None = None
        self.adapter_step: int | None = None
        self.metrics = cfg.metrics.build(cfg.job.dump_folder, self.rank, resume_step=self.step, aside=self.aside)
        compute_dtype = to_dtype(t.mixed_precision_param if is_mixed_precision(cfg) else t.dtype)
        self.peak_flops = cfg.metrics.mfu_peak(self.device, compute_dtype)
        self.flops_per_token = self.model_args.flops_per_token(t.seq_len)
        self.report = RunReport(self.rank, self.step, t.steps, t.global_batch_size * t.seq_len, started)
        self._write_config()
        if self.rank == 0:
            self._report_set_aside()
        self.report.header(self._header())

    def _header(self) -> list[str]:
        """The few lines before step 1: what runs, on what, from what data, where it writes."""
        cfg, t, a = self.cfg, self.cfg.training, self.model_args
        source = cfg.model.hf_config or cfg.checkpoint.initial_load_hf or f"preset {cfg.model.name}"
        lines = [
            cfg.job.description,
            f"model {source}: {a.num_params() / 1e6:,.1f}M params, {a.num_hidden_layers} layers, "
            f"{a.n_routed_experts} experts top-{a.num_experts_per_tok}; {t.dtype} on {self.device}",
            f"parallelism {self.parallel.description}, grad accumulation {self.grad_accum}; "
            f"{t.steps} steps of {t.global_batch_size} x {t.seq_len} tokens",
        ]
        lines += [converter.describe(self.model_parts) for converter in self.converters]
        d, v = cfg.data, cfg.validation
        data = f"data: {d.format} {d.path}, tokenizer {d.tokenizer}"
        lines.append(data + (f"; validation: {v.path} every {v.interval} steps" if v.enable else "; no validation"))
        c = cfg.checkpoint
        saves = f"{c.folder}/ every {c.interval} steps" if c.enable else "no checkpoints"
        lines.append(f"outputs: {cfg.job.dump_folder} (config.toml holds the full config; metrics.jsonl; {saves})")
        if self.step:
            lines.append(f"resumed from {os.path.join(self.checkpointer.folder, f'step-{self.step}')}")
        return lines

    # ------------------------------------------------------------------ setup
    def _write_config(self) -> None:
        """<dump_folder>/config.toml, by rank 0; a failed write (disk full, read-only) is every rank's error."""
        err = None
        if self.rank == 0:
            path = os.path.join(self.cfg.job.dump_folder, "config.toml")
            try:
                refuse_link(path)
                with open(path, "w") as f:
                    f.write(self.cfg.to_toml())
            except OSError as e:
                err = f"cannot write {path} ({os_error_reason(e)}): free space or make job.dump_folder writable"
            except ConfigError as e:
                err = str(e)
        err = broadcast_object(err)
        if err:
            raise ConfigError(err)

    def _report_set_aside(self) -> None:
        """One line naming what the resume moved aside: the abandoned branch's checkpoints and metrics."""
        metrics = self.metrics.set_aside
        if not (self.moved_steps or metrics):
            return
        parts = (
            [f"checkpoints {['step-%d' % s for s in self.moved_steps]} to {self.moved_to}"] if self.moved_steps else []
        ) + (
            [f"the metrics records of steps {metrics[0]}-{metrics[-1]} to {os.path.join(self.aside, 'metrics.jsonl')}"]
            if metrics
            else []
        )
        print(
            f"[moonlight] resumed at step {self.step}: the later steps of the run it leaves were moved aside, "
            + " and ".join(parts),
            flush=True,
        )

    def _build_parallel(self):
        parallel = build_parallel_run(self.cfg, self.model_args, self.world_size, self.device, self._init_full_model)
        self.model_parts = parallel.model_parts
        return parallel

    def _init_full_model(self) -> Moonlight:
        """The whole model with its initial weights: the same on every rank and in every parallel configuration."""
        args = self.model_args
        param_dtype = to_dtype(self.cfg.training.dtype)
        with torch.device("meta"):
            model = Moonlight(args)
        if args.num_params() > _FULL_INIT_MAX_PARAMS:
            # stays on meta; parts (and what the converters add) are initialized after sharding
            return convert_model(model.to(param_dtype), self.converters)
        model.to_empty(device="cpu")
        torch.manual_seed(self.cfg.training.seed)
        model.init_weights()
        return convert_model(model.to(param_dtype), self.converters)

    def _build_checkpointer(self) -> Checkpointer:
        c, lora = self.cfg.checkpoint, self.cfg.lora.enable
        base = os.path.abspath(os.path.expanduser(c.initial_load_hf)) if c.initial_load_hf else None
        ckpt = Checkpointer(
            c,
            self.cfg.job.dump_folder,
            self.model_parts,
            self.optimizers,
            self.lr_schedulers,
            self.dataloader,
            parallelism={"world_size": self.world_size, **dataclasses.asdict(self.cfg.parallelism)},
            # adapters are saved under <linear>.lora_a/lora_b.weight (+ .magnitude)
            lora=dataclasses.asdict(self.cfg.lora) if lora else None,
            base_weights=base,
            skip_frozen=self.cfg.skips_frozen_weights(),
            load_base=lambda path: read_base_weights(ckpt, path, lora),
        )
        if c.enable:
            self.step = ckpt.load(c.load_step)
        elif found := ckpt.available_steps():
            raise ConfigError(
                f"{ckpt.folder} holds checkpoints {found} but checkpoint.enable = false would start "
                "from scratch over them (and replace config.toml): set --checkpoint.enable=true to "
                "resume, or use another --job.dump_folder"
            )
        if self.step:  # what a resume leaves behind (a rollback's later steps) is moved here, not replaced
            self.aside = broadcast_object(abandoned_folder(self.cfg.job.dump_folder) if self.rank == 0 else None)
            self.moved_steps, self.moved_to = ckpt.set_aside_later(self.step, self.aside)
        if c.initial_load_hf and load_initial_weights(ckpt, c.initial_load_hf, lora=lora):
            if self.rank == 0:
                print(f"[moonlight] initialized the model from {c.initial_load_hf}", flush=True)
        adapter = self.cfg.lora.init_adapter
        if self.cfg.lora.enable and adapter and not (c.enable and ckpt.available_steps()):
            for part in self.model_parts:  # after the base weights (and DoRA's magnitudes from them)
                load_peft_adapter(part, os.path.abspath(os.path.expanduser(adapter)))
            if self.rank == 0:
                print(f"[moonlight] initialized the adapters from {adapter}", flush=True)
        return ckpt

    def _save(self, force: bool = False, final: bool = False) -> None:
        """A checkpoint when one is due (or `force`), and the HF export that checkpoint.export_hf asks for
        ("each": with every checkpoint; "end" and "each": at the end of training); likewise the PEFT
        adapter of lora.export_adapter. None while steps are being skipped as non-finite: the weights
        that produce them are no checkpoint to resume from."""
        if self._nonfinite_in_a_row:
            if self.checkpointer.due(self.step, force) and self.rank == 0:
                print(
                    f"[moonlight] WARNING step {self.step}: no checkpoint while steps are skipped as non-finite"
                    + self._resume_hint(),
                    flush=True,
                )
            return
        start = time.perf_counter()
        saved = self.checkpointer.save(self.step, force=force)
        if force or final:  # checkpoint.async_mode: the last save of the run is complete before we go on
            self.checkpointer.wait()
        if saved:
            path = relative(os.path.join(self.checkpointer.folder, f"step-{self.step}"))
            self.report.output(
                "checkpoint",
                self.step,
                path,
                time.perf_counter() - start,
                ", written in the background" if self.cfg.checkpoint.async_mode else "",
            )
        export = self.cfg.checkpoint.export_hf
        if ((export == "each" and saved) or (export and final)) and self.exported_step != self.step:
            start = time.perf_counter()
            path = export_hf(self.model_parts, os.path.join(self.cfg.job.dump_folder, "hf", f"step-{self.step}"))
            self.report.output("HF export", self.step, relative(path), time.perf_counter() - start)
            self.exported_step = self.step
        lora = self.cfg.lora
        due = (lora.export_adapter == "each" and saved) or (lora.export_adapter and final)
        if lora.enable and due and self.adapter_step != self.step:
            start = time.perf_counter()
            path = os.path.join(self.cfg.job.dump_folder, "adapter", f"step-{self.step}")
            path = export_peft_adapter(self.model_parts, path, dataclasses.asdict(lora), self.checkpointer.base_weights)
            self.report.output("adapter", self.step, relative(path), time.perf_counter() - start)
            self.adapter_step = self.step

    # ------------------------------------------------------------------- step
    def _forward_backward(self) -> torch.Tensor:
        """Run grad_accum micro-batches; returns this rank's share of the step's loss.

        The loss is the sum of the cross-entropy over every target token of the step divided by the
        number of target tokens of the whole step (all micro-batches, pipeline micro-batches and
        data-parallel ranks), so ranks and micro-batches with more targets weigh more. FSDP averages
        gradients over the dp x cp ranks (context-parallel ranks hold other tokens of the same batch),
        hence each rank divides its sum by (global count / (dp x cp)).

        That normalizer stays a tensor the host never reads (no sync): counted from the host labels,
        summed over the dp ranks on the device; `ParallelRun.batch_inputs` moves the batches without one."""
        batches = [self.dataloader.next_batch_with_info() for _ in range(self.grad_accum)]
        targets = torch.stack([(b.labels != -100).sum() for b in batches]).sum()
        if self.parallel.dp_world > 1:
            targets = to_device(targets, self.device)
            dist.all_reduce(targets, group=self.parallel.dp_group)
        num_tokens = targets.clamp(min=1).float() / self.parallel.gradient_ranks
        total = torch.zeros((), device=self.device)
        model = self.model_parts[0]
        gather_once = self.gather_once and isinstance(model, FSDPModule) and self.parallel.pipeline is None
        for i, batch in enumerate(batches):
            if gather_once:  # keep the (bf16) weights gathered until the last micro-batch's backward
                if i == 0:
                    model.set_reshard_after_forward(False)
                model.set_reshard_after_backward(i == len(batches) - 1)
            inputs, labels, packing = self.parallel.batch_inputs(batch, self.device, self.document_mask)
            self._last_inputs = (inputs, packing)
            loss = self.parallel.forward_loss(inputs, labels, packing, num_tokens=num_tokens)
            if loss is not None:  # None on pipeline ranks without the last stage
                total += loss.detach()
        return total

    def _locate_nonfinite(self) -> str:
        """Name the first module (in execution order) whose output is non-finite by replaying the last
        micro-batch with hooks; only done on a bad step. Pipeline stages, or a NaN that only appears
        in backward, fall back to the first parameter with a non-finite gradient."""
        if self.parallel.pipeline is None and self._last_inputs is not None:
            found = []

            def check(name):
                def hook(module, inputs, output):
                    out = local_tensor(output)
                    if not found and isinstance(out, torch.Tensor) and not torch.isfinite(out).all():
                        found.append(name)

                return hook

            model = self.model_parts[0]
            handles = [m.register_forward_hook(check(n)) for n, m in model.named_modules() if n]
            try:
                with torch.no_grad():
                    inputs, packing = self._last_inputs
                    model(inputs, **packing)
            finally:
                for h in handles:
                    h.remove()
            if found:
                return f"module {found[0]} (first non-finite output)"
        for part in self.model_parts:
            for name, p in part.named_parameters():
                g = None if p.grad is None else local_tensor(p.grad)
                if g is not None and not torch.isfinite(g).all():
                    return f"parameter {name} (first non-finite gradient)"
        return "no non-finite value found on this rank"

    def logs_step(self, step: int) -> bool:
        """Whether the metrics of `step` (1-based) are logged."""
        return step % self.cfg.metrics.log_freq == 0 or step == self.cfg.training.steps

    def train_step(self) -> dict[str, float]:
        """One optimizer step. Reads ONE small device->host copy (loss and grad norm, for the
        non-finite check, and the ranks' stop requests); the other metrics are computed and read only on
        logged steps (and time_forward_backward's device waits only when set)."""
        t = self.cfg.training
        start = time.perf_counter()
        self.optimizers.zero_grad()
        fb_start = self._device_clock() if self.time_forward_backward else None
        local_loss = self._forward_backward()
        fb_s = self._device_clock() - fb_start if fb_start is not None else None
        params = [p for part in self.model_parts for p in part.parameters()]
        grad_norm = clip_grad_norm_(
            params, t.max_norm if t.max_norm > 0 else float("inf"), pp_group=self.parallel.pp_group
        )
        reduced = self.parallel.reduce_loss(local_loss, stop=self._stop_signal is not None)
        loss, stops, grad_norm = torch.cat([reduced, grad_norm.reshape(1).to(reduced.dtype)]).tolist()
        self._ranks_stopping = int(stops)
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        moe_layers = [m for part in self.model_parts for m in part.moe_layers()]
        if finite:
            self._nonfinite_in_a_row = 0
            self.optimizers.step()
            rate = self.bias_rate
        else:
            self._handle_nonfinite(loss, grad_norm)
            rate = 0.0  # a bad step must not steer the router either
        counts = (
            update_router_biases(
                [m.router.expert_bias for m in moe_layers],
                [m.tokens_per_expert for m in moe_layers],
                rate,
                group=self.parallel.moe_count_group,
            )
            if moe_layers
            else None
        )
        self.lr_schedulers.step()
        elapsed = time.perf_counter() - start
        tokens = t.global_batch_size * t.seq_len
        values = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": self.lr_schedulers.get_last_lr()[0],
            "tokens_per_s": tokens / elapsed,
            "step_time_s": elapsed,
            "mfu_pct": 100 * self.flops_per_token * tokens / elapsed / (self.peak_flops * self.world_size),
            "memory_gib": memory_gib(self.device),
            "skipped": not finite,
        }
        if fb_s is not None:
            values["forward_backward_s"] = fb_s
        if counts is not None and self.logs_step(self.step + 1):
            values.update(self._moe_metrics(counts, moe_layers))
        return values

    def _device_clock(self) -> float:
        """time.perf_counter() once the device's queued work is done (CUDA runs kernels asynchronously)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _moe_metrics(self, counts: torch.Tensor, moe_layers: list) -> dict:
        """Expert-load imbalance per layer and the aux loss, read back in one copy."""
        imbalance = expert_load_imbalance(counts)
        aux = [m.last_aux_loss for m in moe_layers if m.last_aux_loss is not None]
        aux_sum = sum(aux).float().reshape(1) if aux else imbalance.new_zeros(0)
        routed, *read = torch.cat(
            [counts.sum().reshape(1).to(imbalance.dtype), aux_sum.to(imbalance.dtype), imbalance.flatten()]
        ).tolist()
        if routed <= 0:
            return {}
        values = {}
        if aux:
            values["aux_loss"] = read.pop(0) * self.n_forwards
        values["max_expert_load"] = max(read)
        values["expert_load"] = [round(x, 3) for x in read]
        return values

    def _handle_nonfinite(self, loss: float, grad_norm: float):
        where = self._locate_nonfinite()
        msg = f"step {self.step + 1}: non-finite loss={loss} / grad_norm={grad_norm}; on rank {self.rank}: {where}"
        self._nonfinite_in_a_row += 1
        if (
            self.cfg.training.on_nonfinite == "stop"
            or self._nonfinite_in_a_row >= self.cfg.training.max_consecutive_nonfinite
        ):
            self.checkpointer.wait()  # async_mode: finish the save in flight (finite weights): the hint names it
        if self.checkpointer.pinned_step is None:  # the first skipped step: keep the checkpoint before it
            self.checkpointer.pinned_step = self.checkpointer.last_saved_step
        if self.cfg.training.on_nonfinite == "stop":
            raise NonFiniteError(msg + " (training.on_nonfinite = 'stop')" + self._resume_hint())
        if self._nonfinite_in_a_row >= self.cfg.training.max_consecutive_nonfinite:
            raise NonFiniteError(
                msg + f"; {self._nonfinite_in_a_row} steps in a row were skipped, stopping "
                "(training.max_consecutive_nonfinite)" + self._resume_hint()
            )
        if self.rank == 0:
            print(f"[moonlight] WARNING {msg}; skipping the optimizer step", flush=True)
        self.optimizers.zero_grad()

    def _resume_hint(self) -> str:
        good = self.checkpointer.pinned_step
        if not self.cfg.checkpoint.enable or good is None:
            return "; no checkpoint precedes the first skipped step: restart the run (e.g. with a lower optimizer.lr)"
        return (
            f"; the last checkpoint before the first skipped step is step-{good}: resume from it with "
            f"--checkpoint.load_step={good} (e.g. with a lower optimizer.lr)"
        )

    # ------------------------------------------------------------------- loop
    def train(self) -> None:
        cfg, t = self.cfg, self.cfg.training
        if t.gc_freq:
            gc.disable()
        if self.step >= t.steps and self.rank == 0:
            print(
                f"[moonlight] the checkpoint at step {self.step} already reaches training.steps={t.steps}: nothing "
                "to train (raise --training.steps, or use another --job.dump_folder for a new run)",
                flush=True,
            )
        profiler = cfg.metrics.profiler(cfg.job.dump_folder, self.rank)

        def on_signal(signum, frame):
            if self._stop_signal is not None and signum == signal.SIGINT:  # a second Ctrl-C: abort at once
                raise KeyboardInterrupt
            self._stop_signal = signal.Signals(signum).name

        in_main_thread = threading.current_thread() is threading.main_thread()  # signals need the main thread
        previous = (
            {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
            if in_main_thread
            else {}
        )
        self.report.begin()
        try:
            with profiler or contextlib.nullcontext():
                while self.step < t.steps:
                    values = self.train_step()
                    self.step += 1
                    if self.validator is not None and self.validator.due(self.step, t.steps):
                        values.update(self.validator.run())
                    values.update(self.report.step_done(self.step, values))
                    if self.logs_step(self.step) or "val_loss" in values:
                        self.metrics.log(self.step, values)
                    if self._stop_requested():
                        self._save(force=True)
                        if self.rank == 0:
                            saved = cfg.checkpoint.enable and self.checkpointer.last_saved_step == self.step
                            why = self._stop_signal or "stop signal on another rank"
                            print(
                                f"[moonlight] {why}: stopped after step "
                                f"{self.step}" + (", checkpoint saved" if saved else ""),
                                flush=True,
                            )
                        break
                    self._save(force=self.step == t.steps, final=self.step == t.steps)
                    if t.gc_freq and self.step % t.gc_freq == 0:
                        gc.collect(1)
                    if profiler is not None:
                        profiler.step()
            self.report.summary(self.flops_per_token, self.peak_flops, self.world_size)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if t.gc_freq:
                gc.enable()
            self.metrics.close()
            self.lock.release()

    def _stop_requested(self) -> bool:
        """A SIGTERM (preemption, torchrun shutting down), a Ctrl-C (SIGINT) or a SIGHUP (the SSH session
        closed) on any rank stops every rank after the same step, so the final checkpoint's collectives
        line up: the step's one host read tells every rank how many asked (a signal after that read
        counts at the next step)."""
        if dist.is_initialized() and dist.get_world_size() > 1:
            return self._ranks_stopping > 0
        return self._stop_signal is not None
