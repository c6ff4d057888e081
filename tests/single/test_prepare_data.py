"""`python -m moonlight.prepare_data`: jsonl -> Megatron .bin/.idx that the trainer reads as the same
tokens as the jsonl; the user's mistakes are one `error:` line; outputs appear whole or not at all."""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from moonlight.prepare_data import main
from moonlight.train.config import load_config
from moonlight.data.loader import build_dataloader, load_documents
from moonlight.data.megatron import MegatronIndexedDataset, build_megatron_from_jsonl, token_dtype
from moonlight.data.tokenizer import ByteTokenizer, build_tokenizer
from moonlight.train.trainer import Trainer
from tests.helpers import all_sequences, data_cfg, make_docs, make_tiktoken_dir, mmididx_bytes, write_jsonl
from tests.helpers import SMALL, read_metrics
from tests.helpers import ROOT


def corpus(tmp_path, n=60):
    """A directory with a .jsonl and a .jsonl.gz file, an empty document and a malformed line."""
    docs = make_docs(n)
    d = tmp_path / "corpus"
    d.mkdir()
    write_jsonl(d / "a.jsonl", docs[: n // 2])
    with open(d / "a.jsonl", "a") as f:
        f.write("{not json\n")
    with gzip.open(d / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in docs[n // 2 :])
    return d, docs


def prepare(*args):
    """The command, in this process."""
    main([str(a) for a in args])


def cli(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", "moonlight.prepare_data", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def files(folder):
    return sorted(os.listdir(folder))


@pytest.mark.parametrize("tokenizer", ["byte", "tiktoken"])
@pytest.mark.parametrize("append_eos, add_eos", [(False, True), (False, False), (True, False)])
def test_megatron_files_read_back_as_the_jsonl(tmp_path, capsys, tokenizer, append_eos, add_eos):
    src, docs = corpus(tmp_path)
    spec = "byte" if tokenizer == "byte" else str(make_tiktoken_dir(tmp_path)[0])
    tok = build_tokenizer(spec)
    prepare(src, "--tokenizer", spec, "--out", tmp_path / "corpus_text", *(["--append-eos"] if append_eos else []))
    out = capsys.readouterr().out
    kept = [d for d in docs if d]
    assert f"wrote {len(kept)} documents" in out and "skipped 1 empty document, 1 malformed line (first: " in out
    assert f"data.add_eos = {'false' if append_eos else 'true'}" in out
    # the same documents, eos at the end of each when appended
    meg = load_documents(data_cfg(tmp_path / "corpus_text", "megatron"), tok)
    tail = [tok.eos_id] if append_eos else []
    assert [meg.document(j).tolist() for j in range(meg.num_documents)] == [tok.encode(d) + tail for d in kept]
    # the trainer's packed sequences: --append-eos + add_eos = false is jsonl with add_eos = true
    jsonl_loader = build_dataloader(data_cfg(src, add_eos=add_eos or append_eos), tok, 16, 2, seed=3)
    meg_loader = build_dataloader(data_cfg(tmp_path / "corpus_text", "megatron", add_eos=add_eos), tok, 16, 2, seed=3)
    want = all_sequences(jsonl_loader, 2 * jsonl_loader.sequences_per_epoch)
    assert np.array_equal(all_sequences(meg_loader, 2 * meg_loader.sequences_per_epoch), want)


def test_idx_bytes_are_megatrons_layout(tmp_path, capsys):
    docs = ["ab", "", "cde", "f"]
    write_jsonl(tmp_path / "d.jsonl", docs)
    prepare(tmp_path / "d.jsonl", "--tokenizer", "byte", "--out", tmp_path / "x", "--append-eos")
    assert "(uint16, eos appended)" in capsys.readouterr().out
    tokens = [list(b"ab") + [257], list(b"cde") + [257], list(b"f") + [257]]  # the empty one is left out
    lengths = [len(t) for t in tokens]
    pointers = [0, 2 * lengths[0], 2 * (lengths[0] + lengths[1])]
    assert (tmp_path / "x.idx").read_bytes() == mmididx_bytes(lengths, pointers, [0, 1, 2, 3], 8)
    assert (tmp_path / "x.bin").read_bytes() == np.array(sum(tokens, []), dtype="<u2").tobytes()
    assert files(tmp_path) == ["d.jsonl", "x.bin", "x.idx", "x.moonlight.json"]  # no temporary files left behind


class _Vocab:
    """A tokenizer's ids without its text: what token_dtype looks at."""

    def __init__(self, vocab_size, specials=(), eos_id=None):
        self.vocab_size, self.eos_id, self.bos_id = vocab_size, eos_id, None
        self.special_tokens = {f"<{i}>": i for i in specials}


def test_the_dtype_holds_every_id_of_the_tokenizer():
    assert token_dtype(_Vocab(65536)) == np.uint16
    assert token_dtype(_Vocab(65537)) == np.int32
    assert token_dtype(ByteTokenizer()) == np.uint16
    # specials past vocab_size (Megatron's rule, vocab_size < 65500, would pick uint16 and wrap them)
    assert token_dtype(_Vocab(60000, specials=[70000])) == np.int32
    assert token_dtype(_Vocab(60000, eos_id=65536)) == np.int32


class _Emits:
    """The byte tokenizer through encode_batch (the path of every tokenizer but "byte"), except that the
    text "bad" becomes `ids`, and call `fail_at` raises `fail`."""

    def __init__(self, ids=(), fail=None, fail_at=0):
        byte = ByteTokenizer()
        self.vocab_size, self.bos_id, self.eos_id, self.special_tokens = (
            byte.vocab_size,
            byte.bos_id,
            byte.eos_id,
            byte.special_tokens,
        )
        self.ids, self.fail, self.fail_at, self.calls = list(ids), fail, fail_at, 0

    def encode_batch(self, texts):
        self.calls += 1
        if self.calls == self.fail_at:
            raise self.fail
        return [self.ids if t == "bad" else list(t.encode()) for t in texts]


@pytest.fixture
def generic_path(monkeypatch):
    """Encode 2 texts per encode_batch call, so a run can fail part-way."""
    from moonlight.data import documents

    monkeypatch.setattr(documents, "ENCODE_CHUNK", 2)


def test_an_id_beyond_the_dtype_is_named_and_nothing_is_written(tmp_path, generic_path):
    write_jsonl(tmp_path / "d.jsonl", ["ok", "bad", "ok"])
    # an id past the tokenizer's vocab_size (266 -> uint16 files)
    with pytest.raises(ValueError, match=r"document 1 holds token id 70000, outside uint16's 0\.\.65535"):
        build_megatron_from_jsonl(str(tmp_path / "d.jsonl"), str(tmp_path / "x"), _Emits([1, 70000]))
    assert files(tmp_path) == ["d.jsonl"]


@pytest.mark.parametrize("fail", [KeyboardInterrupt(), OSError(28, "No space left on device")])
def test_an_interrupted_run_leaves_no_output_and_keeps_the_earlier_one(tmp_path, generic_path, fail):
    write_jsonl(tmp_path / "d.jsonl", ["one", "two", "three", "four", "five"])
    with pytest.raises(KeyboardInterrupt if isinstance(fail, KeyboardInterrupt) else ValueError):
        build_megatron_from_jsonl(str(tmp_path / "d.jsonl"), str(tmp_path / "x"), _Emits(fail=fail, fail_at=2))
    assert files(tmp_path) == ["d.jsonl"]
    build_megatron_from_jsonl(str(tmp_path / "d.jsonl"), str(tmp_path / "x"), _Emits())
    before = {f: (tmp_path / f).read_bytes() for f in ("x.bin", "x.idx")}
    write_jsonl(tmp_path / "d.jsonl", ["other", "text", "here", "and", "more"])
    with pytest.raises((KeyboardInterrupt, ValueError)):
        build_megatron_from_jsonl(
            str(tmp_path / "d.jsonl"), str(tmp_path / "x"), _Emits(fail=fail, fail_at=3), overwrite=True
        )
    assert files(tmp_path) == ["d.jsonl", "x.bin", "x.idx", "x.moonlight.json"]
    assert {f: (tmp_path / f).read_bytes() for f in before} == before


def test_overwrite_replaces_only_a_megatron_pair(tmp_path, capsys):
    write_jsonl(tmp_path / "d.jsonl", ["first"])
    prepare(tmp_path / "d.jsonl", "--tokenizer", "byte", "--out", tmp_path / "x")
    write_jsonl(tmp_path / "d.jsonl", ["second text"])
    with pytest.raises(SystemExit):
        prepare(tmp_path / "d.jsonl", "--tokenizer", "byte", "--out", tmp_path / "x")
    first = MegatronIndexedDataset(str(tmp_path / "x")).document(0)
    assert first.tobytes() == np.array(list(b"first"), "<u2").tobytes()
    prepare(tmp_path / "d.jsonl", "--tokenizer", "byte", "--out", tmp_path / "x", "--overwrite")
    assert bytes(MegatronIndexedDataset(str(tmp_path / "x")).document(0).astype(np.uint8)) == b"second text"
    # files it did not write: a lone .bin (say, model weights), a .bin beside an .idx of another format
    (tmp_path / "model.bin").write_bytes(b"weights")
    (tmp_path / "other.bin").write_bytes(b"data")
    (tmp_path / "other.idx").write_bytes(b"not megatron")
    for prefix in ("model", "other"):
        with pytest.raises(SystemExit):
            prepare(tmp_path / "d.jsonl", "--tokenizer", "byte", "--out", tmp_path / prefix, "--overwrite")
        assert "not a file this writer made" in capsys.readouterr().err
    assert (tmp_path / "model.bin").read_bytes() == b"weights"
    assert (tmp_path / "other.idx").read_bytes() == b"not megatron"
    assert not (tmp_path / "model.idx").exists()


def test_the_recipe_trains_on_the_files_as_on_the_jsonl(tmp_path):
    """data.format = "megatron" on files made with --append-eos (add_eos = false, as the 16B recipes) gives
    the losses of data.format = "jsonl" on the input."""
    src, _ = corpus(tmp_path, n=200)
    prepare(src, "--tokenizer", "byte", "--out", tmp_path / "corpus_text", "--append-eos")
    losses = {}
    for fmt, path, add_eos in (("jsonl", src, "true"), ("megatron", tmp_path / "corpus_text", "false")):
        run = tmp_path / fmt
        Trainer(
            load_config(
                "train.toml",
                SMALL
                + [
                    f"--job.dump_folder={run}",
                    "--training.steps=3",
                    f"--data.format={fmt}",
                    f"--data.path={path}",
                    f"--data.add_eos={add_eos}",
                ],
            )
        ).train()
        losses[fmt] = [r["loss"] for r in read_metrics(run)]
    assert len(losses["jsonl"]) == 3 and losses["megatron"] == losses["jsonl"]


def _no_eos_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    return tmp_path / "tokenizer.json"


def test_mistakes_are_one_error_line_and_write_nothing(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    good = write_jsonl(d / "good.jsonl", ["some text"])
    (d / "blank.jsonl").write_text("\n\n")
    (d / "broken.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    out = tmp_path / "out"
    out.mkdir()
    (out / "taken.bin").write_bytes(b"x")
    base = ["--tokenizer", "byte"]
    cases = {
        "no such input": ([d / "missing.jsonl", *base, "--out", out / "c"], "no jsonl files found"),
        "a bad tokenizer": ([good, "--tokenizer", tmp_path / "nope", "--out", out / "c"], "--tokenizer: "),
        "no documents": ([d / "blank.jsonl", *base, "--out", out / "c"], "no documents to write"),
        "a malformed line": (
            [d / "broken.jsonl", *base, "--out", out / "c", "--on-bad-line", "error"],
            "broken.jsonl:2: invalid JSON",
        ),
        "a missing output directory": ([good, *base, "--out", tmp_path / "nowhere" / "c"], "does not exist"),
        "a directory as the output": ([good, *base, "--out", out], "a directory; give a file prefix"),
        "an existing output": ([good, *base, "--out", out / "taken"], "pass --overwrite to replace"),
        "eos without an eos token": (
            [good, "--tokenizer", _no_eos_tokenizer(tmp_path), "--out", out / "c", "--append-eos"],
            "--append-eos",
        ),
    }
    for name, (args, message) in cases.items():
        proc = cli(*args)
        assert proc.returncode == 2, (name, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (name, proc.stderr)
        assert files(out) == ["taken.bin"], name
    # the line names the fix
    assert "set --on-bad-line skip" in cli(*cases["a malformed line"][0]).stderr
