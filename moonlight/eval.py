"""Loss, perplexity and tokens/s of a model on a data set:

    python -m moonlight.eval DATA (--hf DIR | --dcp RUN/checkpoint [--step N]) [--adapter DIR]
                             [--format jsonl|hf|megatron|chat] [--tokenizer SPEC] [--seq-len 1024]
                             [--batch-size 8] [--batches N] [--document-mask] [--dtype D] [--device D]

DATA is read as [data] reads it (`data.format`, tokenizer, eos, never shuffled): sequences of
--seq-len tokens packed across documents; chat scores only the assistant tokens. The loss is the
trainer's validation loss: the sum of the cross-entropy over every target token divided by their
number. Progress goes to stderr; the result is one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

from moonlight.data.loader import FORMATS, DataSection, build_dataloader
from moonlight.data.tokenizer import build_tokenizer
from moonlight.errors import ArgumentParser, ConfigError, exit_on_user_error
from moonlight.generate import add_model_arguments, check_model_arguments, load_model
from moonlight.hf import progress
from moonlight.model.loss import cross_entropy_from_hidden
from moonlight.prepare_data import CommandLineKeys
from moonlight.train.build import check_token_ids


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m moonlight.eval",
        description="Loss, perplexity and tokens/s of a Moonlight model on a data set (one JSON line on stdout).",
    )
    p.add_argument(
        "data",
        metavar="DATA",
        help="what data.path takes: jsonl file(s), a directory or glob, a local "
        "HF dataset, a Megatron prefix, or chat jsonl",
    )
    add_model_arguments(p)
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="jsonl",
        help="as data.format (default jsonl); chat scores the assistant tokens only",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=1024,
        help="tokens per sequence (default 1024, at most the model's max_position_embeddings)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default 8)")
    p.add_argument(
        "--batches", type=int, default=0, help="batches to score (default 0: one pass over DATA, whole batches only)"
    )
    p.add_argument("--seed", type=int, default=42, help="chat: the seed of the packing order (as training.seed)")
    p.add_argument("--text-key", default="text", help="as data.text_key")
    p.add_argument("--messages-key", default="messages", help="as data.messages_key")
    p.add_argument("--split", default="train", help="hf: as data.split")
    p.add_argument(
        "--no-eos",
        action="store_true",
        help="do not end each document with eos (data.add_eos = false, e.g. Megatron files written with --append-eos)",
    )
    p.add_argument("--add-bos", action="store_true", help="as data.add_bos")
    p.add_argument("--document-mask", action="store_true", help="as data.document_mask (always on for chat)")
    return p


def _checked_args(argv: list[str] | None) -> argparse.Namespace:
    ns = build_parser().parse_args(argv)
    for name in ("seq_len", "batch_size"):
        if getattr(ns, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(ns, name)}")
    if ns.batches < 0:
        raise ConfigError(f"--batches must be >= 0 (0 = one pass), got {ns.batches}")
    check_model_arguments(ns)
    return ns


@torch.no_grad()
def evaluate(model, loader, batches: int, document_mask: bool, device) -> dict[str, float]:
    """The summed cross-entropy over the target tokens of `batches` batches of `loader`, their count,
    and the loss, perplexity and throughput (input tokens per second) that follow."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    targets = 0
    start = time.perf_counter()
    with progress(batches, "evaluating", unit="batch") as bar:
        for _ in range(batches):
            batch = loader.next_batch_with_info()
            inputs, labels = batch.inputs.to(device), batch.labels.to(device)
            packing = (
                {"positions": batch.position_ids.to(device), "document_ids": batch.document_ids}
                if document_mask
                else {}
            )
            hidden = model(inputs, return_hidden=True, **packing)
            loss_sum += cross_entropy_from_hidden(hidden, model.lm_head, labels).double()
            targets += int((labels != -100).sum())
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss_sum) / max(targets, 1):.4f}", refresh=False)
    seconds = time.perf_counter() - start
    loss = float(loss_sum) / targets if targets else math.nan
    rows = batches * loader.local_batch_size
    return {
        "loss": loss,
        "ppl": math.exp(loss) if loss < 700 else math.inf,
        "target_tokens": targets,
        "sequences": rows,
        "tokens_per_s": rows * inputs.shape[1] / seconds,
        "seconds": seconds,
    }


def run(argv: list[str] | None = None) -> dict:
    ns = _checked_args(argv)
    tokenizer = build_tokenizer(ns.tokenizer or ns.hf, "--tokenizer" if ns.tokenizer else "--hf")
    data = DataSection(
        format=ns.format,
        path=ns.data,
        text_key=ns.text_key,
        split=ns.split,
        tokenizer=ns.tokenizer or ns.hf,
        add_bos=ns.add_bos,
        add_eos=not ns.no_eos,
        shuffle=False,
        messages_key=ns.messages_key,
        document_mask=ns.document_mask,
    )
    loader = build_dataloader(data, tokenizer, ns.seq_len, ns.batch_size, seed=ns.seed, keys=CommandLineKeys())
    batches = ns.batches or loader.sequences_per_epoch // ns.batch_size
    if batches < 1:
        raise ConfigError(
            f"{ns.data} holds {loader.sequences_per_epoch} sequences of --seq-len {ns.seq_len}, fewer "
            f"than one batch of --batch-size {ns.batch_size}: lower either"
        )
    model = load_model(ns)
    if ns.seq_len > model.args.max_position_embeddings:
        raise ConfigError(
            f"--seq-len {ns.seq_len} exceeds the model's max_position_embeddings ({model.args.max_position_embeddings})"
        )
    check_token_ids(loader.store, model.args.vocab_size, "data")
    print(f"evaluating {batches} batches of {ns.batch_size} x {ns.seq_len} tokens", file=sys.stderr, flush=True)
    result = evaluate(model, loader, batches, ns.document_mask or ns.format == "chat", ns.device)
    return {
        **result,
        "batches": batches,
        "seq_len": ns.seq_len,
        "data": ns.data,
        "model": ns.hf or ns.dcp,
        **({"adapter": ns.adapter} if ns.adapter else {}),
    }


def main(argv: list[str] | None = None) -> int:
    return exit_on_user_error(lambda: print(json.dumps(run(argv)), flush=True))


if __name__ == "__main__":
    sys.exit(main())
