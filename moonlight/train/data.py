"""Pretraining data: read documents, tokenise, pack, shard across data-parallel ranks.

    tok = build_tokenizer(cfg.data.tokenizer)
    loader = build_dataloader(cfg.data, tok, seq_len, local_batch_size, dp_rank, dp_world, seed)
    inputs, labels = loader.next_batch()            # [B, S] int64 each
    batch = loader.next_batch_with_info()           # + position_ids [B, S] (restart per document)
    batch.document_ids                              # [B, S]: which packed document each token is in
    state = loader.state_dict(); loader.load_state_dict(state)

Sources (data.format):
  jsonl     one JSON object per line with a string field data.text_key; data.path is a file,
            a directory (every *.jsonl / *.jsonl.gz in it, sorted) or a glob. Malformed lines
            are reported as "path:line: reason"; data.on_bad_line = "skip" counts and skips
            them (loader.num_bad_lines, logged as a warning), "error" raises BadLineError.
  hf        local HF `datasets`: a save_to_disk directory (load_from_disk; a DatasetDict uses
            data.split) or json/jsonl/parquet/arrow/csv file(s)/directory/glob (load_dataset
            with a packaged builder). Never touches the hub.
  megatron  Megatron-LM MMIDIDX indexed files <prefix>.bin/.idx (data.path = the prefix, either
            file, a directory of *.idx or a glob); each Megatron document is one document.
  chat      conversations: field data.messages_key of jsonl lines (as jsonl) or an HF dataset column
            (as hf), a list of {role, content} with roles system/user/assistant; rendered by
            moonlight.train.chat (the tokenizer's chat template, else the Moonlight format) and
            packed by ChatDataLoader: whole conversations per row, labels -100 except assistant
            turns, too long ones truncated or dropped (data.chat_overflow).

Packing. Every document becomes [bos]? + tokens + [eos]? (data.add_bos / data.add_eos; empty
documents are dropped). Each epoch the documents are ordered (a seeded permutation per epoch when
data.shuffle, else file order) and concatenated into one stream; sequence i of the epoch is the
window stream[i*S : i*S + S + 1] (inputs = window[:-1], labels = window[1:]), so every token is
predicted once and documents are packed across sequence boundaries. The remainder that does not
fill a window is dropped; then the next epoch starts.

Sharding. Sequences are numbered globally g = 0, 1, 2, ... (epoch = g // sequences_per_epoch).
Each next_batch() call on every rank consumes the next local_batch_size * dp_world global
sequences; rank r takes the r-th contiguous block of local_batch_size of them. So with
global_batch = local_batch * dp_world * grad_accum, optimizer step k covers exactly the global
sequences [k * global_batch, (k + 1) * global_batch) whatever the decomposition: a 1-rank run and
a 2-rank run see the same global batch per step. The state is the number of global sequences
consumed, so a resumed run (even with another world size) continues with the same batches.
"""

from __future__ import annotations

import glob as _glob
import gzip
import json
import logging
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from moonlight.errors import DataError
from moonlight.train.chat import load_chat_template, messages_problem
from moonlight.train.tokenizer import ByteTokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "BadLineError",
    "DocumentStore",
    "PackedDataLoader",
    "ChatDataLoader",
    "ChatStore",
    "Batch",
    "build_dataloader",
    "load_documents",
    "read_jsonl",
    "MegatronIndexedDataset",
    "MegatronIndexedWriter",
    "build_megatron_from_jsonl",
]

MAX_REPORTED_BAD_LINES = 100
_ENCODE_CHUNK = 1024


class BadLineError(DataError):
    """A malformed input record; the message starts with "path:line:"."""


# ============================================================== documents


@dataclass
class DocumentStore:
    """Token documents: doc j is tokens[file_ids[j]][starts[j] : starts[j] + lengths[j]]
    (special tokens are not included; they are added while packing)."""

    tokens: list[np.ndarray]
    file_ids: np.ndarray  # int32 [D]
    starts: np.ndarray  # int64 [D]
    lengths: np.ndarray  # int64 [D], all > 0
    num_bad_lines: int = 0
    bad_lines: list[str] | None = None
    source: str = ""

    @property
    def num_documents(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def document(self, j: int) -> np.ndarray:
        a = int(self.starts[j])
        return self.tokens[int(self.file_ids[j])][a : a + int(self.lengths[j])]

    def fingerprint(self) -> int:
        return zlib.crc32(self.lengths.astype(np.int64).tobytes())


def _expand(path: str, exts: tuple[str, ...], what: str) -> list[str]:
    """A file, a directory (files with one of exts, sorted, recursively) or a glob."""
    path = os.path.expanduser(path)
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        files = sorted(
            os.path.join(root, f)
            for root, _, fs in os.walk(path)
            for f in fs
            if f.endswith(exts)
        )
    else:
        files = sorted(f for f in _glob.glob(path, recursive=True) if os.path.isfile(f))
    if not files:
        raise DataError(f"data.path {path!r}: no {what} files found (looked for {', '.join(exts)})")
    return files


def _expand_or_none(path: str) -> list[str]:
    """The jsonl files at path, or [] when there are none (then it is read as an HF dataset)."""
    try:
        return _expand(path, (".jsonl", ".jsonl.gz"), "jsonl")
    except FileNotFoundError:
        return []


class _BadLines:
    def __init__(self, on_bad_line: str) -> None:
        if on_bad_line not in ("skip", "error"):
            raise DataError(f"data.on_bad_line must be 'skip' or 'error', got {on_bad_line!r}")
        self.mode = on_bad_line
        self.count = 0
        self.reported: list[str] = []

    def __call__(self, where: str, reason: str) -> None:
        msg = f"{where}: {reason}"
        if self.mode == "error":
            raise BadLineError(msg + " (set data.on_bad_line = \"skip\" to skip malformed records)")
        self.count += 1
        if len(self.reported) < MAX_REPORTED_BAD_LINES:
            self.reported.append(msg)
        if self.count <= 5:
            logger.warning("data: skipping malformed record %s", msg)


def _text_problem(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"is {type(value).__name__}, not a string"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # a JSON escape of a lone surrogate, e.g. "\ud800"
        return f"is not valid Unicode ({e.reason} at {e.start})"
    return None


def read_jsonl(
    paths: Sequence[str], text_key: str = "text", on_bad_line: str = "skip", bad: _BadLines | None = None,
    problem: Callable[[Any], str | None] = _text_problem,
) -> Iterator[Any]:
    """Yield field text_key of every well-formed line (`problem(value)` says why a value is not
    usable, default: not a valid string); blank lines are ignored silently."""
    bad = bad or _BadLines(on_bad_line)
    for path in paths:
        for lineno, raw in _numbered_lines(path):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(raw.rstrip(b"\r\n"))
            except UnicodeDecodeError as e:
                bad(where, f"invalid UTF-8 ({e.reason})")
                continue
            except json.JSONDecodeError as e:
                bad(where, f"invalid JSON: {e.msg} (column {e.colno})")
                continue
            if not isinstance(obj, dict):
                bad(where, f"expected a JSON object, got {type(obj).__name__}")
                continue
            if text_key not in obj:
                keys = ", ".join(list(obj)[:10])
                bad(where, f"missing text field {text_key!r} (keys: {keys})")
                continue
            value = obj[text_key]
            reason = problem(value)
            if reason:
                bad(where, f"field {text_key!r} {reason}")
                continue
            yield value


def _numbered_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) of a text or .gz file; a truncated or corrupt .gz is a DataError
    naming the file and the line it stopped after."""
    opener = gzip.open if path.endswith(".gz") else open
    lineno = 0
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                yield lineno, raw
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: corrupt or truncated gzip file after line {lineno} "
                        f"({type(e).__name__}: {e})") from None


_HF_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".arrow": "arrow", ".csv": "csv"}


def _is_saved_dataset(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, f)) for f in ("dataset_info.json", "state.json", "dataset_dict.json")
    )


def read_hf(path: str, text_key: str = "text", split: str = "train", on_bad_line: str = "skip",
            bad: _BadLines | None = None, problem: Callable[[Any], str | None] = _text_problem) -> Iterator[Any]:
    """Texts of a local HF dataset (save_to_disk directory, or data files). Offline only."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    bad = bad or _BadLines(on_bad_line)
    path = os.path.expanduser(path)
    if _is_saved_dataset(path):
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"data.path {path!r} has splits {list(ds)}, not data.split={split!r}")
            ds = ds[split]
        elif split != "train":  # a single dataset has no splits: the setting would be silently ignored
            raise DataError(f"data.path {path!r} is a single dataset without splits; data.split={split!r} cannot "
                            "apply (leave it at 'train', or save a DatasetDict)")
        where0 = path
    else:
        files = _expand(path, tuple(_HF_BUILDERS), "dataset")
        builders = {_HF_BUILDERS[os.path.splitext(f)[1]] for f in files if os.path.splitext(f)[1] in _HF_BUILDERS}
        if len(builders) != 1:
            raise DataError(f"data.path {path!r}: expected files of one kind ({', '.join(_HF_BUILDERS)}), got {files[:5]}")
        if split != "train":
            raise DataError(f"data.path {path!r}: data files form one dataset without splits; data.split={split!r} "
                            "cannot apply (leave it at 'train', or point data.path at that split's files)")
        ds = datasets.load_dataset(builders.pop(), data_files=files, split="train")
        where0 = path
    if text_key not in ds.column_names:
        raise DataError(f"data.path {path!r}: no column data.text_key={text_key!r} (columns: {ds.column_names})")
    row = 0
    for chunk in ds.select_columns([text_key]).iter(batch_size=_ENCODE_CHUNK):
        for text in chunk[text_key]:
            row += 1
            reason = problem(text)
            if reason:
                bad(f"{where0}:row {row}", f"field {text_key!r}: {reason}")
                continue
            yield text


def _tokenize_texts(texts: Iterable[str], tokenizer: Any, source: str, bad: _BadLines) -> DocumentStore:
    byte_fast = isinstance(tokenizer, ByteTokenizer)
    arrays: list[np.ndarray] = []
    batch: list[str] = []

    def flush() -> None:
        if byte_fast:
            arrays.extend(np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int32) for t in batch)
        else:
            arrays.extend(np.asarray(ids, dtype=np.int32) for ids in tokenizer.encode_batch(batch))
        batch.clear()

    for t in texts:
        batch.append(t)
        if len(batch) >= _ENCODE_CHUNK:
            flush()
    flush()
    lengths = np.fromiter((a.shape[0] for a in arrays), dtype=np.int64, count=len(arrays))
    keep = lengths > 0
    tokens = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int32)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if arrays else np.zeros(0, np.int64)
    return DocumentStore(
        tokens=[tokens],
        file_ids=np.zeros(int(keep.sum()), dtype=np.int32),
        starts=starts[keep],
        lengths=lengths[keep],
        num_bad_lines=bad.count,
        bad_lines=bad.reported,
        source=source,
    )


@dataclass
class ChatStore(DocumentStore):
    """Tokenised conversations (one document each) and, laid out like `tokens`, whether each token
    is a training target (assistant content and its end-of-turn marker)."""

    targets: list[np.ndarray] | None = None  # bool, parallel to tokens

    def document_targets(self, j: int) -> np.ndarray:
        a = int(self.starts[j])
        return self.targets[int(self.file_ids[j])][a : a + int(self.lengths[j])]


def _tokenize_conversations(conversations: Iterable[list], template: Any, source: str, bad: _BadLines) -> ChatStore:
    arrays, flags = [], []
    for messages in conversations:
        ids, targets = template.encode(messages)
        arrays.append(np.asarray(ids, dtype=np.int32))
        flags.append(np.asarray(targets, dtype=bool))
    lengths = np.fromiter((a.shape[0] for a in arrays), dtype=np.int64, count=len(arrays))
    return ChatStore(
        tokens=[np.concatenate(arrays) if arrays else np.zeros(0, np.int32)],
        file_ids=np.zeros(len(arrays), dtype=np.int32),
        starts=np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if arrays else np.zeros(0, np.int64),
        lengths=lengths,
        num_bad_lines=bad.count,
        bad_lines=bad.reported,
        source=source,
        targets=[np.concatenate(flags) if flags else np.zeros(0, bool)],
    )


def load_documents(cfg_data: Any, tokenizer: Any) -> DocumentStore:
    """Read and tokenise every document of cfg_data (a DataSection or anything with format,
    path, text_key, on_bad_line and optionally split; chat: messages_key, tokenizer, and a jsonl
    or hf path given by chat_source)."""
    fmt = cfg_data.format
    bad = _BadLines(cfg_data.on_bad_line)
    if fmt == "chat":
        template = load_chat_template(cfg_data.tokenizer, tokenizer)
        key = cfg_data.messages_key
        # jsonl files are read line by line (errors name the line), anything else as an HF dataset
        files = [] if _is_saved_dataset(os.path.expanduser(cfg_data.path)) else _expand_or_none(cfg_data.path)
        if files:
            rows = read_jsonl(files, key, bad=bad, problem=messages_problem)
        else:
            rows = read_hf(cfg_data.path, key, getattr(cfg_data, "split", "train"), bad=bad, problem=messages_problem)
        store = _tokenize_conversations(rows, template, cfg_data.path, bad)
    elif fmt == "jsonl":
        files = _expand(cfg_data.path, (".jsonl", ".jsonl.gz"), "jsonl")
        store = _tokenize_texts(read_jsonl(files, cfg_data.text_key, bad=bad), tokenizer, cfg_data.path, bad)
    elif fmt == "hf":
        texts = read_hf(cfg_data.path, cfg_data.text_key, getattr(cfg_data, "split", "train"), bad=bad)
        store = _tokenize_texts(texts, tokenizer, cfg_data.path, bad)
    elif fmt == "megatron":
        store = _load_megatron(cfg_data.path)
    else:
        raise DataError(f"data.format must be 'jsonl', 'hf', 'megatron' or 'chat', got {fmt!r}")
    if store.num_bad_lines:
        first = store.bad_lines[0] if store.bad_lines else ""
        logger.warning(
            "data: skipped %d malformed record(s) in %s (first: %s)", store.num_bad_lines, cfg_data.path, first
        )
    return store


# ============================================================== Megatron indexed format

_MMIDIDX_MAGIC = b"MMIDIDX\x00\x00"
_DTYPE_CODES = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
_CODE_OF_DTYPE = {np.dtype(v): k for k, v in _DTYPE_CODES.items()}


def _megatron_prefix(path: str) -> str:
    for ext in (".bin", ".idx"):
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


class MegatronIndexedDataset:
    """Reader of Megatron-LM's MMapIndexedDataset (<prefix>.idx + <prefix>.bin).

    .idx layout (little endian): magic b"MMIDIDX\\x00\\x00", version u64 (=1), dtype code u8,
    sequence count u64, document count u64, then int32 sequence lengths, int64 sequence byte
    pointers into .bin, int64 document indices (sequence index where each document starts, with
    a leading 0 and a trailing sequence count)."""

    def __init__(self, prefix: str) -> None:
        prefix = _megatron_prefix(prefix)
        self.prefix = prefix
        idx_path, bin_path = prefix + ".idx", prefix + ".bin"
        header = 9 + 8 + 1 + 8 + 8
        if not os.path.isfile(idx_path) or not os.path.isfile(bin_path):
            raise DataError(f"{prefix}: Megatron data needs both {idx_path} and {bin_path}")
        if os.path.getsize(idx_path) < header:
            raise DataError(f"{idx_path}: truncated Megatron index ({os.path.getsize(idx_path)} bytes, "
                            f"the header alone is {header})")
        with open(idx_path, "rb") as f:
            magic = f.read(9)
            if magic != _MMIDIDX_MAGIC:
                raise DataError(f"{idx_path}: not a Megatron MMIDIDX index (magic {magic!r})")
            (version,) = struct.unpack("<Q", f.read(8))
            if version != 1:
                raise DataError(f"{idx_path}: unsupported index version {version}")
            (code,) = struct.unpack("<B", f.read(1))
            if code not in _DTYPE_CODES:
                raise DataError(f"{idx_path}: unknown dtype code {code}")
            self.dtype = np.dtype(_DTYPE_CODES[code])
            (self.sequence_count,) = struct.unpack("<Q", f.read(8))
            (self.document_count,) = struct.unpack("<Q", f.read(8))
            offset = f.tell()
        n, d = self.sequence_count, self.document_count
        need = offset + 12 * n + 8 * d
        if os.path.getsize(idx_path) < need:
            raise DataError(f"{idx_path}: truncated Megatron index ({os.path.getsize(idx_path)} bytes, its header "
                            f"announces {n} sequences and {d} document entries = {need} bytes)")
        buf = np.memmap(idx_path, mode="r", dtype=np.uint8)
        self.sequence_lengths = np.frombuffer(buf, dtype=np.int32, count=n, offset=offset)
        offset += 4 * n
        self.sequence_pointers = np.frombuffer(buf, dtype=np.int64, count=n, offset=offset)
        offset += 8 * n
        self.document_indices = np.frombuffer(buf, dtype=np.int64, count=d, offset=offset)
        size = os.path.getsize(bin_path)
        if size % self.dtype.itemsize:
            raise DataError(f"{bin_path}: {size} bytes is not a whole number of {self.dtype} tokens "
                            "(truncated, or the .idx of another file?)")
        ends = self.sequence_pointers + self.sequence_lengths.astype(np.int64) * self.dtype.itemsize
        if n and (int(ends.max()) > size or min(self.sequence_pointers.min(), self.sequence_lengths.min()) < 0):
            raise DataError(f"{bin_path}: {size} bytes, but {idx_path} points up to byte {int(ends.max())} "
                            "(a truncated .bin, or the .idx of another file)")
        self.tokens = (
            np.memmap(bin_path, mode="r", dtype=self.dtype) if size else np.zeros(0, dtype=self.dtype)
        )

    def __len__(self) -> int:
        return self.sequence_count

    def __getitem__(self, i: int) -> np.ndarray:
        a = int(self.sequence_pointers[i]) // self.dtype.itemsize
        return self.tokens[a : a + int(self.sequence_lengths[i])]

    @property
    def num_documents(self) -> int:
        return max(self.document_count - 1, 0)

    def document(self, j: int) -> np.ndarray:
        s0, s1 = int(self.document_indices[j]), int(self.document_indices[j + 1])
        if s1 <= s0:
            return self.tokens[0:0]
        return np.concatenate([self[i] for i in range(s0, s1)])

    def document_spans(self) -> tuple[np.ndarray, np.ndarray]:
        """(token start, token length) of each document; needs contiguous sequences (as the
        Megatron writer lays them out)."""
        lengths = self.sequence_lengths.astype(np.int64)
        seq_starts = self.sequence_pointers // self.dtype.itemsize
        if self.sequence_count > 1 and not np.array_equal(seq_starts[1:], seq_starts[:-1] + lengths[:-1]):
            raise DataError(f"{self.prefix}.idx: sequences are not contiguous in the .bin file")
        di = self.document_indices
        if self.document_count < 1:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        cl = np.concatenate([[0], np.cumsum(lengths)])
        doc_lengths = cl[di[1:]] - cl[di[:-1]]
        first = np.minimum(di[:-1], max(self.sequence_count - 1, 0))
        doc_starts = seq_starts[first] if self.sequence_count else np.zeros(len(doc_lengths), np.int64)
        return doc_starts.astype(np.int64), doc_lengths.astype(np.int64)


class MegatronIndexedWriter:
    """Write <prefix>.bin/.idx in Megatron's MMIDIDX format, one sequence per document.

        with MegatronIndexedWriter("out/corpus", np.uint16) as w:
            w.add_document([1, 2, 3])
    """

    def __init__(self, prefix: str, dtype: Any = np.int32) -> None:
        self.prefix = _megatron_prefix(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF_DTYPE:
            raise DataError(f"unsupported dtype {self.dtype}")
        os.makedirs(os.path.dirname(os.path.abspath(self.prefix)), exist_ok=True)
        self._bin = open(self.prefix + ".bin", "wb")
        self._lengths: list[int] = []
        self._doc_idx: list[int] = [0]

    def add_document(self, tokens: Sequence[int] | np.ndarray) -> None:
        arr = np.asarray(tokens)
        if arr.size and self.dtype.kind in "iu":
            info = np.iinfo(self.dtype)
            if arr.min() < info.min or arr.max() > info.max:
                raise DataError(f"token ids out of range for {self.dtype}")
        self._bin.write(arr.astype(self.dtype, copy=False).tobytes(order="C"))
        self._lengths.append(int(arr.size))
        self._doc_idx.append(len(self._lengths))

    def finalize(self) -> None:
        if self._bin.closed:
            return
        self._bin.close()
        lengths = np.asarray(self._lengths, dtype=np.int32)
        pointers = np.concatenate([[0], np.cumsum(lengths.astype(np.int64))[:-1]]) * self.dtype.itemsize \
            if len(lengths) else np.zeros(0, np.int64)
        with open(self.prefix + ".idx", "wb") as f:
            f.write(_MMIDIDX_MAGIC)
            f.write(struct.pack("<Q", 1))
            f.write(struct.pack("<B", _CODE_OF_DTYPE[self.dtype]))
            f.write(struct.pack("<Q", len(lengths)))
            f.write(struct.pack("<Q", len(self._doc_idx)))
            f.write(lengths.tobytes(order="C"))
            f.write(np.asarray(pointers, dtype=np.int64).tobytes(order="C"))
            f.write(np.asarray(self._doc_idx, dtype=np.int64).tobytes(order="C"))

    def __enter__(self) -> "MegatronIndexedWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.finalize()


def build_megatron_from_jsonl(
    jsonl_path: str,
    out_prefix: str,
    tokenizer: Any,
    text_key: str = "text",
    append_eos: bool = False,
    on_bad_line: str = "error",
) -> int:
    """Tokenise jsonl file(s) (file/dir/glob) into <out_prefix>.bin/.idx; returns the number of
    documents. Without append_eos the files hold raw document tokens and the loader adds
    bos/eos (data.add_eos); with it, set data.add_eos = false when reading them."""
    files = _expand(jsonl_path, (".jsonl", ".jsonl.gz"), "jsonl")
    dtype = np.uint16 if tokenizer.vocab_size < 65500 else np.int32
    n = 0
    with MegatronIndexedWriter(out_prefix, dtype) as w:
        batch: list[str] = []

        def flush() -> None:
            for ids in tokenizer.encode_batch(batch):
                if append_eos:
                    ids = list(ids) + [tokenizer.eos_id]
                w.add_document(ids)
            batch.clear()

        for text in read_jsonl(files, text_key, on_bad_line):
            batch.append(text)
            n += 1
            if len(batch) >= _ENCODE_CHUNK:
                flush()
        flush()
    return n


def _load_megatron(path: str) -> DocumentStore:
    p = os.path.expanduser(path)
    if os.path.isdir(p):
        prefixes = [_megatron_prefix(f) for f in _expand(p, (".idx",), "Megatron .idx")]
    elif os.path.exists(_megatron_prefix(p) + ".idx"):
        prefixes = [_megatron_prefix(p)]
    else:
        prefixes = [_megatron_prefix(f) for f in _expand(p, (".idx",), "Megatron .idx")]
    tokens, fids, starts, lengths = [], [], [], []
    for k, prefix in enumerate(prefixes):
        ds = MegatronIndexedDataset(prefix)
        s, l = ds.document_spans()
        keep = l > 0
        tokens.append(ds.tokens)
        fids.append(np.full(int(keep.sum()), k, dtype=np.int32))
        starts.append(s[keep])
        lengths.append(l[keep])
    return DocumentStore(
        tokens=tokens,
        file_ids=np.concatenate(fids),
        starts=np.concatenate(starts),
        lengths=np.concatenate(lengths),
        bad_lines=[],
        source=path,
    )


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
            raise DataError(
                f"data {store.source!r}: {total} tokens in {store.num_documents} documents are fewer than "
                f"one sequence of seq_len + 1 = {seq_len + 1} tokens"
            )
        self._epoch_cache: tuple[int, np.ndarray, np.ndarray] | None = None

    def _init_sharding(self, store: DocumentStore, seq_len: int, local_batch_size: int, dp_rank: int,
                       dp_world: int, seed: int, shuffle: bool) -> None:
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
    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
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
        order, cum = self._epoch_layout(epoch)
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
            raise DataError(
                f"data state was saved with seq_len {state['seq_len']}, this run uses {self.seq_len}"
            )
        mismatch = [
            k for k, mine in (("seed", self.seed), ("shuffle", int(self.shuffle)),
                              ("num_documents", self.store.num_documents),
                              ("tokens_per_epoch", self.tokens_per_epoch),
                              ("fingerprint", self.store.fingerprint()))
            if k in state and int(state[k]) != int(mine)
        ]
        if mismatch:
            logger.warning(
                "data: resuming with a different corpus or ordering (%s differ); the batches will "
                "not match the original run", ", ".join(mismatch)
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

    def __init__(self, store: ChatStore, seq_len: int, local_batch_size: int, dp_rank: int = 0, dp_world: int = 1,
                 seed: int = 0, shuffle: bool = True, overflow: str = "truncate", pad_id: int = 0) -> None:
        self._init_sharding(store, seq_len, local_batch_size, dp_rank, dp_world, seed, shuffle)
        if overflow not in ("truncate", "drop"):
            raise DataError(f"data.chat_overflow must be 'truncate' or 'drop', got {overflow!r}")
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
        if not self.rows:
            raise DataError(f"data {store.source!r}: no conversation fits in seq_len + 1 = {capacity} tokens "
                            "(raise training.seq_len or set data.chat_overflow = \"truncate\")")
        logger.log(logging.WARNING if too_long.any() else logging.INFO,
                   "data: %d conversations packed into %d rows of %d tokens; %d longer than that %s",
                   len(kept), len(self.rows), capacity, int(too_long.sum()),
                   "were truncated" if overflow == "truncate" else "were dropped")
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


def build_dataloader(
    cfg_data: Any,
    tokenizer: Any,
    seq_len: int,
    local_batch_size: int,
    dp_rank: int = 0,
    dp_world: int = 1,
    seed: int = 0,
    store: DocumentStore | None = None,
) -> PackedDataLoader:
    """The loader for one data-parallel rank. cfg_data: config.DataSection (format, path,
    text_key, split, on_bad_line, add_bos, add_eos, shuffle; chat: messages_key, chat_overflow,
    tokenizer). Pass `store` to reuse documents already loaded (e.g. the same corpus for several
    ranks in one process). Chat rows are padded with the tokenizer's eos id (label -100)."""
    chat = cfg_data.format == "chat"
    add_bos = bool(getattr(cfg_data, "add_bos", False)) and not chat
    add_eos = bool(getattr(cfg_data, "add_eos", True)) and not chat
    if add_bos and tokenizer.bos_id is None:
        raise DataError("data.add_bos = true but the tokenizer has no bos token")
    if add_eos and tokenizer.eos_id is None:
        raise DataError("data.add_eos = true but the tokenizer has no eos token")
    if store is None:
        store = load_documents(cfg_data, tokenizer)
    if cfg_data.format == "chat":  # the chat template decides the special tokens
        return ChatDataLoader(store, seq_len=seq_len, local_batch_size=local_batch_size, dp_rank=dp_rank,
                              dp_world=dp_world, seed=seed, shuffle=bool(getattr(cfg_data, "shuffle", True)),
                              overflow=cfg_data.chat_overflow,
                              pad_id=tokenizer.eos_id if tokenizer.eos_id is not None else 0)
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
    )
