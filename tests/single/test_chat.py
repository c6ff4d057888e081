"""Chat data: rendering (built-in Moonlight format, jinja templates against transformers'
apply_chat_template), assistant-only targets, whole-conversation packing, overflow, bad conversations,
resume and sharding of the loader, config errors, and a loss normalized by the step's global target
count (checked against one big batch)."""

import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moonlight.errors import DataError
from moonlight.data.chat import ChatTemplate, load_chat_template
from moonlight.train.config import load_config
from moonlight.data.loader import ChatDataLoader, build_dataloader, load_documents
from moonlight.data.tokenizer import DEFAULT_ADDITIONAL_SPECIALS, ByteTokenizer, build_tokenizer
from tests.helpers import chat_conversations, write_chat
from tests.helpers import MULTI_TURN, chat_cfg, chat_tiktoken_dir
from tests.helpers import chat_trainer

FACTS_EXAMPLE = [
    {"role": "system", "content": "You are a helpful assistant provided by Moonshot-AI."},
    {"role": "user", "content": "Is 123 a prime?"},
    {"role": "assistant", "content": "No, 123 = 3 x 41."},
]
FACTS_TEXT = (
    "<|im_system|>system<|im_middle|>You are a helpful assistant provided by Moonshot-AI.<|im_end|>"
    "<|im_user|>user<|im_middle|>Is 123 a prime?<|im_end|>"
    "<|im_assistant|>assistant<|im_middle|>No, 123 = 3 x 41.<|im_end|>"
)
# The built-in format as a jinja template (as a tokenizer_config.json would carry it).
MOONLIGHT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|im_{{ message['role'] }}|>{{ message['role'] }}<|im_middle|>{{ message['content'] }}<|im_end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}"
)
# A template with a default system turn and transformers' {% generation %} assistant markers.
MARKED_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}<|im_system|>system<|im_middle|>Be brief.<|im_end|>{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "<|im_assistant|>assistant<|im_middle|>{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
    "{%- else -%}<|im_{{ m['role'] }}|>{{ m['role'] }}<|im_middle|>{{ m['content'] }}<|im_end|>{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}"
)


def _target_text(tok, ids, targets):
    return tok.decode([i for i, t in zip(ids, targets) if t])


# ------------------------------------------------------------------ rendering


def test_builtin_format_is_the_moonlight_instruct_format():
    tok = ByteTokenizer()
    ids, targets = load_chat_template("byte", tok).encode(FACTS_EXAMPLE)
    assert tok.decode(ids) == FACTS_TEXT
    assert _target_text(tok, ids, targets) == "No, 123 = 3 x 41.<|im_end|>"
    # the assistant's role token, role name and <|im_middle|> are prompt; targets are one contiguous tail
    first = targets.index(True)
    assert tok.decode(ids[:first]).endswith("<|im_assistant|>assistant<|im_middle|>") and all(targets[first:])


@pytest.mark.parametrize("conversation", [FACTS_EXAMPLE, MULTI_TURN])
def test_jinja_moonlight_template_gives_the_builtin_tokens_and_targets(tmp_path, conversation):
    tok = build_tokenizer(str(chat_tiktoken_dir(tmp_path, MOONLIGHT_TEMPLATE)))
    template = load_chat_template(str(tmp_path), tok)
    assert template.render(conversation) == "".join(
        f"<|im_{m['role']}|>{m['role']}<|im_middle|>{m['content']}<|im_end|>" for m in conversation
    )
    jinja_ids, jinja_targets = template.encode(conversation)
    builtin_ids, builtin_targets = ChatTemplate(tok).encode(conversation)
    assert jinja_ids == builtin_ids and jinja_targets == builtin_targets
    assert tok.special_tokens["<|im_end|>"] == 266  # the ids of tokenizer_config.json (264 ranks + 2)


def _hf_tokenizer_dir(tmp_path, template):
    """A byte-level BPE tokenizer.json with the chat tokens added, plus its tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    merges = [("t", "h"), ("th", "e"), ("Ġ", "the"), ("e", "x"), ("p", "er"), ("e", "r")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    t = Tokenizer(models.BPE(vocab, merges))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens(["[BOS]", "[EOS]"] + DEFAULT_ADDITIONAL_SPECIALS)
    t.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "[BOS]", "eos_token": "<|im_end|>", "chat_template": template})
    )
    return tmp_path


def test_jinja_template_matches_transformers_apply_chat_template(tmp_path):
    """Rendered text, token ids and the assistant mask equal transformers' (its mask comes from the
    template's {% generation %} markers; ours from prefix rendering), default system turn included."""
    import transformers

    folder = _hf_tokenizer_dir(tmp_path, MARKED_TEMPLATE)
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"), chat_template=MARKED_TEMPLATE
    )
    ours = load_chat_template(str(folder), build_tokenizer(str(folder)))
    for conversation in (MULTI_TURN, FACTS_EXAMPLE):
        assert ours.render(conversation) == hf.apply_chat_template(conversation, tokenize=False)
        assert ours.render(conversation[:1], add_generation_prompt=True) == hf.apply_chat_template(
            conversation[:1], tokenize=False, add_generation_prompt=True
        )
        out = hf.apply_chat_template(conversation, return_dict=True, return_assistant_tokens_mask=True)
        ids, targets = ours.encode(conversation)
        assert ids == out["input_ids"]
        assert [int(t) for t in targets] == out["assistant_masks"]


def test_template_that_rewrites_earlier_turns_is_rejected(tmp_path):
    rewriting = (
        "{%- for m in messages -%}<|im_{{ m['role'] }}|>{{ m['content'] }}{{ messages|length }}<|im_end|>{%- endfor -%}"
    )
    tok = build_tokenizer(str(chat_tiktoken_dir(tmp_path, rewriting)))
    with pytest.raises(DataError, match="appending turns"):
        load_chat_template(str(tmp_path), tok).encode(MULTI_TURN)


# ------------------------------------------------------------------ loader


def test_packing_keeps_conversations_whole_and_labels_only_assistant_turns(tmp_path):
    rows = chat_conversations(30)
    tok = ByteTokenizer()
    loader = build_dataloader(chat_cfg(write_chat(tmp_path / "c.jsonl", rows)), tok, 160, 2)
    assert isinstance(loader, ChatDataLoader) and loader.num_truncated == 0
    template = load_chat_template("byte", tok)
    expected = {}
    for r in rows:
        ids, targets = template.encode(r["messages"])
        expected[tuple(ids)] = targets
    seen = []
    for g in range(loader.sequences_per_epoch):
        inputs, labels, positions = loader.row(g)
        tokens, flags, _ = loader.window(g)
        starts = list(np.flatnonzero(positions == 0)) + [len(positions)]
        for a, b in zip(starts[:-1], starts[1:]):  # each document of the row
            doc = tuple(tokens[a : b + (b == len(positions))].tolist())
            if doc in expected:  # a whole conversation (else: the padding tail)
                seen.append(doc)
                want = np.where(expected[doc][1:], np.array(doc[1:]), -100)
                assert np.array_equal(labels[a : a + len(doc) - 1], want)
            else:
                assert set(doc) == {tok.eos_id} and (labels[a:] == -100).all()
    assert sorted(seen) == sorted(expected)  # every conversation once per epoch, never split


def test_overflow_truncates_or_drops_and_reports(tmp_path, caplog):
    rows = chat_conversations(12)
    rows[3]["messages"][-1]["content"] = "long " * 40
    cfg = chat_cfg(write_chat(tmp_path / "c.jsonl", rows))
    tok = ByteTokenizer()
    store = load_documents(cfg, tok)
    j = int(np.argmax(store.lengths))
    seq_len = int(np.sort(store.lengths)[-2]) - 1  # every other conversation just fits seq_len + 1
    with caplog.at_level(logging.INFO, logger="moonlight.data.loader"):
        truncating = build_dataloader(cfg, tok, seq_len, 1, store=store)
        cfg.chat_overflow = "drop"
        dropping = build_dataloader(cfg, tok, seq_len, 1, store=store)
    assert truncating.num_truncated == 1 and dropping.num_dropped == 1
    assert "1 longer than that were truncated" in caplog.text and "1 longer than that were dropped" in caplog.text
    assert any(
        np.array_equal(truncating.window(g)[0][: seq_len + 1], store.document(j)[: seq_len + 1])
        for g in range(truncating.sequences_per_epoch)
    )
    assert sorted(k for r in dropping.rows for k in r) == [k for k in range(12) if k != j]


def test_bad_conversations_are_skipped_and_counted(tmp_path):
    rows = chat_conversations(4) + [
        {"messages": [{"role": "robot", "content": "x"}]},
        {"messages": [{"role": "user", "content": "no answer"}]},
        {"messages": "hi"},
        {"messages": []},
    ]
    store = load_documents(chat_cfg(write_chat(tmp_path / "c.jsonl", rows)), ByteTokenizer())
    assert store.num_documents == 4 and store.num_bad_lines == 4
    assert "role 'robot'" in store.bad_lines[0] and "no assistant message" in store.bad_lines[1]
    assert store.bad_lines[2].endswith("non-empty list, got str") and store.bad_lines[3].endswith("got []")


@pytest.mark.parametrize(
    "rows", [[], [{"messages": [{"role": "user", "content": "no answer"}]}]], ids=["empty", "all_skipped"]
)
def test_no_usable_conversation_is_named_as_such(tmp_path, rows):
    """It was blamed on the length (raise seq_len or truncate), which chat_overflow = "truncate" already is."""
    cfg = chat_cfg(write_chat(tmp_path / "c.jsonl", rows))
    with pytest.raises(DataError, match="no conversations to train on .*every record was skipped"):
        build_dataloader(cfg, ByteTokenizer(), 64, 1)


def test_hf_dataset_with_a_custom_messages_column(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")  # load_dataset's cache
    rows = chat_conversations(6)
    datasets.Dataset.from_list([{"conv": r["messages"]} for r in rows]).save_to_disk(str(tmp_path / "ds"))
    (tmp_path / "pq").mkdir()  # data files, not a saved dataset: were refused as "no jsonl files found"
    datasets.Dataset.from_list([{"conv": r["messages"]} for r in rows]).to_parquet(str(tmp_path / "pq" / "a.parquet"))
    jsonl = load_documents(chat_cfg(write_chat(tmp_path / "c.jsonl", rows)), ByteTokenizer())
    for hf in ("ds", "pq"):
        store = load_documents(chat_cfg(tmp_path / hf, messages_key="conv"), ByteTokenizer())
        assert np.array_equal(store.tokens[0], jsonl.tokens[0]) and np.array_equal(store.targets[0], jsonl.targets[0])
    with pytest.raises(DataError, match=r"no column data\.messages_key='messages' \(columns: \['conv'\]\)"):
        load_documents(chat_cfg(tmp_path / "ds"), ByteTokenizer())  # was named data.text_key


def test_chat_loader_resumes_and_shards(tmp_path):
    path = write_chat(tmp_path / "c.jsonl", chat_conversations(40))
    tok = ByteTokenizer()
    cfg = chat_cfg(path)
    a = build_dataloader(cfg, tok, 64, 2, seed=5)
    for _ in range(3):
        a.next_batch()
    b = build_dataloader(cfg, tok, 64, 2, seed=5)
    b.load_state_dict(a.state_dict())
    for _ in range(a.sequences_per_epoch):  # across the epoch boundary too
        x, y = a.next_batch_with_info(), b.next_batch_with_info()
        assert torch.equal(x.inputs, y.inputs) and torch.equal(x.labels, y.labels)
        assert torch.equal(x.position_ids, y.position_ids)
    one = build_dataloader(cfg, tok, 64, 4, seed=5).next_batch()
    halves = [build_dataloader(cfg, tok, 64, 2, r, 2, seed=5).next_batch() for r in range(2)]
    assert torch.equal(one[1], torch.cat([h[1] for h in halves]))


def test_loss_and_grads_are_those_of_one_big_batch(tmp_path):
    """Grad accumulation 4 over micro-batches with different target counts gives the loss and the
    gradients of the whole step's batch in one forward: sum of CE over targets / number of targets."""
    data = write_chat(tmp_path / "c.jsonl", chat_conversations(24))
    trainer = chat_trainer(tmp_path / "run", data, ["--training.local_batch_size=1", "--moe.aux_loss_coeff=0"])
    assert trainer.grad_accum == 4
    counts = [int((trainer.dataloader.row(g)[1] != -100).sum()) for g in range(4)]
    assert len(set(counts)) > 1  # uneven, so a mean of means would differ
    model = trainer.model_parts[0]
    loss = float(trainer._forward_backward())
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    rows = [trainer.dataloader.row(g) for g in range(4)]
    inputs, labels, positions = (torch.from_numpy(np.stack(x)) for x in zip(*rows))
    documents = (positions == 0).cumsum(1)
    logits = model(inputs, positions=positions, document_ids=documents)
    big = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum") / sum(counts)
    big.backward()
    assert loss == pytest.approx(float(big.detach()), rel=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-6, rtol=1e-4, msg=lambda m: f"{n}: {m}")


def test_shipped_sample_renders_every_conversation_in_the_debug_job():
    cfg = load_config("configs/debug-chat-sft.toml", [])
    tok = build_tokenizer(cfg.data.tokenizer)
    loader = build_dataloader(cfg.data, tok, cfg.training.seq_len, cfg.training.local_batch_size)
    store = loader.store
    assert store.num_documents == 40 and store.num_bad_lines == 0
    assert int(store.tokens[0].max()) < 320  # the debug model's vocab
    assert loader.num_truncated <= 2 and sum(map(len, loader.rows)) == 40


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data.chat_overflow=bogus"], "expects one of 'truncate', 'drop'"),
        (["--data.format=chat", "--data.messages_key="], "data.messages_key must not be empty"),
    ],
)
def test_chat_config_errors(args, message):
    from moonlight.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config("train.toml", args).validate()


def test_builtin_format_needs_the_chat_tokens():
    class PlainTokenizer:  # no special tokens at all
        special_tokens: dict = {}

        def encode(self, text):
            return list(text.encode())

    with pytest.raises(DataError, match="has no <\\|im_system\\|>"):
        ChatTemplate(PlainTokenizer())
