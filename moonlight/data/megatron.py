"""Megatron-LM's MMIDIDX indexed dataset (<prefix>.idx + <prefix>.bin): the reader (validated at
open, memory-mapped), an atomic writer, a jsonl -> .bin/.idx builder (`python -m moonlight.prepare_data`
on the command line), and the documents of a set of files. The builder also writes
<prefix>.moonlight.json (the tokenizer's fingerprint): reading the files with another tokenizer warns."""

from __future__ import annotations

import json
import logging
import os
import struct
from array import array
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from moonlight.errors import DataError
from moonlight.outputs import check_output, os_error_reason
from moonlight.data.documents import (
    DATA_KEYS,
    BadLines,
    DataKeys,
    DocumentStore,
    encode_documents,
    expand_paths,
    read_jsonl,
)
from moonlight.data.tokenizer import fingerprint

logger = logging.getLogger(__name__)
SIDECAR = ".moonlight.json"  # beside <prefix>.bin/.idx: how they were made


_MMIDIDX_MAGIC = b"MMIDIDX\x00\x00"
_DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
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
            raise DataError(
                f"{idx_path}: truncated Megatron index ({os.path.getsize(idx_path)} bytes, "
                f"the header alone is {header})"
            )
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
            raise DataError(
                f"{idx_path}: truncated Megatron index ({os.path.getsize(idx_path)} bytes, its header "
                f"announces {n} sequences and {d} document entries = {need} bytes)"
            )
        buf = np.memmap(idx_path, mode="r", dtype=np.uint8)
        self.sequence_lengths = np.frombuffer(buf, dtype=np.int32, count=n, offset=offset)
        offset += 4 * n
        self.sequence_pointers = np.frombuffer(buf, dtype=np.int64, count=n, offset=offset)
        offset += 8 * n
        self.document_indices = np.frombuffer(buf, dtype=np.int64, count=d, offset=offset)
        size = os.path.getsize(bin_path)
        if size % self.dtype.itemsize:
            raise DataError(
                f"{bin_path}: {size} bytes is not a whole number of {self.dtype} tokens "
                "(truncated, or the .idx of another file?)"
            )
        ends = self.sequence_pointers + self.sequence_lengths.astype(np.int64) * self.dtype.itemsize
        if n and (int(ends.max()) > size or min(self.sequence_pointers.min(), self.sequence_lengths.min()) < 0):
            raise DataError(
                f"{bin_path}: {size} bytes, but {idx_path} points up to byte {int(ends.max())} "
                "(a truncated .bin, or the .idx of another file)"
            )
        self.tokens = np.memmap(bin_path, mode="r", dtype=self.dtype) if size else np.zeros(0, dtype=self.dtype)

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


def _is_megatron_index(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(_MMIDIDX_MAGIC)) == _MMIDIDX_MAGIC
    except OSError:
        return False


def check_megatron_output(prefix: str, overwrite: bool, how: str = "overwrite=True") -> None:
    """Refuse to replace <prefix>.bin/.idx unless `overwrite`, and even then unless they are a Megatron
    pair (the .idx starts with MMIDIDX): a lone .bin or a foreign file is never ours to replace. `how`:
    how the caller's user asks to overwrite (a command line: "--overwrite")."""
    prefix = _megatron_prefix(prefix)
    found = [prefix + ext for ext in (".bin", ".idx") if os.path.lexists(prefix + ext)]
    if not found:
        return
    if not overwrite:
        raise DataError(
            f"{' and '.join(found)} already exist{'s' if len(found) == 1 else ''}; pass {how} "
            "to replace them, or pick another output prefix"
        )
    refuse = "refusing to replace it (remove it, or pick another output prefix)"
    for f in found:
        if os.path.islink(f) or not os.path.isfile(f):
            raise DataError(f"{f} is not a regular file; {refuse}")
    idx = prefix + ".idx"
    if not _is_megatron_index(idx):
        problem = "is not a Megatron MMIDIDX index" if os.path.exists(idx) else "is missing"
        raise DataError(f"{found[0]}: {idx} {problem}, so this is not a file this writer made; {refuse}")


class MegatronIndexedWriter:
    """Write <prefix>.bin/.idx in Megatron's MMIDIDX format, one sequence per document.

        with MegatronIndexedWriter("out/corpus", np.uint16) as w:
            w.add_document([1, 2, 3])

    Both files are written under temporary names beside the output and renamed at the end of the
    `with` block (.idx last, after any older .idx is removed, so a reader never pairs a new .bin with an
    old .idx); an exception in the block deletes them, leaving any earlier output as it was. Existing
    output files are replaced only with `overwrite` (check_megatron_output)."""

    def __init__(self, prefix: str, dtype: Any = np.int32, overwrite: bool = False) -> None:
        self.prefix = _megatron_prefix(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF_DTYPE:
            raise DataError(f"unsupported dtype {self.dtype}")
        check_megatron_output(self.prefix, overwrite)
        folder = os.path.dirname(os.path.abspath(self.prefix + ".bin"))
        name = os.path.basename(self.prefix)
        os.makedirs(folder, exist_ok=True)
        # hidden names that do not end in .bin/.idx, so no reader mistakes a partial file for data; the
        # pid keeps two concurrent writers apart
        self._bin_tmp, self._idx_tmp = (
            os.path.join(folder, f".{name}{ext}.{os.getpid()}.tmp") for ext in (".bin", ".idx")
        )
        self._bin = open(self._bin_tmp, "wb")
        self._lengths = array("i")  # int32 per document: a list would take 9x the memory on a large corpus
        self.num_tokens = 0

    @property
    def files(self) -> list[str]:
        return [self.prefix + ".bin", self.prefix + ".idx"]

    def add_document(self, tokens: Sequence[int] | np.ndarray) -> None:
        arr = np.asarray(tokens)
        if arr.size > np.iinfo(np.int32).max:
            raise DataError(
                f"{self.prefix}: document {len(self._lengths)} has {arr.size} tokens, more than the "
                "format's int32 sequence lengths hold"
            )
        if arr.size and self.dtype.kind in "iu":
            info = np.iinfo(self.dtype)
            lo, hi = int(arr.min()), int(arr.max())
            if lo < info.min or hi > info.max:
                raise DataError(
                    f"{self.prefix}: document {len(self._lengths)} holds token id "
                    f"{lo if lo < info.min else hi}, outside {self.dtype}'s {info.min}..{info.max}"
                )
        self._bin.write(arr.astype(self.dtype, copy=False).tobytes(order="C"))
        self._lengths.append(int(arr.size))
        self.num_tokens += int(arr.size)

    @property
    def num_documents(self) -> int:
        return len(self._lengths)

    def finalize(self) -> None:
        if self._bin.closed:
            return
        _close_durably(self._bin)
        lengths = np.frombuffer(self._lengths, dtype=np.int32)
        doc_idx = np.arange(len(lengths) + 1, dtype=np.int64)  # one sequence per document
        pointers = (
            np.concatenate([[0], np.cumsum(lengths.astype(np.int64))[:-1]]) * self.dtype.itemsize
            if len(lengths)
            else np.zeros(0, np.int64)
        )
        with open(self._idx_tmp, "wb") as f:
            f.write(_MMIDIDX_MAGIC)
            f.write(struct.pack("<Q", 1))
            f.write(struct.pack("<B", _CODE_OF_DTYPE[self.dtype]))
            f.write(struct.pack("<Q", len(lengths)))
            f.write(struct.pack("<Q", len(doc_idx)))
            f.write(lengths.tobytes(order="C"))
            f.write(np.asarray(pointers, dtype=np.int64).tobytes(order="C"))
            f.write(doc_idx.tobytes(order="C"))
            _close_durably(f)
        bin_path, idx_path = self.files
        if os.path.lexists(idx_path):
            os.remove(idx_path)
        os.replace(self._bin_tmp, bin_path)
        os.replace(self._idx_tmp, idx_path)

    def discard(self) -> None:
        """Drop what was written; an earlier output stays as it was (also when closing fails, e.g. on a
        full disk: the temp files go all the same)."""
        try:
            self._bin.close()
        except OSError:
            pass
        for tmp in (self._bin_tmp, self._idx_tmp):
            if os.path.exists(tmp):
                os.remove(tmp)

    def __enter__(self) -> "MegatronIndexedWriter":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        try:
            if exc_type is None:
                self.finalize()
        finally:
            self.discard()


def _close_durably(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()


def token_dtype(tokenizer: Any) -> np.dtype:
    """uint16 when every id the tokenizer has (its vocabulary and special tokens) fits, else int32
    (Megatron's rule, vocab_size < 65500, leaves the top ids unused)."""
    top = max(
        [
            tokenizer.vocab_size - 1,
            *tokenizer.special_tokens.values(),
            *(i for i in (tokenizer.bos_id, tokenizer.eos_id) if i is not None),
        ]
    )
    return np.dtype(np.uint16 if top <= np.iinfo(np.uint16).max else np.int32)


@dataclass
class MegatronBuild:
    """What build_megatron_from_jsonl wrote."""

    files: list[str]
    dtype: np.dtype
    documents: int  # written: the non-empty ones
    tokens: int  # in the files, eos included
    empty: int  # empty texts, not written
    bad_lines: int  # malformed records skipped (on_bad_line = "skip")
    first_bad_line: str | None = None


def build_megatron_from_jsonl(
    paths: str | Sequence[str],
    out_prefix: str,
    tokenizer: Any,
    text_key: str = "text",
    append_eos: bool = False,
    on_bad_line: str = "error",
    overwrite: bool = False,
    keys: DataKeys = DATA_KEYS,
) -> MegatronBuild:
    """Tokenize jsonl file(s) (each a file, directory or glob; .jsonl or .jsonl.gz) into
    <out_prefix>.bin/.idx, written atomically (see MegatronIndexedWriter). Empty texts are left out, as
    every loader drops them. Without append_eos the files hold raw document tokens and the loader adds
    eos (data.add_eos = true); with it each document ends with the tokenizer's eos, so read them with
    data.add_eos = false. `keys` names the settings in error messages."""
    if append_eos and tokenizer.eos_id is None:
        raise DataError(
            "appending eos (--append-eos) needs an eos token, but the tokenizer has none: leave it off, "
            "or name eos_token in the tokenizer's tokenizer_config.json"
        )
    files = [
        f
        for p in ([paths] if isinstance(paths, str) else paths)
        for f in expand_paths(p, (".jsonl", ".jsonl.gz"), "jsonl", keys)
    ]
    prefix = _megatron_prefix(out_prefix)
    for f in files:
        for out in (prefix + ".bin", prefix + ".idx"):
            check_output(out, f, what="the output")
    bad = BadLines(on_bad_line, keys)
    dtype = token_dtype(tokenizer)
    source = paths if isinstance(paths, str) else " ".join(paths)
    empty = 0
    sidecar = None  # the sidecar this call wrote: removed again if the pair it describes does not land
    try:
        with MegatronIndexedWriter(prefix, dtype, overwrite=overwrite) as w:
            for ids in encode_documents(read_jsonl(files, text_key, bad=bad, keys=keys), tokenizer, source):
                if not ids.size:
                    empty += 1
                    continue
                w.add_document(np.append(ids, tokenizer.eos_id) if append_eos else ids)
            if not w.num_documents:
                raise DataError(
                    f"{keys('path')} {source!r}: no documents to write ({empty} empty, {bad.count} "
                    f"malformed lines skipped): check the files and {keys('text_key')}; nothing was "
                    "written"
                )
            made = {"tokenizer_fingerprint": fingerprint(tokenizer), "append_eos": append_eos}
            sidecar = _write_sidecar(prefix, made)
    except BaseException as e:
        if sidecar is not None:
            os.remove(sidecar)
        if not isinstance(e, OSError):
            raise
        # the output side: input read errors are DataErrors already
        raise DataError(
            f"{e.filename or prefix}: cannot write it ({os_error_reason(e)}); free space or fix "
            "permissions, or pick another output prefix"
        ) from None
    return MegatronBuild(
        files=w.files,
        dtype=dtype,
        documents=w.num_documents,
        tokens=w.num_tokens,
        empty=empty,
        bad_lines=bad.count,
        first_bad_line=bad.reported[0] if bad.reported else None,
    )


def _write_sidecar(prefix: str, record: dict) -> str:
    """<prefix>.moonlight.json, written whole or not at all (before the .bin/.idx it describes); its path."""
    tmp = f"{prefix}{SIDECAR}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f)
        os.replace(tmp, prefix + SIDECAR)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return prefix + SIDECAR


def _made_with_another_tokenizer(prefix: str, tokenizer: Any) -> bool:
    try:
        with open(prefix + SIDECAR, encoding="utf-8") as f:
            made_with = json.load(f).get("tokenizer_fingerprint")
    except (OSError, ValueError, AttributeError):  # none (not made by prepare_data) or unreadable: unknown
        return False
    return made_with is not None and made_with != fingerprint(tokenizer)


def load_megatron(path: str, keys: DataKeys = DATA_KEYS, tokenizer: Any = None) -> DocumentStore:
    """The documents of Megatron files; with `tokenizer`, files whose sidecar names another one are
    reported in one warning."""
    p = os.path.expanduser(path)
    if not os.path.isdir(p) and os.path.exists(_megatron_prefix(p) + ".idx"):
        prefixes = [_megatron_prefix(p)]
    else:  # a directory of .idx files, or a glob
        prefixes = [_megatron_prefix(f) for f in expand_paths(p, (".idx",), "Megatron .idx", keys)]
    tokens, fids, starts, lengths = [], [], [], []
    for k, prefix in enumerate(prefixes):
        try:
            ds = MegatronIndexedDataset(prefix)
        except OSError as e:  # unreadable (permissions, a directory where a file belongs)
            raise DataError(
                f"{e.filename or prefix}: cannot read it ({e.strerror or e}); fix it or point {keys('path')} elsewhere"
            ) from None
        s, l = ds.document_spans()
        keep = l > 0
        tokens.append(ds.tokens)
        fids.append(np.full(int(keep.sum()), k, dtype=np.int32))
        starts.append(s[keep])
        lengths.append(l[keep])
    other = [prefix for prefix in prefixes if tokenizer is not None and _made_with_another_tokenizer(prefix, tokenizer)]
    if other:
        logger.warning(
            "data: %d of %d Megatron file(s) in %s were tokenized with another tokenizer than %s "
            "(e.g. %s): their token ids mean other text; run prepare_data again with this tokenizer",
            len(other),
            len(prefixes),
            path,
            keys("tokenizer"),
            other[0],
        )
    return DocumentStore(
        tokens=tokens,
        file_ids=np.concatenate(fids),
        starts=np.concatenate(starts),
        lengths=np.concatenate(lengths),
        bad_lines=[],
        source=path,
    )
