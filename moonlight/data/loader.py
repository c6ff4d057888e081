"""Pretraining data: read documents, tokenize, pack, shard across data-parallel ranks.

    loader = build_dataloader(cfg.data, tokenizer, seq_len, local_batch_size, dp_rank, dp_world, seed)
    inputs, labels = loader.next_batch()            # [B, S] int64 each
    batch = loader.next_batch_with_info()           # + positions and document ids [B, S]
    state = loader.state_dict(); loader.load_state_dict(state)

Sources (data.format): jsonl, hf (local datasets), megatron (.bin/.idx), chat. Documents are
packed across sequence boundaries; step k covers the same global sequences whatever the world
size, so a resumed run continues with the same batches. Details: docs/data.md.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import numpy as np
import torch

from moonlight.errors import DataError, failing
from moonlight.data.chat import load_chat_template, messages_problem
from moonlight.data.documents import (
    DATA_KEYS,
    BadLines,
    ChatStore,
    DataKeys,
    DocumentStore,
    expand_paths,
    expand_paths_or_none,
    is_saved_dataset,
    read_hf,
    read_jsonl,
    tokenize_conversations,
    tokenize_texts,
)
from moonlight.data.megatron import load_megatron

logger = logging.getLogger(__name__)

FORMATS = ("jsonl", "hf", "megatron", "chat")  # data.format: what `load_documents` reads


@dataclass
class DataSection:
    """The [data] section: the training data, read by `build_dataloader`."""

    format: Literal[FORMATS] = "jsonl"
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
        return failing(
            [
                (bool(self.path), "data.path must not be empty"),
                (
                    self.format == "hf" or self.split == "train",
                    f"data.split = {self.split!r} applies to data.format = 'hf' only (a {self.format} dataset "
                    "has no splits): leave it at 'train'",
                ),
                (bool(self.text_key), "data.text_key must not be empty"),
                (bool(self.tokenizer), "data.tokenizer must not be empty"),
                (
                    self.format != "chat" or bool(self.messages_key),
                    "data.messages_key must not be empty (the conversation field)",
                ),
            ]
        )

    def masks_documents(self) -> bool:
        """Whether packed documents see only themselves (document_mask; always for chat)."""
        return self.document_mask or self.format == "chat"


def load_documents(cfg_data: Any, tokenizer: Any, keys: DataKeys = DATA_KEYS) -> DocumentStore:
    """Read and tokenize every document of cfg_data (a DataSection or anything with format,
    path, text_key, on_bad_line and optionally split; chat: messages_key, tokenizer, and a jsonl
    or hf path given by chat_source). Errors name the settings as `keys` does."""
    fmt = cfg_data.format
    bad = BadLines(cfg_data.on_bad_line, keys)
    if fmt == "chat":
        template = load_chat_template(cfg_data.tokenizer, tokenizer)
        key = cfg_data.messages_key
        # jsonl files are read line by line (errors name the line), anything else as an HF dataset
        files = [] if is_saved_dataset(os.path.expanduser(cfg_data.path)) else expand_paths_or_none(cfg_data.path)
        if files:
            rows = read_jsonl(files, key, bad=bad, problem=messages_problem, keys=keys, field_key="messages_key")
        else:
            rows = read_hf(
                cfg_data.path,
                key,
                getattr(cfg_data, "split", "train"),
                bad=bad,
                problem=messages_problem,
                keys=keys,
                field_key="messages_key",
            )
        store = tokenize_conversations(rows, template, cfg_data.path, bad)
    elif fmt == "jsonl":
        files = expand_paths(cfg_data.path, (".jsonl", ".jsonl.gz"), "jsonl", keys)
        store = tokenize_texts(read_jsonl(files, cfg_data.text_key, bad=bad, keys=keys), tokenizer, cfg_data.path, bad)
    elif fmt == "hf":
        texts = read_hf(cfg_data.path, cfg_data.text_key, getattr(cfg_data, "split", "train"), bad=bad, keys=keys)
        store = tokenize_texts(texts, tokenizer, cfg_data.path, bad)
    elif fmt == "megatron":
        store = load_megatron(cfg_data.path, keys, tokenizer)
    else:
        raise DataError(
            f"{keys('format')} must be {', '.join(map(repr, FORMATS[:-1]))} or {FORMATS[-1]!r}, got {fmt!r}"
        )
    if store.num_bad_lines:
        first = store.bad_lines[0] if store.bad_lines else ""
        logger.warning(
            "data: skipped %d malformed record(s) in %s (first: %s)", store.num_bad_lines, cfg_data.path, first
        )
    return store


# ============================================================== packing + loader


@dataclass
class Batch:
    inputs: torch.Tensor  # [B, S] int64
    labels: torch.Tensor  # [B, S] int64
    position_ids: torch.Tensor  # [B, S] int64; 0 at every document start and at the sequence start
    global_indices: list[int]  # the global sequence numbers in this batch

    @property
    def document_ids(self) -> torch.Tensor:
        """[B, S] int64: which document of its row each token belongs to (a new one at every position 0)."""
        return (self.position_ids == 0).cumsum(1)

    def cu_seqlens(self, row: int) -> torch.Tensor:
        """Cumulative document lengths within inputs[row] (flash-attn varlen style)."""
        starts = torch.nonzero(self.position_ids[row] == 0).flatten()
        return torch.cat([starts, torch.tensor([self.position_ids.shape[1]])]).to(torch.int32)


class PackedDataLoader:
    """Deterministic packed-sequence loader for one data-parallel rank (see module docstring)."""

    def __init__(
        self,
        store: DocumentStore,
        seq_len: int,
        local_batch_size: int,
        dp_rank: int = 0,
        dp_world: int = 1,
        seed: int = 0,
        bos_id: int | None = None,
        eos_id: int | None = None,
        shuffle: bool = True,
        keys: DataKeys = DATA_KEYS,
    ) -> None:
        self._init_sharding(store, seq_len, local_batch_size, dp_rank, dp_world, seed, shuffle)
        self.bos_id = bos_id
        self.eos_id = eos_id
        self._add_bos = int(bos_id is not None)
        self._add_eos = int(eos_id is not None)
        self._eff_lengths = store.lengths + self._add_bos + self._add_eos
        total = int(self._eff_lengths.sum())
        self.tokens_per_epoch = total
        self.sequences_per_epoch = max((total - 1) // seq_len, 0) if total else 0
        if self.sequences_per_epoch < 1:
            skipped = (
                f" ({store.num_bad_lines} malformed record(s) skipped, first: {store.bad_lines[0]})"
                if store.num_bad_lines and store.bad_lines
                else ""
            )
            raise DataError(
                f"{keys('path')} {store.source!r}: {total} tokens in {store.num_documents} documents are fewer than "
                f"one sequence of seq_len + 1 = {seq_len + 1} tokens{skipped}"
            )
        self._epoch_cache: tuple[int, np.ndarray, np.ndarray] | None = None

    def _init_sharding(
        self,
        store: DocumentStore,
        seq_len: int,
        local_batch_size: int,
        dp_rank: int,
        dp_world: int,
        seed: int,
        shuffle: bool,
    ) -> None:
        if seq_len < 1 or local_batch_size < 1:
            raise ValueError(f"seq_len and local_batch_size must be >= 1 (got {seq_len}, {local_batch_size})")
        if not 0 <= dp_rank < dp_world:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, {dp_world})")
        self.store = store
        self.seq_len = seq_len
        self.local_batch_size = local_batch_size
        self.dp_rank = dp_rank
        self.dp_world = dp_world
        self.seed = seed
        self.shuffle = shuffle
        self.consumed = 0  # global sequences consumed by all ranks together

    # ---------------------------------------------------------------- info
    @property
    def epoch(self) -> int:
        """Epoch of the next sequence to be read."""
        return self.consumed // self.sequences_per_epoch

    @property
    def num_bad_lines(self) -> int:
        return self.store.num_bad_lines

    @property
    def bad_lines(self) -> list[str]:
        return list(self.store.bad_lines or [])

    @property
    def num_documents(self) -> int:
        return self.store.num_documents

    # ---------------------------------------------------------------- packing
    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            d = self.store.num_documents
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(d)
            else:
                order = np.arange(d)
            cum = np.concatenate([[0], np.cumsum(self._eff_lengths[order])])
            self._epoch_cache = (epoch, order, cum)
        return self._epoch_cache[1], self._epoch_cache[2]

    def _doc_slice(self, j: int, lo: int, hi: int) -> list[np.ndarray]:
        """Tokens [lo, hi) of document j with its bos/eos."""
        parts: list[np.ndarray] = []
        n = int(self.store.lengths[j])
        if self._add_bos and lo == 0:
            parts.append(np.array([self.bos_id], dtype=np.int64))
        b_lo, b_hi = max(lo - self._add_bos, 0), min(hi - self._add_bos, n)
        if b_hi > b_lo:
            parts.append(self.store.document(j)[b_lo:b_hi].astype(np.int64))
        if self._add_eos and hi == n + self._add_bos + 1:
            parts.append(np.array([self.eos_id], dtype=np.int64))
        return parts

    def sequence(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        """Global sequence g: (window of seq_len + 1 tokens, position ids of the window)."""
        epoch, i = divmod(g, self.sequences_per_epoch)
        order, cum = self._epoch_order(epoch)
        a, b = i * self.seq_len, i * self.seq_len + self.seq_len + 1
        k = int(np.searchsorted(cum, a, side="right")) - 1
        parts: list[np.ndarray] = []
        pos: list[np.ndarray] = []
        p = a
        while p < b:
            j = int(order[k])
            d0, d1 = int(cum[k]), int(cum[k + 1])
            hi = min(b, d1)
            piece = self._doc_slice(j, p - d0, hi - d0)
            parts.extend(piece)
            pos.append(np.arange(hi - p, dtype=np.int64))
            p = hi
            k += 1
        window = np.concatenate(parts)
        assert window.shape[0] == self.seq_len + 1, (window.shape, self.seq_len)
        return window, np.concatenate(pos)

    def row(self, g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Global sequence g as (inputs, labels, position ids), seq_len each."""
        window, positions = self.sequence(g)
        return window[:-1], window[1:], positions[:-1]

    # ---------------------------------------------------------------- batches
    def next_batch_with_info(self) -> Batch:
        B = self.local_batch_size
        base = self.consumed + self.dp_rank * B
        idx = list(range(base, base + B))
        inputs, labels, positions = (torch.from_numpy(np.stack(parts)) for parts in zip(*(self.row(g) for g in idx)))
        self.consumed += B * self.dp_world
        return Batch(inputs=inputs, labels=labels, position_ids=positions, global_indices=idx)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.next_batch_with_info()
        return b.inputs, b.labels

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, int]:
        return {
            "consumed_sequences": int(self.consumed),
            "epoch": int(self.epoch),
            "seq_len": int(self.seq_len),
            "seed": int(self.seed),
            "shuffle": int(self.shuffle),
            "num_documents": int(self.store.num_documents),
            "tokens_per_epoch": int(self.tokens_per_epoch),
            "fingerprint": int(self.store.fingerprint()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = {k: (int(v.item()) if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
        if int(state["seq_len"]) != self.seq_len:
            raise DataError(f"data state was saved with seq_len {state['seq_len']}, this run uses {self.seq_len}")
        mismatch = [
            k
            for k, mine in (
                ("seed", self.seed),
                ("shuffle", int(self.shuffle)),
                ("num_documents", self.store.num_documents),
                ("tokens_per_epoch", self.tokens_per_epoch),
                ("fingerprint", self.store.fingerprint()),
            )
            if k in state and int(state[k]) != int(mine)
        ]
        if mismatch:
            logger.warning(
                "data: resuming with a different corpus or ordering (%s differ); the batches will "
                "not match the original run",
                ", ".join(mismatch),
            )
        self.consumed = int(state["consumed_sequences"])


class ChatDataLoader(PackedDataLoader):
    """Conversations packed whole into rows of seq_len + 1 tokens: a conversation never straddles
    two rows, the rest of a row is padding (label -100, its own document). Labels are -100 except
    where the next token is a target (assistant content and its end-of-turn marker). Position ids
    restart at every conversation, so `Batch.document_ids` separates them.

    The rows are packed once (greedily, in a seeded order of the conversations) and each epoch
    visits them in a seeded order; sharding, batches and state are those of PackedDataLoader.
    Conversations longer than seq_len + 1 tokens are truncated to their first seq_len + 1 tokens
    (overflow="truncate") or left out (overflow="drop"); the counts are logged once."""

    def __init__(
        self,
        store: ChatStore,
        seq_len: int,
        local_batch_size: int,
        dp_rank: int = 0,
        dp_world: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        overflow: str = "truncate",
        pad_id: int = 0,
        keys: DataKeys = DATA_KEYS,
    ) -> None:
        self._init_sharding(store, seq_len, local_batch_size, dp_rank, dp_world, seed, shuffle)
        if overflow not in ("truncate", "drop"):
            raise DataError(f"{keys('chat_overflow')} must be 'truncate' or 'drop', got {overflow!r}")
        capacity = seq_len + 1
        too_long = store.lengths > capacity
        kept = np.flatnonzero(~too_long) if overflow == "drop" else np.arange(store.num_documents)
        self._lengths = np.minimum(store.lengths, capacity)
        self.num_truncated = int(too_long.sum()) if overflow == "truncate" else 0
        self.num_dropped = int(too_long.sum()) if overflow == "drop" else 0
        self.pad_id = pad_id
        order = np.random.default_rng(seed).permutation(kept) if shuffle else kept
        self.rows: list[list[int]] = []
        used = capacity
        for j in order.tolist():
            n = int(self._lengths[j])
            if used + n > capacity:
                self.rows.append([])
                used = 0
            self.rows[-1].append(j)
            used += n
        self.sequences_per_epoch = len(self.rows)
        self.tokens_per_epoch = int(self._lengths[kept].sum())
        if not store.num_documents:
            raise DataError(
                f"{keys('path')} {store.source!r}: no conversations to train on (it is empty, or every "
                f"record was skipped as malformed: see the warnings above, and {keys('messages_key')})"
            )
        if not self.rows:
            raise DataError(
                f"{keys('path')} {store.source!r}: no conversation fits in seq_len + 1 = {capacity} tokens "
                f'(raise training.seq_len or set {keys("chat_overflow")} = "truncate")'
            )
        logger.log(
            logging.WARNING if too_long.any() else logging.INFO,
            "data: %d conversations packed into %d rows of %d tokens; %d longer than that %s",
            len(kept),
            len(self.rows),
            capacity,
            int(too_long.sum()),
            "were truncated" if overflow == "truncate" else "were dropped",
        )
        self._order_cache: tuple[int, np.ndarray] | None = None

    def _row_order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            n = len(self.rows)
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def window(self, g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Global sequence g: (seq_len + 1 tokens, their target flags, their position ids)."""
        epoch, i = divmod(g, self.sequences_per_epoch)
        tokens, targets, positions = [], [], []
        for j in self.rows[int(self._row_order(epoch)[i])]:
            n = int(self._lengths[j])
            tokens.append(self.store.document(j)[:n].astype(np.int64))
            targets.append(self.store.document_targets(j)[:n])
            positions.append(np.arange(n, dtype=np.int64))
        pad = self.seq_len + 1 - sum(len(t) for t in tokens)
        tokens.append(np.full(pad, self.pad_id, dtype=np.int64))
        targets.append(np.zeros(pad, dtype=bool))
        positions.append(np.arange(pad, dtype=np.int64))
        return np.concatenate(tokens), np.concatenate(targets), np.concatenate(positions)

    def sequence(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        tokens, _, positions = self.window(g)
        return tokens, positions

    def row(self, g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        tokens, targets, positions = self.window(g)
        return tokens[:-1], np.where(targets[1:], tokens[1:], -100), positions[:-1]


def _end_with(store: DocumentStore, token: int, sample: int = 1000) -> bool:
    """Whether (the first `sample` of) the documents all end with `token`."""
    n = min(store.num_documents, sample)
    return n > 0 and all(int(store.document(j)[-1]) == token for j in range(n))


def build_dataloader(
    cfg_data: Any,
    tokenizer: Any,
    seq_len: int,
    local_batch_size: int,
    dp_rank: int = 0,
    dp_world: int = 1,
    seed: int = 0,
    store: DocumentStore | None = None,
    keys: DataKeys = DATA_KEYS,
) -> PackedDataLoader:
    """The loader for one data-parallel rank. cfg_data: a `DataSection` (format, path,
    text_key, split, on_bad_line, add_bos, add_eos, shuffle; chat: messages_key, chat_overflow,
    tokenizer). Pass `store` to reuse documents already loaded (e.g. the same corpus for several
    ranks in one process). Chat rows are padded with the tokenizer's eos id (label -100). Errors
    name the settings as `keys` does ([data]'s by default)."""
    chat = cfg_data.format == "chat"
    add_bos = bool(getattr(cfg_data, "add_bos", False)) and not chat
    add_eos = bool(getattr(cfg_data, "add_eos", True)) and not chat
    if add_bos and tokenizer.bos_id is None:
        raise DataError(
            f"{keys('add_bos')} = true but the tokenizer has no bos token: set {keys('add_bos')} = false, "
            "or name bos_token in the tokenizer's tokenizer_config.json"
        )
    if add_eos and tokenizer.eos_id is None:
        raise DataError(
            f"{keys('add_eos')} = true but the tokenizer has no eos token: set {keys('add_eos')} = false, "
            "or name eos_token in the tokenizer's tokenizer_config.json"
        )
    if store is None:
        store = load_documents(cfg_data, tokenizer, keys)
    if add_eos and _end_with(store, tokenizer.eos_id):
        logger.warning(
            "data: the documents of %s already end with the eos token (prepare_data --append-eos?) and "
            "%s = true adds another to each: set it to false",
            store.source,
            keys("add_eos"),
        )
    if cfg_data.format == "chat":  # the chat template decides the special tokens
        return ChatDataLoader(
            store,
            seq_len=seq_len,
            local_batch_size=local_batch_size,
            dp_rank=dp_rank,
            dp_world=dp_world,
            seed=seed,
            shuffle=bool(getattr(cfg_data, "shuffle", True)),
            overflow=cfg_data.chat_overflow,
            pad_id=tokenizer.eos_id if tokenizer.eos_id is not None else 0,
            keys=keys,
        )
    return PackedDataLoader(
        store,
        seq_len=seq_len,
        local_batch_size=local_batch_size,
        dp_rank=dp_rank,
        dp_world=dp_world,
        seed=seed,
        bos_id=tokenizer.bos_id if add_bos else None,
        eos_id=tokenizer.eos_id if add_eos else None,
        shuffle=bool(getattr(cfg_data, "shuffle", True)),
        keys=keys,
    )
