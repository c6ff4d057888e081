"""Tokenizers with one small interface: encode(text) -> list[int], decode(ids) -> str,
encode_batch(texts), bos_id, eos_id, vocab_size, special_tokens (name -> id).

    build_tokenizer("byte")                   # 256 bytes + [BOS]=256, [EOS]=257, chat tokens; no files
    build_tokenizer("/path/to/moonlight")     # a directory with tiktoken.model (Moonlight/Kimi)
    build_tokenizer("/path/tokenizer.json")   # an HF `tokenizers` file (or its directory)

Nothing is ever downloaded.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from typing import Iterator, Protocol, Sequence

from moonlight.errors import DataError

__all__ = [
    "Tokenizer",
    "ByteTokenizer",
    "TikTokenTokenizer",
    "HFTokenizer",
    "build_tokenizer",
    "fingerprint",
    "MOONLIGHT_PAT_STR",
]

# Text that any two different vocabularies split differently: the fingerprint encodes it.
_PROBE = (
    "The quick brown fox jumps over the lazy dog; 0123456789 +-*/= {}[]()\n\tnaïve café Ünïcödé "
    "日本語のテキスト 中文 한국어 Русский العربية emoji 🙂 def f(x): return x ** 2  # code"
)


class Tokenizer(Protocol):
    bos_id: int | None
    eos_id: int | None
    special_tokens: dict[str, int]  # name -> id of every special token (chat markers included)

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes 0..255, then [BOS] = 256, [EOS] = 257 and the chat tokens from 258 on, in
    Moonlight's order (<|im_end|> = 258, ..., <|im_middle|> = 265; vocab_size 266), so the debug
    model (vocab 320) can train on chat data. encode() never produces them: text is bytes."""

    name = "byte"

    def __init__(self) -> None:
        self.bos_id = 256
        self.eos_id = 257
        self.special_tokens = {t: 256 + i for i, t in enumerate(["[BOS]", "[EOS]"] + DEFAULT_ADDITIONAL_SPECIALS)}
        self._names = {i: t for t, i in self.special_tokens.items()}

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.special_tokens)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        out: list[str] = []
        buf = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                buf.append(i)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            if not skip_special_tokens:
                out.append(self._names.get(i, f"<|{i}|>"))
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size}, bos=256, eos=257)"


# Pre-tokenizer regex of Moonlight / Kimi: TikTokenTokenizer.pat_str in Moonlight's
# `tokenization_moonshot.py` (the same string as Kimi-K2's `tokenization_kimi.py`; checked
# against several public copies of it). Runs of Han characters are split off first,
# other letters follow the cl100k/o200k style with the case-split of o200k; digits in groups
# of at most three. `&&` is character-class intersection (supported by tiktoken's regex engine).
MOONLIGHT_PAT_STR = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

# Moonlight reserves 256 + 2 special ids after the BPE ranks (163584 .. 163841).
NUM_SPECIAL_TOKENS = 258
DEFAULT_ADDITIONAL_SPECIALS = [  # ids 163586.. when tokenizer_config.json is absent
    "<|im_end|>",
    "<|im_user|>",
    "<|im_assistant|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "[EOT]",
    "<|im_system|>",
    "<|im_middle|>",
]
# tiktoken slows down badly on very long strings / whitespace runs; split like Kimi does.
_MAX_ENCODE_CHARS = 400_000
_MAX_RUN_CHARS = 25_000


def _split_runs(s: str, max_len: int) -> Iterator[str]:
    """Split s so that no piece has more than max_len consecutive (non-)whitespace chars."""
    run = 0
    start = 0
    cur_space = s[0].isspace() if s else False
    for i, c in enumerate(s):
        sp = c.isspace()
        if sp == cur_space:
            run += 1
            if run > max_len:
                yield s[start:i]
                start = i
                run = 1
        else:
            cur_space = sp
            run = 1
    yield s[start:]


def _read_tokenizer_config(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:  # also a file that is not UTF-8
        raise DataError(f"{path} is not valid JSON: {e}") from None


def _read_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """The ranks file read here: tiktoken's load_tiktoken_bpe keeps a copy in the temp dir keyed by the
    path and serves that copy afterwards, so a file replaced at the same path loaded its old ranks."""
    ranks = {}
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError:  # also binascii.Error
                raise DataError(
                    f'{path}:{number}: not a tiktoken ranks line ("base64token rank"): {line[:80]!r}'
                ) from None
    return ranks


class TikTokenTokenizer:
    """Moonlight's tiktoken tokenizer from a local `tiktoken.model` ranks file
    ("base64token rank" per line). Special tokens take ids len(ranks) .. len(ranks)+257:
    [BOS] first, [EOS] next (163584 / 163585 for the real file); their names come from
    tokenizer_config.json's added_tokens_decoder when that file is present."""

    name = "tiktoken"

    def __init__(self, model_file: str, config_file: str | None = None) -> None:
        import tiktoken

        ranks = _read_tiktoken_ranks(model_file)
        n = len(ranks)
        names = {n + j: t for j, t in enumerate(["[BOS]", "[EOS]"] + DEFAULT_ADDITIONAL_SPECIALS)}
        bos_tok, eos_tok = "[BOS]", "[EOS]"
        if config_file and os.path.exists(config_file):
            cfg = _read_tokenizer_config(config_file)
            for k, v in (cfg.get("added_tokens_decoder") or {}).items():
                names[int(k)] = v["content"] if isinstance(v, dict) else str(v)
            bos_tok = _token_str(cfg.get("bos_token")) or bos_tok
            eos_tok = _token_str(cfg.get("eos_token")) or eos_tok
        self.special_tokens = {names.get(i, f"<|reserved_token_{i}|>"): i for i in range(n, n + NUM_SPECIAL_TOKENS)}
        self.num_base_tokens = n
        self.model = tiktoken.Encoding(
            name=os.path.basename(model_file),
            pat_str=MOONLIGHT_PAT_STR,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        if bos_tok not in self.special_tokens or eos_tok not in self.special_tokens:
            raise DataError(f"{model_file}: bos/eos tokens {bos_tok!r}/{eos_tok!r} are not special tokens")
        self.bos_id = self.special_tokens[bos_tok]
        self.eos_id = self.special_tokens[eos_tok]
        self._n_vocab = n + NUM_SPECIAL_TOKENS

    @property
    def vocab_size(self) -> int:
        """BPE ranks + 258 specials (163842 for Moonlight; its embedding has 163840 rows and
        the two top reserved ids never come out of encode)."""
        return self._n_vocab

    def _pieces(self, text: str) -> Iterator[str]:
        for i in range(0, len(text), _MAX_ENCODE_CHARS):
            yield from _split_runs(text[i : i + _MAX_ENCODE_CHARS], _MAX_RUN_CHARS)

    def encode(self, text: str) -> list[int]:
        """Plain text only: special-token strings in the text are encoded as text."""
        if len(text) <= _MAX_RUN_CHARS:
            return self.model.encode_ordinary(text)
        out: list[int] = []
        for p in self._pieces(text):
            out.extend(self.model.encode_ordinary(p))
        return out

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if all(len(t) <= _MAX_RUN_CHARS for t in texts):
            return self.model.encode_ordinary_batch(list(texts))
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i < self.num_base_tokens]
        return self.model.decode(ids)

    def __repr__(self) -> str:
        return f"TikTokenTokenizer(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id})"


def _token_str(tok) -> str | None:
    if tok is None:
        return None
    if isinstance(tok, dict):
        return tok.get("content")
    return str(tok)


class HFTokenizer:
    """An HF `tokenizers` tokenizer.json. bos/eos come from tokenizer_config.json next to it
    when present, else from common special-token names; either may be None."""

    name = "hf"
    _BOS_NAMES = ("<|begin_of_text|>", "[BOS]", "<s>", "<|startoftext|>", "<bos>")
    _EOS_NAMES = ("<|end_of_text|>", "<|endoftext|>", "[EOS]", "</s>", "<eos>", "<|im_end|>")

    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer as _Tok

        try:
            self.model = _Tok.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception for unreadable or invalid files
            raise DataError(f"{path} is not a valid tokenizer.json: {e}") from None
        vocab = self.model.get_vocab(with_added_tokens=True)
        bos = eos = None
        cfg_path = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer_config.json")
        if os.path.exists(cfg_path):
            cfg = _read_tokenizer_config(cfg_path)
            bos, eos = _token_str(cfg.get("bos_token")), _token_str(cfg.get("eos_token"))
        if bos is None:
            bos = next((t for t in self._BOS_NAMES if t in vocab), None)
        if eos is None:
            eos = next((t for t in self._EOS_NAMES if t in vocab), None)
        self.bos_id = vocab.get(bos) if bos else None
        self.eos_id = vocab.get(eos) if eos else None
        self.special_tokens = {t.content: i for i, t in self.model.get_added_tokens_decoder().items()}
        self._n_vocab = self.model.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._n_vocab

    def encode(self, text: str) -> list[int]:
        return self.model.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.model.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.model.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id})"


def build_tokenizer(spec: str, what: str = "data.tokenizer") -> ByteTokenizer | TikTokenTokenizer | HFTokenizer:
    """ "byte" | a directory with tiktoken.model (or tokenizer.json) | a tiktoken ranks file |
    a tokenizer.json file. `what` names the setting in errors."""
    if spec == "byte":
        return ByteTokenizer()
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "tiktoken.model")):
            return TikTokenTokenizer(os.path.join(path, "tiktoken.model"), os.path.join(path, "tokenizer_config.json"))
        if os.path.exists(os.path.join(path, "tokenizer.json")):
            return HFTokenizer(os.path.join(path, "tokenizer.json"))
        raise DataError(f"{what}: directory {spec!r} has neither tiktoken.model nor tokenizer.json")
    if os.path.isfile(path):
        if path.endswith(".json"):
            return HFTokenizer(path)
        cfg = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer_config.json")
        return TikTokenTokenizer(path, cfg)
    raise DataError(
        f"{what}: {spec!r} is not 'byte' nor an existing tokenizer file/directory "
        "(a directory with tiktoken.model, or a tokenizer.json)"
    )


def fingerprint(tokenizer) -> str:
    """A short hash of what a tokenizer turns text into (ids of a probe text, vocab size, special
    tokens): token files made with one tokenizer and read with another show as a mismatch."""
    probe = [
        type(tokenizer).__name__,
        tokenizer.vocab_size,
        sorted(tokenizer.special_tokens.items()),
        tokenizer.bos_id,
        tokenizer.eos_id,
        list(tokenizer.encode_batch([_PROBE])[0]),
    ]
    return hashlib.sha256(json.dumps(probe).encode()).hexdigest()[:16]
