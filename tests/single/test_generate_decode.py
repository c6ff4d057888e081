"""The decode step of moonlight.generation: no host sync, one graph under fullgraph compile, compiled equal
to eager token for token, and the few-token MoE path equal to the training MoE."""

import pytest
import torch

from moonlight import ModelArgs, Moonlight
from moonlight.generation import Decoder, decode_step, moe_decode, pad_left, uses_gathered_experts
from moonlight.model import MoE
from tests.helpers import host_syncs

PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [20, 21, 22]]


def _model(dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    args = ModelArgs.preset("debug", **{"kernels": "torch", "num_hidden_layers": 2, **overrides})
    model = Moonlight(args)
    model.init_weights(std=0.1)
    return model.to(dtype).eval()


def _run(decoder, new=6, **sampling):
    ids, mask = pad_left(PROMPTS, pad_id=1)
    g = torch.Generator().manual_seed(3)
    tokens = [t.clone() for t in decoder.stream(ids, new, attention_mask=mask, generator=g, **sampling)]
    return torch.stack(tokens, 1)


def test_decode_step_reads_nothing_back_to_the_host():
    model = _model()
    ids, mask = pad_left(PROMPTS, pad_id=1)
    decoder = Decoder(model, len(PROMPTS), 16)
    stream = decoder.stream(ids, 8, temperature=0.8, top_p=0.9, eos_token_id=3, attention_mask=mask)
    next(stream)  # the prefill
    assert host_syncs(decoder.step) == []  # sampling, eos masking and the cache writes stay on the device
    # the loop: 7 steps, fewer than eos_check_every: no read until the one NaN/Inf check at its end
    assert host_syncs(lambda: list(stream)) == ["aten._local_scalar_dense.default"]
    # With eos, the loop reads whether every row ended (and met NaN/Inf) in one read every
    # eos_check_every tokens (at 4 and 8 here); the prefill reads once per prompt whether it is padded
    # and once whether its logits are finite; the stream's end reads the NaN/Inf flags once.
    decoder = Decoder(model, 1, 13)
    syncs = host_syncs(lambda: list(decoder.stream(torch.tensor([[4, 5, 6]]), 10, eos_token_id=3, eos_check_every=4)))
    read = "aten._local_scalar_dense.default"
    assert syncs == [read, read, "tolist", "tolist", read], syncs


@pytest.mark.parametrize("copies", [1, 2], ids=["gathered experts", "training experts"])
def test_decode_step_compiles_as_one_graph(copies):
    """3 rows x top-2 = 6 pairs of 8 experts index the experts' weights; 6 rows take the training path."""
    decoder = Decoder(_model(), len(PROMPTS) * copies, 16)
    assert uses_gathered_experts(decoder.model.moe_layers()[0], len(PROMPTS) * copies) == (copies == 1)
    ids, mask = pad_left(PROMPTS * copies, pad_id=1)
    next(decoder.stream(ids, 4, attention_mask=mask))
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(decode_step)(decoder)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.9, "top_p": 0.8}], ids=["greedy", "top_p"])
def test_compiled_decode_step_equals_eager_token_for_token(sampling):
    """fullgraph=True (a graph break would raise); aot_eager traces the same graph inductor compiles."""
    model = _model()
    eager = _run(Decoder(model, len(PROMPTS), 16, compile=False), **sampling)
    torch._dynamo.reset()
    compiled = _run(Decoder(model, len(PROMPTS), 16, compile=True, backend="aot_eager"), **sampling)
    assert torch.equal(compiled, eager)
    assert not torch.equal(eager[:, 1:], eager[:, :1].expand(-1, eager.shape[1] - 1))  # not one token repeated


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tokens", [1, 3, 5])
def test_gathered_experts_equal_the_training_moe(dtype, tokens):
    torch.manual_seed(0)
    args = ModelArgs.preset("debug", kernels="torch")  # 8 experts, top-2: gathered up to 4 tokens
    moe = MoE(args)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    moe.router.expert_bias.normal_(std=0.05)
    moe = moe.to(dtype).eval()
    x = torch.randn(tokens, 1, args.hidden_size, dtype=dtype)
    with torch.no_grad():
        expected = moe(x)
        counts = moe.tokens_per_expert.clone()
        got = moe_decode(moe, x)
    assert uses_gathered_experts(moe, tokens) == (tokens <= 4)
    tol = {} if dtype == torch.float64 else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(got, expected, **tol)
    assert torch.equal(moe.tokens_per_expert, counts)  # inference: the load counters are the trainer's
