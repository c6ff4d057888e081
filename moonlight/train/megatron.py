"""Megatron-LM's MMIDIDX indexed dataset (<prefix>.idx + <prefix>.bin): the reader (validated at
open, memory-mapped), a writer, a jsonl -> .bin/.idx builder, and the documents of a set of files."""

from __future__ import annotations

import os
import struct
from typing import Any, Sequence

import numpy as np

from moonlight.errors import DataError
from moonlight.train.documents import DATA_KEYS, ENCODE_CHUNK, DataKeys, DocumentStore, expand_paths, read_jsonl


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
    files = expand_paths(jsonl_path, (".jsonl", ".jsonl.gz"), "jsonl")
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
            if len(batch) >= ENCODE_CHUNK:
                flush()
        flush()
    return n


def load_megatron(path: str, keys: DataKeys = DATA_KEYS) -> DocumentStore:
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
            raise DataError(f"{e.filename or prefix}: cannot read it ({e.strerror or e}); fix it or point "
                            f"{keys('path')} elsewhere") from None
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
