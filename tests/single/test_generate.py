"""Generation: greedy tokens equal transformers' generate, the latent cache equals a full recompute,
nucleus sampling keeps what transformers' TopPLogitsWarper keeps, and the command line."""

import os
import warnings

import pytest
import torch
import transformers

from moonlight import Moonlight
from moonlight.hf import load_hf, save_hf
from moonlight.generate import (
    LatentCache,
    cache_bytes_per_token,
    decode,
    generate,
    main,
    pad_left,
    per_head_kv_bytes_per_token,
    prefill,
    sample_next,
)
from tests.hf_reference import make_hf_model, min_topk_gap
from tests.helpers import make_tiktoken_dir
from tests.helpers import tiny_args

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [20, 21, 22, 23, 24]]
NEW = 10


def _stable_hf_generation(prompts, new_tokens):
    """A float32 HF model (transformers' float64 generate gives NaN on left-padded rows) whose greedy
    run has no near-ties: router top-k gaps and the top-2 logit gaps all above 1e-4."""
    ids, mask = pad_left(prompts, pad_id=1)
    for seed in range(20):
        hf = make_hf_model("moonlight", seed, dtype=torch.float32)
        out = hf.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=1,
            output_scores=True,
            return_dict_in_generate=True,
        )
        top2 = torch.stack(out.scores, 1).topk(2, dim=-1).values
        rows = [seq[len(ids[0]) - len(p) :] for seq, p in zip(out.sequences, prompts)]
        if (top2[..., 0] - top2[..., 1]).min() > 1e-4 and min(min_topk_gap(hf, r[None]) for r in rows) > 1e-4:
            return hf, out.sequences
    raise RuntimeError("no seed without near-ties")


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
    hf, sequences = _stable_hf_generation(PROMPTS, NEW)
    path = tmp_path_factory.mktemp("gen") / "hf"
    hf.save_pretrained(path)
    return hf, load_hf(path, dtype=torch.float32, kernels="torch").eval(), sequences


def test_greedy_equals_transformers_generate_on_a_left_padded_batch(hf_and_ours):
    hf, ours, sequences = hf_and_ours
    ids, mask = pad_left(PROMPTS, pad_id=1)
    out = generate(ours, ids, NEW, attention_mask=mask)
    assert out.shape == (3, ids.shape[1] + NEW)
    assert torch.equal(out, sequences)

    # Stop at eos: pick a token row 0 emits at its 3rd step; finished rows are filled with eos.
    eos = int(sequences[0, ids.shape[1] + 2])
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    ref = torch.cat([ref, ref.new_full((3, out.shape[1] - ref.shape[1]), eos)], dim=1)  # HF stops when all end
    out = generate(ours, ids, NEW, eos_token_id=eos, attention_mask=mask)
    assert torch.equal(out, ref)
    assert (out[0, ids.shape[1] + 2 :] == eos).all()


@pytest.mark.parametrize("q_lora_rank", [None, 20])
def test_cached_logits_equal_full_recompute_at_every_step(q_lora_rank):
    torch.manual_seed(0)
    model = Moonlight(tiny_args(q_lora_rank=q_lora_rank))
    model.init_weights(std=0.1)
    prompts = [[3, 4, 5, 6, 7], [8, 9]]
    ids, mask = pad_left(prompts)
    cache = LatentCache(model.args, 2, ids.shape[1] + 8, torch.float32, "cpu")
    logits = prefill(model, ids, cache, mask)  # the whole prompt at once
    rows = [torch.tensor(p) for p in prompts]
    for _ in range(8):
        for row, seq in enumerate(rows):  # uncached: the model's own forward over the unpadded row
            torch.testing.assert_close(logits[row], model(seq[None])[0, -1], atol=1e-4, rtol=1e-3)
        token = logits.argmax(-1)
        rows = [torch.cat([seq, token[i : i + 1]]) for i, seq in enumerate(rows)]
        with torch.no_grad():
            logits = decode(model, token, cache)


def test_generating_past_the_trained_positions_warns():
    torch.manual_seed(0)
    model = Moonlight(tiny_args(max_position_embeddings=8))
    model.init_weights(std=0.1)
    prompt = torch.tensor([[3, 4, 5]])
    with pytest.warns(UserWarning, match="= 9 tokens exceeds the model's max_position_embeddings = 8"):
        generate(model, prompt, max_new_tokens=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate(model, prompt, max_new_tokens=5)


def test_cache_bytes_per_token_is_latent_plus_rope_key(hf_and_ours):
    hf, ours, _ = hf_and_ours
    args = ours.args
    for dtype in (torch.float32, torch.bfloat16):
        expected = (args.kv_lora_rank + args.qk_rope_head_dim) * dtype.itemsize * args.num_hidden_layers
        assert cache_bytes_per_token(args, dtype) == expected
        assert LatentCache(args, 3, 7, dtype, "cpu").nbytes == 3 * 7 * expected
    # transformers 5.x caches the same two latents per token (it re-expands them to per-head K/V every
    # step); a per-head K/V cache holds num_heads * (qk_head_dim + v_head_dim) values a layer instead.
    tokens = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        cache = hf(tokens, use_cache=True).cache
    hf_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert hf_bytes == len(PROMPTS[0]) * cache_bytes_per_token(args, torch.float32)
    per_head = args.num_hidden_layers * args.num_attention_heads * (args.qk_head_dim + args.v_head_dim) * 4
    assert per_head_kv_bytes_per_token(args, torch.float32) == per_head


def test_top_p_keeps_what_transformers_keeps_and_samples_its_renormalised_mass():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    for top_p in (0.3, 0.8, 0.95):
        kept = transformers.TopPLogitsWarper(top_p)(None, logits.clone()) > float("-inf")
        draws = torch.stack([sample_next(logits, 1.0, top_p, torch.Generator().manual_seed(s)) for s in range(300)])
        seen = torch.zeros_like(kept).scatter_(1, draws.T, True)
        assert not (seen & ~kept).any()  # never outside the nucleus
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()  # top_p 0.7 keeps {0, 1}: 0.625 / 0.375
    draws = sample_next(probs.expand(20000, -1), 1.0, 0.7, torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0, 1}
    assert abs((draws == 0).float().mean().item() - 0.625) < 0.015
    a = sample_next(logits, 0.7, 0.9, torch.Generator().manual_seed(5))
    assert torch.equal(a, sample_next(logits, 0.7, 0.9, torch.Generator().manual_seed(5)))
    assert torch.equal(sample_next(logits, 1.0, 1e-6), logits.argmax(-1))  # a tiny nucleus is greedy


# ---------------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny model with a tiny tiktoken tokenizer (268 ranks + 258 specials) in the same directory."""
    root = tmp_path_factory.mktemp("cli")
    tok_dir, _ = make_tiktoken_dir(root)
    torch.manual_seed(0)
    model = Moonlight(tiny_args(vocab_size=528))
    model.init_weights(std=0.1)
    save_hf(model, root / "model")
    (root / "model" / "tiktoken.model").write_bytes((tok_dir / "tiktoken.model").read_bytes())
    return root / "model"


def _run(capsys, argv):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("chat", [False, True])
def test_cli_greedy_output_equals_the_python_api(tiny_model_dir, capsys, chat):
    from moonlight.generate import chat_prompt
    from moonlight.data.tokenizer import build_tokenizer

    argv = ["--hf", str(tiny_model_dir), "--prompt", "the thing in", "--max-new-tokens", "12"]
    code, out, err = _run(capsys, argv + (["--chat"] if chat else []))
    assert code == 0, err
    tok = build_tokenizer(str(tiny_model_dir))
    prompt, eos = chat_prompt(tok, "the thing in") if chat else (tok.encode("the thing in"), tok.eos_id)
    model = load_hf(tiny_model_dir)
    new = generate(model, torch.tensor([prompt]), 12, eos_token_id=eos)[0, len(prompt) :].tolist()
    new = new[: new.index(eos)] if eos in new else new
    assert out == tok.decode(new) + "\n"


def test_cli_chat_reply_ends_at_the_end_of_document_token(tiny_model_dir, capsys, monkeypatch):
    """--chat stops at <|im_end|> and also at the tokenizer's EOS: what follows it is another document,
    which the CLI printed after an "[EOS]" before."""
    from moonlight.data.tokenizer import build_tokenizer

    tok = build_tokenizer(str(tiny_model_dir))
    tokens = [*tok.encode("yes"), tok.eos_id, *tok.encode("other text")]
    monkeypatch.setattr("moonlight.generate.generate_stream", lambda *a, **k: (torch.tensor([t]) for t in tokens))
    code, out, err = _run(capsys, ["--hf", str(tiny_model_dir), "--chat", "--prompt", "hi"])
    assert code == 0 and out == "yes\n", (out, err)


def test_chat_prompt_renders_moonlight_instruct_format(tiny_model_dir):
    from moonlight.generate import chat_prompt
    from moonlight.data.tokenizer import build_tokenizer

    tok = build_tokenizer(str(tiny_model_dir))
    ids, eos = chat_prompt(tok, "hi")
    assert tok.decode(ids) == "<|im_user|>user<|im_middle|>hi<|im_end|><|im_assistant|>assistant<|im_middle|>"
    assert eos == tok.special_tokens["<|im_end|>"]
    ids, _ = chat_prompt(tok, "Is 123 a prime?", system="Be brief.")
    assert tok.decode(ids) == (
        "<|im_system|>system<|im_middle|>Be brief.<|im_end|><|im_user|>user<|im_middle|>"
        "Is 123 a prime?<|im_end|><|im_assistant|>assistant<|im_middle|>"
    )


def test_cli_takes_the_dtype_spellings_of_configs(tiny_model_dir, capsys):
    """--dtype bf16 is what [training] and convert accept too: the same reply as --dtype bfloat16."""
    argv = ["--hf", str(tiny_model_dir), "--prompt", "hello", "--max-new-tokens", "4"]
    replies = [_run(capsys, argv + ["--dtype", d]) for d in ("bf16", "bfloat16")]
    assert replies[0][0] == 0 and replies[0][1] == replies[1][1]


def test_cli_sampling_is_seeded(tiny_model_dir, capsys):
    argv = ["--hf", str(tiny_model_dir), "--prompt", "the", "--max-new-tokens", "8", "--temperature", "1.5"]
    runs = [_run(capsys, argv + ["--seed", s])[1] for s in ("1", "1", "2")]
    assert runs[0] == runs[1] and runs[0] != runs[2]


# one past the accelerator's last device (cuda:0 where torch has none): missing on every machine
_ACCELERATOR = torch.accelerator.current_accelerator()
_MISSING_DEVICE = f"{_ACCELERATOR.type if _ACCELERATOR else 'cuda'}:{torch.accelerator.device_count()}"


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--temperature", "-1"], "--temperature must be >= 0"),
        (["--top-p", "1.5"], "--top-p must be in"),
        (["--step", "3"], "--step applies to --dcp"),
        (["--system", "s"], "--system applies to --chat"),
        (["--max-new-tokens", "x"], "invalid int value"),
        (["--tokenizer", "/nonexistent"], "--tokenizer /nonexistent: no such file"),
        (["--tokenizer", os.path.dirname(__file__)], "--tokenizer: directory"),  # no tokenizer file in it
        (["--bogus"], "unrecognized arguments"),
        (["--dtype", "int8"], "--dtype 'int8' is not a dtype"),
        (["--device", "nonsense"], "--device 'nonsense': no such device on this machine"),
        (["--device", _MISSING_DEVICE], f"--device '{_MISSING_DEVICE}': no such device on this machine"),
    ],
)
def test_cli_bad_arguments_exit_2_with_one_line(tiny_model_dir, capsys, extra, match):
    code, out, err = _run(capsys, ["--hf", str(tiny_model_dir), "--prompt", "x"] + extra)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and match in err


def test_cli_bad_sources_exit_2(tmp_path, capsys):
    no_tokenizer = tmp_path / "model"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text("{}")
    for argv, match in [
        (["--prompt", "x"], "one of the arguments --hf --dcp is required"),
        (["--hf", str(tmp_path), "--prompt", "x"], "no config.json"),
        (["--hf", str(no_tokenizer), "--prompt", "x"], "holds no tokenizer"),
        (["--dcp", str(tmp_path), "--prompt", "x"], "pass --tokenizer"),
        (["--dcp", str(tmp_path), "--tokenizer", "byte", "--prompt", "x"], "no complete checkpoint"),
    ]:
        code, out, err = _run(capsys, argv)
        assert code == 2 and err.count("\n") == 1 and match in err, err


def test_cli_reads_a_dcp_checkpoint(tiny_model_dir, tmp_path, capsys):
    from moonlight.convert import hf_to_dcp

    hf_to_dcp(str(tiny_model_dir), str(tmp_path / "dcp"))
    common = ["--prompt", "the thing in", "--max-new-tokens", "10"]
    code, from_hf, err = _run(capsys, ["--hf", str(tiny_model_dir)] + common)
    assert code == 0, err
    code, from_dcp, err = _run(capsys, ["--dcp", str(tmp_path / "dcp"), "--tokenizer", str(tiny_model_dir)] + common)
    assert code == 0, err
    assert from_dcp == from_hf
    shard = max((tmp_path / "dcp").glob("*.distcp"), key=lambda f: f.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:100])  # a damaged file is named (it was a DCP traceback)
    code, out, err = _run(capsys, ["--dcp", str(tmp_path / "dcp"), "--tokenizer", str(tiny_model_dir)] + common)
    assert code == 2 and out == "" and err.count("\n") == 1 and f"is damaged: {shard}: 100 bytes" in err, err


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_cli_adapter_generates_what_the_adapted_model_generates(tiny_model_dir, tmp_path, capsys, dora):
    from moonlight.hf_peft import save_peft_adapter
    from moonlight.model.lora import apply_lora
    from moonlight.data.tokenizer import build_tokenizer

    adapted = load_hf(tiny_model_dir)
    targets = ["attn.q_proj", "attn.kv_b_proj", "attn.o_proj"]
    apply_lora(adapted, targets, rank=4, alpha=8.0, dora=dora)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B = 0 would make the adapter a no-op: the test must see it
        for n, p in adapted.named_parameters():
            if "lora_" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    save_peft_adapter(adapted, adapted.args, {"rank": 4, "alpha": 8.0, "dora": dora}, tmp_path / "adapter")

    common = ["--hf", str(tiny_model_dir), "--prompt", "the thing in", "--max-new-tokens", "12"]
    code, out, err = _run(capsys, common + ["--adapter", str(tmp_path / "adapter")])
    assert code == 0, err
    tok = build_tokenizer(str(tiny_model_dir))
    tokens = tok.encode("the thing in")
    new = []
    with torch.no_grad():  # the reference: greedy by full recompute through the unmerged LoRA forward
        for _ in range(12):
            new.append(int(adapted.eval()(torch.tensor([tokens + new]))[0, -1].argmax()))
            if new[-1] == tok.eos_id:
                new.pop()
                break
    assert out == tok.decode(new) + "\n"
    assert out != _run(capsys, common)[1]  # the adapter changed what is generated

    code, out, err = _run(capsys, common + ["--adapter", str(tmp_path)])
    assert code == 2 and err.count("\n") == 1 and "is not a PEFT adapter directory" in err
