"""training.compile = true in one process: losses, gradients and a resumed eager checkpoint equal the
eager trainer's (fp32; aot_eager and inductor), each decoder block compiles as one graph, the chunked
loss's gradients equal eager's, the varlen branch (CUDA's) compiles once per block kind whatever the
documents, and op-level activation checkpointing is refused with the fix."""

import pytest
import torch
import torch.nn.functional as F

from moonlight.model.loss import linear_cross_entropy
from moonlight.train.config import load_config
from tests.helpers import COMPILE_BASE, compile_run, compile_trainer


def _assert_same(eager, compiled, rtol):
    (eager_losses, eager_grads), (compiled_losses, compiled_grads) = eager, compiled
    torch.testing.assert_close(torch.tensor(compiled_losses), torch.tensor(eager_losses), rtol=rtol, atol=0)
    assert compiled_grads.keys() == eager_grads.keys()
    for name in eager_grads:
        torch.testing.assert_close(compiled_grads[name], eager_grads[name], rtol=rtol, atol=rtol * 1e-2, msg=name)


@pytest.mark.parametrize("ac", ["none", "selective"])
def test_compiled_steps_equal_eager(tmp_path, ac):
    extra = ["--checkpoint.enable=false", f"--activation_checkpoint.mode={ac}"]
    eager = compile_run(compile_trainer(tmp_path / "eager", *extra), 3)
    compiled = compile_run(
        compile_trainer(
            tmp_path / "compiled", *extra, "--training.compile=true", "--training.compile_backend=aot_eager"
        ),
        3,
    )
    _assert_same(eager, compiled, rtol=1e-5)


def test_compiled_run_resumes_an_eager_checkpoint_like_eager(tmp_path):
    ckpt = ["--checkpoint.enable=true", "--checkpoint.interval=2", "--training.steps=2"]
    compile_trainer(tmp_path / "first", *ckpt).train()  # eager, saves step 2
    resumed = {}
    for mode in ("eager", "compiled"):
        extra = ["--training.compile=true", "--training.compile_backend=aot_eager"] if mode == "compiled" else []
        trainer = compile_trainer(
            tmp_path / "first", "--checkpoint.enable=true", "--checkpoint.interval=100", "--training.steps=4", *extra
        )
        assert trainer.step == 2
        resumed[mode] = compile_run(trainer, 2)
    _assert_same(resumed["eager"], resumed["compiled"], rtol=1e-5)


@pytest.mark.slow
def test_inductor_steps_equal_eager(tmp_path):
    eager = compile_run(compile_trainer(tmp_path / "eager", "--checkpoint.enable=false"), 2)
    compiled = compile_run(
        compile_trainer(tmp_path / "compiled", "--checkpoint.enable=false", "--training.compile=true"), 2
    )
    _assert_same(eager, compiled, rtol=1e-4)


def test_compile_with_op_level_checkpointing_is_refused_with_the_fix(tmp_path):
    from moonlight.errors import ConfigError

    with pytest.raises(
        ConfigError, match="training.compile = true does not work with activation_checkpoint.mode = 'op'"
    ):
        load_config(
            "train.toml",
            COMPILE_BASE
            + [f"--job.dump_folder={tmp_path}", "--training.compile=true", "--activation_checkpoint.mode=op"],
        ).validate()


@pytest.mark.floor  # torch 2.11's dynamo got the norm's and SwiGLU's gradients wrong (their in-place forwards)
@pytest.mark.parametrize("packed", [False, True], ids=["causal", "documents"])
def test_every_block_compiles_as_one_graph(packed):
    """fullgraph=True on each decoder block (dense and MoE): no graph break anywhere, the RoPE angles
    (made once per forward, outside the blocks) and the document mask come in as inputs; the compiled
    blocks' logits and gradients equal eager."""
    import copy

    from moonlight import ModelArgs, Moonlight

    args = ModelArgs.preset("debug", kernels="torch")
    torch.manual_seed(0)
    eager = Moonlight(args)
    eager.init_weights()
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    for block in compiled.layers.values():
        block.forward = torch.compile(block.forward, backend="aot_eager", fullgraph=True)
    tokens = torch.randint(0, args.vocab_size, (2, 24))
    packing = {}
    if packed:
        documents = torch.tensor([[0] * 10 + [1] * 14, [0] * 24])
        positions = torch.cat([torch.arange(10), torch.arange(14)]).expand(2, 24)
        packing = {"document_ids": documents, "positions": positions}
    outs = []
    for model in (eager, compiled):
        logits = model(tokens, **packing)
        logits.square().mean().backward()
        outs.append((logits, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-6)
    assert outs[1][1].keys() == outs[0][1].keys()
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.floor
def test_compiled_chunked_loss_gradients_equal_eager():
    """The chunked cross-entropy traced whole: its gradients equal eager's (torch 2.11's dynamo zeroed
    them while the loss was accumulated in place)."""
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(6, 8, generator=g), torch.randn(10, 8, generator=g)
    labels = torch.tensor([1, 2, -100, 3, 9, 0])
    grads = []
    for fn in (linear_cross_entropy, torch.compile(linear_cross_entropy, backend="aot_eager", fullgraph=True)):
        torch._dynamo.reset()
        inputs = (hidden.clone().requires_grad_(), weight.clone().requires_grad_())
        grads.append(torch.autograd.grad(fn(*inputs, labels, chunk_bytes=4 * 10 * 4) * 3, inputs))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)


def _reference_varlen(
    query,
    key,
    value,
    cu_seq_q,
    cu_seq_k,
    max_q,
    max_k,
    is_causal=False,
    scale=None,
    window_size=None,
    enable_gqa=False,
    seqused_k=None,
    block_table=None,
    num_splits=None,
):
    """torch's varlen op on CPU, causal SDPA per document: registered for the rest of the process, where
    the CPU build has no kernel it could replace."""
    bounds = cu_seq_q.tolist()
    out = torch.cat(
        [
            F.scaled_dot_product_attention(
                *(t[a:b].transpose(0, 1) for t in (query, key, value)), is_causal=is_causal, scale=scale
            ).transpose(0, 1)
            for a, b in zip(bounds[:-1], bounds[1:])
        ]
    )
    lse = query.new_zeros(query.shape[1], query.shape[0], dtype=torch.float)
    return out, lse, torch.zeros(2, dtype=torch.uint64)


def test_varlen_blocks_compile_once_whatever_the_documents(monkeypatch):
    """The varlen branch under regional compile (CUDA's branch, taken here on CPU with a reference
    kernel registered for torch's varlen op): the longest document and the number of documents change
    every batch, and each block kind compiles once, dynamic in both, over more batches than the
    recompile limit (without the marks: once static, then again per value that changed, which with
    no_grad's compiles for validation passes the limit, after which a block runs eager)."""
    from torch._dynamo.utils import counters

    from moonlight import ModelArgs, Moonlight
    from moonlight.model.model import DocumentMask
    from moonlight.parallel.compile import apply_compile

    torch.library.register_kernel("torch_attn::_varlen_attn", "cpu", _reference_varlen)
    monkeypatch.setattr(DocumentMask, "varlen_devices", ("cpu",))
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    args = ModelArgs.preset("debug", kernels="torch")
    torch.manual_seed(0)
    model = Moonlight(args).to(torch.bfloat16)
    model.init_weights()
    torch._dynamo.reset()
    counters.clear()
    apply_compile(model, backend="aot_eager")
    kinds = {type(block.ffn) for block in model.layers.values()}
    tokens = torch.randint(0, args.vocab_size, (2, 24))
    seen = set()
    for first in range(13, 13 + torch._dynamo.config.recompile_limit + 2):  # more batches than the limit
        second = [0] * 12 + [1] * 12 if first % 2 else [0] * 6 + [1] * 6 + [2] * 12
        documents = torch.tensor([[0] * first + [1] * (24 - first), second])
        model(tokens, document_ids=documents)
        mask = DocumentMask(documents, torch.bfloat16)
        seen.add((mask.max_len, mask.cu_seqlens.numel()))
    assert len({longest for longest, _ in seen}) == len(seen) and len({n for _, n in seen}) == 2
    assert counters["stats"]["unique_graphs"] == len(kinds)
