"""Validation loss on held-out data ([validation]): forward only, in every parallel configuration.

    validator = Validator(cfg, tokenizer, parallel, device)
    if validator.due(step, last_step):
        values.update(validator.run())          # {"val_loss": ..., "val_ppl": ...}, the same on every rank

The held-out data is read like the training data (same tokenizer, keys, seq_len and data-parallel
sharding, never shuffled) and every validation sees the same `validation.steps` global batches. The loss is
masked like training: the sum of the cross-entropy over every target token (label != -100) of all
batches and data-parallel ranks, divided by their number.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist

from moonlight.train.config import JobConfig
from moonlight.data.loader import build_dataloader
from moonlight.data.documents import DataKeys
from moonlight.train.parallel_run import ParallelRun


class Validator:
    def __init__(self, cfg: JobConfig, tokenizer, parallel: ParallelRun, device: torch.device):
        v, t = cfg.validation, cfg.training
        data = dataclasses.replace(cfg.data, path=v.path, format=v.format or cfg.data.format, shuffle=False)
        # the readers' messages name validation.path (and validation.format when set), [data] for the rest
        keys = DataKeys("validation", ("path", "format") if v.format else ("path",))
        self.loader = build_dataloader(
            data, tokenizer, t.seq_len, t.local_batch_size, parallel.dp_rank, parallel.dp_world, t.seed, keys=keys
        )
        self.start = self.loader.state_dict()
        self.document_mask = data.masks_documents()
        # each validation step is one global batch: the same rows whatever the parallelism
        self.interval, self.micro_batches = v.interval, v.steps * cfg.grad_accum_steps(parallel.dp_world)
        self.parallel, self.device = parallel, device

    def due(self, step: int, last_step: int) -> bool:
        return step % self.interval == 0 or step == last_step

    @torch.no_grad()
    def run(self) -> dict[str, float]:
        """Every rank calls; returns val_loss and val_ppl (exp of the loss)."""
        parallel = self.parallel
        parts = parallel.model_parts
        modes = [part.training for part in parts]
        for part in parts:
            part.eval()
        self.loader.load_state_dict(self.start)
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        targets = 0
        try:
            for _ in range(self.micro_batches):
                batch = self.loader.next_batch_with_info()
                inputs, labels, packing = parallel.batch_inputs(batch, self.device, self.document_mask)
                targets += int((labels != -100).sum())  # this rank's tokens: cp ranks each count theirs
                loss = parallel.forward_loss(inputs, labels, packing)  # eval mode: MoE layers count nothing
                if loss is not None:
                    loss_sum += loss.double()
        finally:
            for part, mode in zip(parts, modes):
                part.train(mode)
        # one rank per data-parallel replica and cp slice holds the loss (last pipeline stage, tp rank 0)
        holds = parallel.holds_loss
        held = torch.stack(
            [loss_sum * holds, torch.tensor(float(targets * holds), device=self.device, dtype=torch.float64)]
        )
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(held)
        val_loss = float(held[0] / held[1]) if held[1] > 0 else math.nan
        return {"val_loss": val_loss, "val_ppl": math.exp(val_loss) if val_loss < 700 else math.inf}
