"""Tokenizers and the packed data pipeline: formats, sharding, resume, malformed input."""

import json
import logging
import os

import numpy as np
import pytest
import torch

from moonlight.train.config import DataSection
from moonlight.errors import DataError
from moonlight.data.loader import build_dataloader, load_documents
from moonlight.data.documents import BadLineError
from moonlight.data.megatron import MegatronIndexedDataset, MegatronIndexedWriter, build_megatron_from_jsonl
from moonlight.data.tokenizer import ByteTokenizer, build_tokenizer
from tests.helpers import all_sequences, data_cfg, make_docs, make_tiktoken_dir, mmididx_bytes, write_jsonl
from tests.helpers import ROOT


# ------------------------------------------------------------------ tokenizers


def test_byte_tokenizer():
    tok = build_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (256, 257, 266)
    assert tok.special_tokens["<|im_end|>"] == 258 and tok.special_tokens["<|im_middle|>"] == 265
    text = "héllo 中文\n"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and tok.decode(ids) == text
    assert tok.decode([256] + ids + [257]) == "[BOS]" + text + "[EOS]"
    assert tok.decode([256] + ids + [257], skip_special_tokens=True) == text
    assert tok.encode_batch(["a", "bc"]) == [[97], [98, 99]]


def test_tiktoken_tokenizer_tiny_model(tmp_path):
    d, n = make_tiktoken_dir(tmp_path)
    tok = build_tokenizer(str(d))
    assert tok.bos_id == n and tok.eos_id == n + 1  # [BOS] first, [EOS] next (163584/163585 for real)
    assert tok.vocab_size == n + 258
    assert tok.special_tokens["[BOS]"] == n and tok.special_tokens["<|im_end|>"] == n + 2
    for text in ["the thing in the experts", "中文 and naïve text 12345\n\n  x", "[BOS] is plain text here", ""]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(i < n for i in ids)
    assert tok.encode("the")[0] == 258 and tok.encode(" the") == [259]  # merges are used
    assert tok.encode("中文") == [264]  # the Han run is one pre-token
    assert tok.decode([tok.bos_id] + tok.encode("x") + [tok.eos_id]) == "[BOS]x[EOS]"
    assert tok.decode([tok.bos_id] + tok.encode("x"), skip_special_tokens=True) == "x"
    assert tok.encode_batch(["the", "in"]) == [tok.encode("the"), tok.encode("in")]
    long = "word " * 10000 + " " * 30000 + "x" * 30000
    assert tok.decode(tok.encode(long)) == long
    # the ranks file itself also works as a spec
    assert build_tokenizer(str(d / "tiktoken.model")).eos_id == n + 1


def test_tiktoken_special_names_from_tokenizer_config(tmp_path):
    d, n = make_tiktoken_dir(tmp_path, with_config=True)
    tok = build_tokenizer(str(d))
    assert tok.bos_id == n and tok.eos_id == n + 1
    assert tok.special_tokens["<|bos|>"] == n and tok.special_tokens["<|im_end|>"] == n + 2
    assert tok.special_tokens[f"<|reserved_token_{n + 10}|>"] == n + 10


def test_hf_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4, "▁": 5}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.add_special_tokens(["<s>", "</s>"])
    t.save(str(tmp_path / "tokenizer.json"))
    tok = build_tokenizer(str(tmp_path))
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 6)
    assert tok.encode("hello world") == [3, 4]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "</s>", "eos_token": "<s>"}))
    tok = build_tokenizer(str(tmp_path / "tokenizer.json"))
    assert (tok.bos_id, tok.eos_id) == (2, 1)


def test_bad_tokenizer_spec(tmp_path):
    with pytest.raises(ValueError, match="not 'byte'"):
        build_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="neither tiktoken.model nor tokenizer.json"):
        build_tokenizer(str(tmp_path))


# ------------------------------------------------------------------ packing


def test_packing_matches_a_hand_built_stream(tmp_path):
    docs = make_docs()
    path = write_jsonl(tmp_path / "d.jsonl", docs)
    tok = ByteTokenizer()
    S = 16
    loader = build_dataloader(data_cfg(path, shuffle=False), tok, S, 2)
    stream, pos = [], []
    for d in docs:
        if d:
            ids = tok.encode(d) + [tok.eos_id]
            stream += ids
            pos += list(range(len(ids)))
    assert loader.tokens_per_epoch == len(stream)
    assert loader.sequences_per_epoch == (len(stream) - 1) // S
    for g in range(loader.sequences_per_epoch):
        w, p = loader.sequence(g)
        assert w.tolist() == stream[g * S : g * S + S + 1]
        # positions restart at each document start and at the window start
        exp = [0]
        for i in range(g * S + 1, g * S + S + 1):
            exp.append(0 if pos[i] == 0 else exp[-1] + 1)
        assert p.tolist() == exp
    b = loader.next_batch_with_info()
    assert b.inputs.dtype == torch.int64 and b.inputs.shape == (2, S) and b.labels.shape == (2, S)
    assert torch.equal(b.inputs[:, 1:], b.labels[:, :-1])
    assert b.inputs[0].tolist() == stream[:S] and b.labels[0].tolist() == stream[1 : S + 1]
    cu = b.cu_seqlens(0)
    assert cu[0] == 0 and cu[-1] == S and torch.all(cu[1:] > cu[:-1])


def test_add_bos(tmp_path):
    docs = ["abc", "de"]
    path = write_jsonl(tmp_path / "d.jsonl", docs * 3)
    loader = build_dataloader(data_cfg(path, shuffle=False, add_bos=True), ByteTokenizer(), 4, 1)
    assert loader.sequence(0)[0].tolist() == [256, 97, 98, 99, 257]
    assert loader.sequence(1)[0].tolist() == [257, 256, 100, 101, 257]
    assert loader.sequence(1)[1].tolist() == [0, 0, 1, 2, 3]


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """load_dataset() caches arrow files; keep them in tmp_path, not ~/.cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    return datasets


def test_every_format_gives_the_same_stream(tmp_path, hf_cache):
    datasets = hf_cache

    docs = make_docs(60)
    tok = ByteTokenizer()
    jsonl = write_jsonl(tmp_path / "d.jsonl", docs)
    # HF: save_to_disk, a parquet file and a DatasetDict with a split
    ds = datasets.Dataset.from_dict({"text": docs, "id": list(range(len(docs)))})
    ds.save_to_disk(str(tmp_path / "hf_disk"))
    (tmp_path / "pq").mkdir()
    ds.to_parquet(str(tmp_path / "pq" / "part-0.parquet"))
    datasets.DatasetDict({"validation": ds.select(range(3)), "train": ds}).save_to_disk(str(tmp_path / "hf_dict"))
    # Megatron: built from the jsonl
    built = build_megatron_from_jsonl(jsonl, str(tmp_path / "meg" / "corpus_text_document"), tok)
    assert (built.documents, built.empty) == (len(docs) - 1, 1)  # the empty document is left out

    cfgs = {
        "jsonl": data_cfg(jsonl),
        "jsonl_dir": data_cfg(tmp_path, "jsonl"),
        "hf_disk": data_cfg(tmp_path / "hf_disk", "hf"),
        "hf_dict": data_cfg(tmp_path / "hf_dict", "hf", split="train"),
        "hf_parquet": data_cfg(tmp_path / "pq", "hf"),
        "hf_jsonl": data_cfg(jsonl, "hf"),
        "megatron": data_cfg(tmp_path / "meg" / "corpus_text_document", "megatron"),
        "megatron_idx": data_cfg(tmp_path / "meg" / "corpus_text_document.idx", "megatron"),
        "megatron_dir": data_cfg(tmp_path / "meg", "megatron"),
    }
    ref = None
    for name, cfg in cfgs.items():
        loader = build_dataloader(cfg, tok, 32, 2, seed=5)
        seqs = all_sequences(loader, 2 * loader.sequences_per_epoch)  # two (shuffled) epochs
        if ref is None:
            ref = seqs
            assert loader.num_documents == len(docs) - 1
        else:
            assert seqs.shape == ref.shape and np.array_equal(seqs, ref), name
    with pytest.raises(ValueError, match="splits"):
        load_documents(data_cfg(tmp_path / "hf_dict", "hf", split="test"), tok)
    with pytest.raises(ValueError, match="no column"):
        load_documents(data_cfg(tmp_path / "hf_disk", "hf", text_key="body"), tok)


def test_megatron_reader_against_hand_written_index(tmp_path):
    # Two documents; the first has two sequences (sentence-split style), dtype uint16.
    seqs = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    doc_idx = [0, 2, 3]
    prefix = tmp_path / "x"
    flat = np.array(sum(seqs, []), dtype=np.uint16)
    flat.tofile(str(prefix) + ".bin")
    pointers = [0, 6, 10]
    with open(str(prefix) + ".idx", "wb") as f:
        f.write(mmididx_bytes([len(s) for s in seqs], pointers, doc_idx, 8))
    ds = MegatronIndexedDataset(str(prefix))
    assert ds.dtype == np.uint16 and len(ds) == 3 and ds.num_documents == 2
    assert ds[1].tolist() == [8, 9] and ds.document(0).tolist() == [5, 6, 7, 8, 9]
    loader = build_dataloader(data_cfg(prefix, "megatron", shuffle=False), ByteTokenizer(), 4, 1)
    assert loader.sequence(0)[0].tolist() == [5, 6, 7, 8, 9]
    assert loader.sequence(1)[0].tolist() == [9, 257, 10, 11, 12]
    # the writer produces the same bytes for the same layout
    with MegatronIndexedWriter(str(tmp_path / "y"), np.uint16) as w:
        for s in seqs:
            w.add_document(s)
    assert open(str(tmp_path / "y.bin"), "rb").read() == open(str(prefix) + ".bin", "rb").read()
    y = MegatronIndexedDataset(str(tmp_path / "y.idx"))
    assert y.document_indices.tolist() == [0, 1, 2, 3] and y.sequence_pointers.tolist() == pointers
    with open(str(tmp_path / "bad.idx"), "wb") as f:
        f.write(b"NOTMMIDX" + b"\x00" * 40)
    open(str(tmp_path / "bad.bin"), "wb").close()
    with pytest.raises(ValueError, match="not a Megatron MMIDIDX"):
        MegatronIndexedDataset(str(tmp_path / "bad"))


def test_tiktoken_tokenizer_in_the_pipeline(tmp_path):
    d, n = make_tiktoken_dir(tmp_path)
    tok = build_tokenizer(str(d))
    docs = make_docs(20)
    path = write_jsonl(tmp_path / "d.jsonl", docs)
    loader = build_dataloader(data_cfg(path, shuffle=False), tok, 8, 2)
    stream = sum((tok.encode(x) + [tok.eos_id] for x in docs if x), [])
    assert all_sequences(loader).reshape(-1, 9)[0].tolist() == stream[:9]
    build_megatron_from_jsonl(path, str(tmp_path / "m"), tok)
    meg = build_dataloader(data_cfg(tmp_path / "m", "megatron", shuffle=False), tok, 8, 2)
    assert np.array_equal(all_sequences(meg), all_sequences(loader))


# ------------------------------------------------------------------ sharding and resume


def test_dp_shards_interleave_to_the_single_rank_global_batch(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", make_docs(10))
    tok = ByteTokenizer()
    cfg = data_cfg(path)
    store = load_documents(cfg, tok)
    G, S, steps = 8, 16, 30  # several epochs

    def run(world, local):
        accum = G // (local * world)
        loaders = [build_dataloader(cfg, tok, S, local, r, world, seed=3, store=store) for r in range(world)]
        out = []
        for _ in range(steps):
            step = []
            for _ in range(accum):
                batches = [ld.next_batch() for ld in loaders]
                step.append(torch.cat([b[0] for b in batches]))  # rank order
                labels = torch.cat([b[1] for b in batches])
                assert torch.equal(step[-1][:, 1:], labels[:, :-1])
            out.append(torch.cat(step))
        return out, loaders

    ref, ref_loaders = run(1, 8)
    assert ref_loaders[0].epoch >= 2  # the corpus wrapped around
    for world, local in [(1, 4), (2, 4), (2, 2), (4, 1), (8, 1), (2, 1)]:
        got, loaders = run(world, local)
        for k in range(steps):
            assert torch.equal(got[k], ref[k]), (world, local, k)
        assert all(ld.consumed == steps * G for ld in loaders)
    # ranks of one micro-step hold disjoint sequences
    a = build_dataloader(cfg, tok, S, 4, 0, 2, seed=3, store=store).next_batch_with_info()
    b = build_dataloader(cfg, tok, S, 4, 1, 2, seed=3, store=store).next_batch_with_info()
    assert a.global_indices == [0, 1, 2, 3] and b.global_indices == [4, 5, 6, 7]


def test_epochs_reshuffle_and_are_recorded(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", make_docs(30))
    tok = ByteTokenizer()
    loader = build_dataloader(data_cfg(path), tok, 16, 1, seed=1)
    n = loader.sequences_per_epoch
    e0 = all_sequences(loader, n)
    e1 = np.stack([loader.sequence(n + g)[0] for g in range(n)])
    assert not np.array_equal(e0, e1)  # a new document order
    for _ in range(n):
        loader.next_batch()
    assert loader.epoch == 1 and loader.state_dict()["epoch"] == 1
    unshuffled = build_dataloader(data_cfg(path, shuffle=False), tok, 16, 1)
    assert np.array_equal(unshuffled.sequence(0)[0], unshuffled.sequence(unshuffled.sequences_per_epoch)[0])
    other_seed = build_dataloader(data_cfg(path), tok, 16, 1, seed=2)
    assert not np.array_equal(all_sequences(other_seed, n), e0)


def test_state_dict_resume(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", make_docs(50))
    tok = ByteTokenizer()
    cfg = data_cfg(path)
    a = build_dataloader(cfg, tok, 16, 4, 1, 2, seed=7)
    n_batches = a.sequences_per_epoch // 8 + 3  # resume point after an epoch boundary
    for _ in range(n_batches):
        a.next_batch()
    state = a.state_dict()
    assert state["epoch"] >= 1
    expected = [a.next_batch() for _ in range(5)]
    b = build_dataloader(cfg, tok, 16, 4, 1, 2, seed=7)
    b.load_state_dict(json.loads(json.dumps(state)))  # plain ints survive any serializer
    for x, y in zip(expected, (b.next_batch() for _ in range(5))):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    # tensors in the state (as DCP may return) are accepted too
    c = build_dataloader(cfg, tok, 16, 4, 1, 2, seed=7)
    c.load_state_dict({k: torch.tensor(v) for k, v in state.items()})
    assert torch.equal(c.next_batch()[0], expected[0][0])
    # resuming on one rank with a larger micro-batch continues the same global stream
    d = build_dataloader(cfg, tok, 16, 8, 0, 1, seed=7)
    d.load_state_dict(state)
    assert torch.equal(d.next_batch()[0][4:], expected[0][0])
    with pytest.raises(ValueError, match="seq_len"):
        build_dataloader(cfg, tok, 32, 4, seed=7).load_state_dict(state)


def test_resume_with_other_corpus_warns(tmp_path, caplog):
    tok = ByteTokenizer()
    a = build_dataloader(data_cfg(write_jsonl(tmp_path / "a.jsonl", make_docs(20, 1))), tok, 8, 1)
    b = build_dataloader(data_cfg(write_jsonl(tmp_path / "b.jsonl", make_docs(20, 2))), tok, 8, 1)
    with caplog.at_level(logging.WARNING, logger="moonlight.data.loader"):
        b.load_state_dict(a.state_dict())
    assert "different corpus" in caplog.text


def test_corpus_too_small(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["ab"])
    with pytest.raises(ValueError, match="fewer than one sequence"):
        build_dataloader(data_cfg(path), ByteTokenizer(), 8, 1)


# ------------------------------------------------------------------ malformed input


def write_bad_jsonl(tmp_path):
    lines = [
        json.dumps({"text": "good one"}),  # 1
        '{"text": "broken',  # 2 invalid JSON
        json.dumps({"body": "no text key"}),  # 3 missing key
        "",  # 4 blank: ignored silently
        json.dumps({"text": 42}),  # 5 not a string
        json.dumps(["text"]),  # 6 not an object
        json.dumps({"text": "good two"}),  # 7
    ]
    p = tmp_path / "bad.jsonl"
    p.write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "\xff\xfe"}\n')  # 8 invalid UTF-8
    return str(p)


def test_malformed_lines_skip(tmp_path, caplog):
    path = write_bad_jsonl(tmp_path)
    with caplog.at_level(logging.WARNING, logger="moonlight.data.loader"):
        loader = build_dataloader(data_cfg(path, on_bad_line="skip", shuffle=False), ByteTokenizer(), 4, 1)
    assert loader.num_bad_lines == 5 and loader.num_documents == 2
    bad = loader.bad_lines
    assert [b.split(": ")[0] for b in bad] == [f"{path}:{i}" for i in (2, 3, 5, 6, 8)]
    assert "invalid JSON" in bad[0] and "missing text field 'text'" in bad[1] and "int, not a string" in bad[2]
    assert "expected a JSON object" in bad[3] and "invalid UTF-8" in bad[4]
    assert f"{path}:2" in caplog.text and "skipped 5 malformed record(s)" in caplog.text
    assert ByteTokenizer().decode(loader.sequence(0)[0].tolist()) == "good "


def test_malformed_lines_error(tmp_path):
    path = write_bad_jsonl(tmp_path)
    with pytest.raises(BadLineError, match=rf"^{path}:2: invalid JSON"):
        build_dataloader(data_cfg(path, on_bad_line="error"), ByteTokenizer(), 4, 1)
    with pytest.raises(BadLineError, match=rf"^{path}:2: invalid JSON"):
        build_megatron_from_jsonl(path, str(tmp_path / "m"), ByteTokenizer(), on_bad_line="error")
    # fix line 2: the next problem (line 3) is reported
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    lines[1] = b""
    with open(path, "wb") as f:
        f.write(b"\n".join(lines))
    with pytest.raises(BadLineError, match=rf"^{path}:3: missing text field 'text'"):
        build_dataloader(data_cfg(path, on_bad_line="error"), ByteTokenizer(), 4, 1)


def test_hf_non_string_rows(tmp_path, hf_cache):
    datasets = hf_cache

    datasets.Dataset.from_dict({"text": ["good text here", None, "more good text"]}).save_to_disk(str(tmp_path / "h"))
    loader = build_dataloader(data_cfg(tmp_path / "h", "hf"), ByteTokenizer(), 4, 1)
    assert loader.num_bad_lines == 1 and ":row 2" in loader.bad_lines[0]
    with pytest.raises(BadLineError, match="row 2"):
        build_dataloader(data_cfg(tmp_path / "h", "hf", on_bad_line="error"), ByteTokenizer(), 4, 1)


def test_hf_unreadable_files_are_named(tmp_path, hf_cache):
    """Fault: a malformed json/csv file or saved dataset under data.format = "hf" was the parser's traceback."""
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "a.jsonl").write_text('{"text": "abc"\n')
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.csv").write_text('text,b\n1,2,3\n"x\n')
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "state.json").write_text("{")
    for name, what in (
        ("j", "its files cannot be read as a dataset"),
        ("c", "its files cannot be read as a dataset"),
        ("s", "not a readable saved dataset"),
    ):
        with pytest.raises(DataError, match=rf"^data.path '{tmp_path / name}': {what} \("):
            build_dataloader(data_cfg(tmp_path / name, "hf"), ByteTokenizer(), 4, 1)


def test_missing_paths(tmp_path):
    with pytest.raises(DataError, match="no jsonl files"):
        build_dataloader(data_cfg(tmp_path / "nothing*.jsonl"), ByteTokenizer(), 4, 1)
    with pytest.raises(DataError, match="Megatron"):
        build_dataloader(data_cfg(tmp_path / "nothing", "megatron"), ByteTokenizer(), 4, 1)


def test_shipped_corpus_loads_quickly():
    import time

    t = time.perf_counter()
    cfg = DataSection()  # the default points at the shipped corpus
    cfg.path = os.path.join(ROOT, cfg.path)
    loader = build_dataloader(cfg, build_tokenizer(cfg.tokenizer), 256, 4, 0, 1, seed=0)
    inputs, labels = loader.next_batch()
    assert time.perf_counter() - t < 5
    assert loader.num_bad_lines == 0 and loader.num_documents > 2500
    assert 2_000_000 < loader.tokens_per_epoch < 5_000_000
    assert inputs.shape == (4, 256) and int(inputs.max()) < 258
    text = ByteTokenizer().decode(inputs.flatten().tolist())
    assert sum(c.isalpha() or c == " " for c in text) / len(text) > 0.7  # mostly English prose
    assert os.path.exists(os.path.join(ROOT, "data", "README.md"))
