"""Documents: read text or conversations from jsonl files and local HF datasets, tokenize them, and
keep the token ids of every document (DocumentStore). Malformed records are reported as
"path:line: reason" and skipped or raised (data.on_bad_line); see moonlight.data.loader for the
formats and how documents are packed into training sequences."""

from __future__ import annotations

import glob as _glob
import gzip
import json
import logging
import os
import stat
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from moonlight import distributed
from moonlight.errors import DataError
from moonlight.data.tokenizer import ByteTokenizer

logger = logging.getLogger(__name__)

MAX_REPORTED_BAD_LINES = 100
ENCODE_CHUNK = 1024
MAX_LINE_BYTES = 64 * 2**20  # a longer line is a bad record, read past in pieces (a newline-free file never ends)


class BadLineError(DataError):
    """A malformed input record; the message starts with "path:line:"."""


@dataclass(frozen=True)
class DataKeys:
    """The config key each reader setting came from, for the messages that name it: keys(name) is
    "<section>.<name>" for the keys of `own`, else "data.<name>" (the [data] settings a section
    inherits; held-out data: validation.path, validation.format when set, the rest from [data])."""

    section: str = "data"
    own: tuple[str, ...] = ()

    def __call__(self, name: str) -> str:
        return f"{self.section}.{name}" if name in self.own else f"data.{name}"

    def assign(self, name: str, value: str) -> str:
        """How the user sets `name` to the string `value`, for a message's fix."""
        return f"{self(name)} = {json.dumps(value)}"


DATA_KEYS = DataKeys()


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


def expand_paths(path: str, exts: tuple[str, ...], what: str, keys: DataKeys = DATA_KEYS) -> list[str]:
    """A file, a directory (files with one of exts, sorted, recursively) or a glob; each a regular file."""
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        files = sorted(os.path.join(root, f) for root, _, fs in os.walk(path) for f in fs if f.endswith(exts))
    elif os.path.exists(path):
        files = [path]
    else:
        files = sorted(f for f in _glob.glob(path, recursive=True) if os.path.exists(f) and not os.path.isdir(f))
    if not files:
        raise DataError(f"{keys('path')} {path!r}: no {what} files found (looked for {', '.join(exts)})")
    for f in files:
        check_regular(f, keys)
    stems = [f.removesuffix(".gz") for f in files]
    twice = sorted({f for f in stems if stems.count(f) > 1})
    if twice:
        logger.warning(
            "data: %s and %s.gz are both read (%d such pair(s)): the same documents twice? Remove one "
            "of each pair from %s",
            twice[0],
            twice[0],
            len(twice),
            keys("path"),
        )
    return files


def check_regular(path: str, keys: DataKeys = DATA_KEYS) -> None:
    """Refuse a FIFO, device or socket: opening one blocks, reading one may never end."""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # dangling or unreadable: named when it is read
        return
    if not stat.S_ISREG(mode):
        raise DataError(
            f"{path} is not a regular file (a FIFO, device or socket would block or never end): "
            f"remove it from {keys('path')}"
        )


def expand_paths_or_none(path: str) -> list[str]:
    """The jsonl files at path, or [] when there are none (then it is read as an HF dataset)."""
    try:
        return expand_paths(path, (".jsonl", ".jsonl.gz"), "jsonl")
    except DataError:
        return []


class BadLines:
    def __init__(self, on_bad_line: str, keys: DataKeys = DATA_KEYS) -> None:
        if on_bad_line not in ("skip", "error"):
            raise DataError(f"{keys('on_bad_line')} must be 'skip' or 'error', got {on_bad_line!r}")
        self.mode = on_bad_line
        self.fix = keys.assign("on_bad_line", "skip")
        self.count = 0
        self.reported: list[str] = []

    def __call__(self, where: str, reason: str) -> None:
        msg = f"{where}: {reason}"
        if self.mode == "error":
            raise BadLineError(msg + f" (set {self.fix} to skip malformed records)")
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


class _Tally:
    """Usable and malformed records of one source: more malformed than usable (at least
    MIN_MALFORMED) is not data with some bad lines but the wrong file, key or encoding: an error."""

    MIN_MALFORMED = 10  # fewer: the load goes on, and an empty result names its first bad record

    def __init__(self, source: str, bad: BadLines) -> None:
        self.source, self.bad, self.good, self.skipped, self.first = source, bad, 0, 0, ""

    def skip(self, where: str, reason: str) -> None:
        self.bad(where, reason)  # raises with on_bad_line = "error"
        self.skipped += 1
        self.first = self.first or f"{where}: {reason}"

    def check(self, fix: str) -> None:
        if self.skipped > self.good and self.skipped >= self.MIN_MALFORMED:
            raise DataError(
                f"{self.source}: {self.skipped} of {self.skipped + self.good} records are malformed "
                f"(first: {self.first}); {fix}"
            )


def read_jsonl(
    paths: Sequence[str],
    text_key: str = "text",
    on_bad_line: str = "skip",
    bad: BadLines | None = None,
    problem: Callable[[Any], str | None] = _text_problem,
    keys: DataKeys = DATA_KEYS,
    field_key: str = "text_key",
) -> Iterator[Any]:
    """Yield field text_key of every well-formed line (`problem(value)` says why a value is not
    usable, default: not a valid string); blank lines are ignored silently. A file with more
    malformed lines than good ones is a DataError (field_key: the setting that names text_key)."""
    bad = bad or BadLines(on_bad_line, keys)
    for path in paths:
        tally = _Tally(path, bad)
        for where, value, reason in _jsonl_records(path, text_key, problem, keys):
            if reason:
                tally.skip(where, reason)
            else:
                tally.good += 1
                yield value
        tally.check(f"is {keys.assign(field_key, text_key)} the field, and the file UTF-8 JSON lines?")


def _jsonl_records(
    path: str, text_key: str, problem: Callable[[Any], str | None], keys: DataKeys
) -> Iterator[tuple[str, Any, str | None]]:
    """(where, field text_key, None) of each good line, (where, None, why) of each malformed one."""
    for lineno, raw in _numbered_lines(path, keys):
        where = f"{path}:{lineno}"
        if raw is None:
            yield where, None, f"longer than {MAX_LINE_BYTES} bytes (not one JSON record per line?)"
            continue
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.rstrip(b"\r\n"))
        except UnicodeDecodeError as e:
            yield where, None, f"invalid UTF-8 ({e.reason})"
            continue
        except json.JSONDecodeError as e:
            yield where, None, f"invalid JSON: {e.msg} (column {e.colno})"
            continue
        if not isinstance(obj, dict):
            yield where, None, f"expected a JSON object, got {type(obj).__name__}"
        elif text_key not in obj:
            yield where, None, f"missing text field {text_key!r} (keys: {', '.join(list(obj)[:10])})"
        elif reason := problem(obj[text_key]):
            yield where, None, f"field {text_key!r} {reason}"
        else:
            yield where, obj[text_key], None


def _check_encoding(path: str, head: bytes) -> None:
    """A first line that shows the file is compressed or not UTF-8: every line would be malformed."""
    if head.startswith(b"\x1f\x8b") and not path.endswith(".gz"):
        raise DataError(f"{path} is gzip-compressed but not named .gz: rename it to {os.path.basename(path)}.gz")
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in head:
        raise DataError(f"{path} is UTF-16 (or binary), not UTF-8 text: convert it, e.g. iconv -f UTF-16 -t UTF-8")


def _numbered_lines(path: str, keys: DataKeys) -> Iterator[tuple[int, bytes | None]]:
    """(line number, raw line, None when longer than MAX_LINE_BYTES) of a regular text or .gz file; a
    truncated or corrupt .gz is a DataError naming the file and the line it stopped after."""
    check_regular(path, keys)
    opener = gzip.open if path.endswith(".gz") else open
    lineno = 0
    try:
        with opener(path, "rb") as f:
            while raw := f.readline(MAX_LINE_BYTES + 1):
                lineno += 1
                if lineno == 1:
                    _check_encoding(path, raw)
                if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                    while (rest := f.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                        pass
                    raw = None
                yield lineno, raw
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(
            f"{path}: corrupt or truncated gzip file after line {lineno} ({type(e).__name__}: {e})"
        ) from None
    except OSError as e:  # unreadable: permissions, a dangling symlink, an I/O error
        raise DataError(
            f"{path}: cannot read it ({e.strerror or e}); fix it or remove it from {keys('path')}"
        ) from None


_HF_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".arrow": "arrow", ".csv": "csv"}


def is_saved_dataset(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, f)) for f in ("dataset_info.json", "state.json", "dataset_dict.json")
    )


def _cause(e: BaseException) -> str:
    e = e.__cause__ or e
    return f"{type(e).__name__}: {e}"


def read_hf(
    path: str,
    text_key: str = "text",
    split: str = "train",
    on_bad_line: str = "skip",
    bad: BadLines | None = None,
    problem: Callable[[Any], str | None] = _text_problem,
    keys: DataKeys = DATA_KEYS,
    field_key: str = "text_key",
) -> Iterator[Any]:
    """Texts of a local HF dataset (save_to_disk directory, or data files). Offline only. field_key:
    the setting that names column text_key (chat: messages_key)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    bad = bad or BadLines(on_bad_line, keys)
    path = os.path.expanduser(path)
    path_key, split_key = keys("path"), keys("split")
    # malformed files surface as the parser's ValueError (pyarrow, pandas, ujson) or wrapped by datasets
    unreadable = (ValueError, OSError, datasets.exceptions.DatasetGenerationError)
    if is_saved_dataset(path):
        try:
            ds = datasets.load_from_disk(path)
        except unreadable as e:
            raise DataError(f"{path_key} {path!r}: not a readable saved dataset ({_cause(e)})") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{path_key} {path!r} has splits {list(ds)}, not {split_key}={split!r}")
            ds = ds[split]
        elif split != "train":  # a single dataset has no splits: the setting would be silently ignored
            raise DataError(
                f"{path_key} {path!r} is a single dataset without splits; {split_key}={split!r} cannot "
                "apply (leave it at 'train', or save a DatasetDict)"
            )
        where0 = path
    else:
        files = expand_paths(path, tuple(_HF_BUILDERS), "dataset", keys)
        builders = {_HF_BUILDERS[os.path.splitext(f)[1]] for f in files if os.path.splitext(f)[1] in _HF_BUILDERS}
        if len(builders) != 1:
            raise DataError(
                f"{path_key} {path!r}: expected files of one kind ({', '.join(_HF_BUILDERS)}), got {files[:5]}"
            )
        if split != "train":
            raise DataError(
                f"{path_key} {path!r}: data files form one dataset without splits; {split_key}={split!r} "
                f"cannot apply (leave it at 'train', or point {path_key} at that split's files)"
            )
        try:
            ds = datasets.load_dataset(builders.pop(), data_files=files, split="train")
        except unreadable as e:
            raise DataError(f"{path_key} {path!r}: its files cannot be read as a dataset ({_cause(e)})") from None
        where0 = path
    if text_key not in ds.column_names:
        raise DataError(f"{path_key} {path!r}: no column {keys(field_key)}={text_key!r} (columns: {ds.column_names})")
    row = 0
    tally = _Tally(where0, bad)
    for chunk in ds.select_columns([text_key]).iter(batch_size=ENCODE_CHUNK):
        for text in chunk[text_key]:
            row += 1
            reason = problem(text)
            if reason:
                tally.skip(f"{where0}:row {row}", f"field {text_key!r}: {reason}")
                continue
            tally.good += 1
            yield text
    tally.check(f"is {keys.assign(field_key, text_key)} the column of the texts?")


def _progress(items: Iterable, source: str, unit: str) -> Iterable:
    """items, counted on rank 0's terminal while a large corpus is tokenized (every rank reads it all;
    no output when stderr is not a terminal)."""
    return tqdm(
        items,
        desc=f"data: tokenizing {source}",
        unit=f" {unit}",
        mininterval=2.0,
        disable=None if distributed.rank() == 0 else True,
    )


def encode_documents(texts: Iterable[str], tokenizer: Any, source: str) -> Iterator[np.ndarray]:
    """The int32 token ids of each text (empty ones included), encoded ENCODE_CHUNK texts at a time
    under a progress bar."""
    byte_fast = isinstance(tokenizer, ByteTokenizer)

    def encode(batch: list[str]) -> list[np.ndarray]:
        if byte_fast:
            return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int32) for t in batch]
        return [np.asarray(ids, dtype=np.int32) for ids in tokenizer.encode_batch(batch)]

    batch: list[str] = []
    for t in _progress(texts, source, "documents"):
        batch.append(t)
        if len(batch) >= ENCODE_CHUNK:
            yield from encode(batch)
            batch = []
    yield from encode(batch)


def tokenize_texts(texts: Iterable[str], tokenizer: Any, source: str, bad: BadLines) -> DocumentStore:
    arrays = list(encode_documents(texts, tokenizer, source))
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
    """Tokenized conversations (one document each) and, laid out like `tokens`, whether each token
    is a training target (assistant content and its end-of-turn marker)."""

    targets: list[np.ndarray] | None = None  # bool, parallel to tokens

    def document_targets(self, j: int) -> np.ndarray:
        a = int(self.starts[j])
        return self.targets[int(self.file_ids[j])][a : a + int(self.lengths[j])]


def tokenize_conversations(conversations: Iterable[list], template: Any, source: str, bad: BadLines) -> ChatStore:
    arrays, flags, silent = [], [], 0
    for messages in _progress(conversations, source, "conversations"):
        ids, targets = template.encode(messages)
        arrays.append(np.asarray(ids, dtype=np.int32))
        flags.append(np.asarray(targets, dtype=bool))
        silent += all(not m["content"].strip() for m in messages if m["role"] == "assistant")
    if silent:
        logger.warning(
            "data: %d of %d conversations in %s have only empty assistant turns: they train on the "
            "end-of-turn marker alone",
            silent,
            len(arrays),
            source,
        )
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
