"""The chunked cross-entropy from hidden states equals the plain loss on materialized logits."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from moonlight.config import ModelArgs
from moonlight.model import Moonlight
from moonlight.model.loss import cross_entropy_from_hidden, linear_cross_entropy
from moonlight.parallel.tensor import cross_entropy_loss, reduce_token_losses


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk_rows", [1, 4, 64])  # one row, chunks that do not divide 13, one chunk
def test_linear_cross_entropy_matches_plain(dtype, chunk_rows):
    g = torch.Generator().manual_seed(0)
    vocab, hidden_size, n = 40, 16, 13
    hidden = torch.randn(n, hidden_size, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, generator=g, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[[2, 7]] = -100
    grad = torch.tensor(0.7, dtype=dtype)
    got = linear_cross_entropy(hidden, weight, labels, chunk_bytes=chunk_rows * vocab * 4)
    got_grads = torch.autograd.grad(got, (hidden, weight), grad)
    want = F.cross_entropy((hidden @ weight.t()).to(torch.promote_types(dtype, torch.float32)), labels, reduction="sum")
    want_grads = torch.autograd.grad(want, (hidden, weight), grad)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b)
    assert got_grads[0][[2, 7]].eq(0).all()


@pytest.mark.parametrize("chunk_rows", [4, 64])
def test_linear_cross_entropy_bf16_is_the_plain_path(chunk_rows):
    """bf16, as on a GPU: the fp32 loss of the upcast logits; the hidden states' gradient is the plain
    path's bit for bit, and so is the head's when one chunk holds every token (over several chunks it
    is the chunks' sum in fp32, rounded once)."""
    g = torch.Generator().manual_seed(0)
    vocab, hidden_size, n = 40, 16, 13
    hidden = torch.randn(n, hidden_size, generator=g).bfloat16().requires_grad_()
    weight = torch.randn(vocab, hidden_size, generator=g).bfloat16().requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[[2, 7]] = -100
    got = linear_cross_entropy(hidden, weight, labels, chunk_bytes=chunk_rows * vocab * 4)
    want = F.cross_entropy((hidden @ weight.t()).float(), labels, reduction="sum")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)
    (got_hidden, got_weight), (want_hidden, want_weight) = (
        torch.autograd.grad(x, (hidden, weight)) for x in (got, want)
    )
    assert torch.equal(got_hidden, want_hidden) and got_weight.dtype == torch.bfloat16
    if chunk_rows >= n:
        assert torch.equal(got_weight, want_weight)


def test_linear_cross_entropy_large_logits_and_frozen_hidden():
    """Losses of hundreds of nats (the label's probability underflows fp32) stay exact; with the hidden
    states frozen only the head's gradient is made; without grad mode the loss is the same."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(9, 8, generator=g) * 30
    weight = torch.randn(50, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (9,), generator=g)
    got = linear_cross_entropy(hidden, weight, labels, chunk_bytes=4 * 50 * 4)
    want = F.cross_entropy(hidden @ weight.t(), labels, reduction="sum")
    assert want > 1000
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, weight)[0], torch.autograd.grad(want, weight)[0])
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, labels), want)


@pytest.mark.parametrize(("n", "budget_rows", "want_rows"), [(13, 4, [3, 3, 3, 4]), (4096, 819, [682, 683, 683] * 2)])
def test_linear_cross_entropy_chunks_are_equal(n, budget_rows, want_rows):
    """The fewest chunks within the budget, of equal size: 4096 tokens at Moonlight's budget (819 rows)
    are 6 chunks of 682-683 rows, not 5 of 819 and one of a single token, which would cost a whole pass
    over the head's weight and its gradient for one row."""
    vocab = 8
    hidden = torch.randn(n, 4, requires_grad=True)
    weight = torch.randn(vocab, 4, requires_grad=True)
    rows = []

    class RowsOfLogits(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.mm.default and args[1].shape[-1] == vocab:
                rows.append(args[0].shape[0])
            return func(*args, **(kwargs or {}))

    with RowsOfLogits():
        linear_cross_entropy(hidden, weight, torch.randint(0, vocab, (n,)), chunk_bytes=budget_rows * vocab * 4)
    assert rows == want_rows


class _WrappedHead(torch.nn.Linear):
    """Stands for a head with its own forward (a LoRA head): the model must call it for the logits."""

    def forward(self, x):
        return super().forward(x * 1.5)


@pytest.mark.parametrize("head", ["linear", "wrapped"])
def test_loss_from_hidden_matches_loss_on_logits(head):
    """cross_entropy_from_hidden + reduce_token_losses == cross_entropy_loss(model(tokens), labels),
    loss and every gradient, fp32."""
    args = ModelArgs.preset("debug", kernels="torch", num_hidden_layers=2, aux_loss_alpha=0.01)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, args.vocab_size, (2, 9), generator=g)
    inputs, labels = tokens[:, :-1], tokens[:, 1:].clone()
    labels[0, :3] = -100
    results = []
    for chunked in (False, True):
        torch.manual_seed(0)
        model = Moonlight(args)
        model.init_weights(std=0.05)
        model.train()
        if head == "wrapped":
            wrapped = _WrappedHead(args.hidden_size, args.vocab_size, bias=False)
            wrapped.weight = model.lm_head.weight
            model.lm_head = wrapped
        if chunked:
            hidden = model(inputs, return_hidden=True)
            loss = reduce_token_losses(cross_entropy_from_hidden(hidden, model.lm_head, labels), labels)
        else:
            loss = cross_entropy_loss(model(inputs), labels)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, msg=lambda m: f"{name}: {m}")


def test_vocab_sharded_head_is_rejected():
    from torch.distributed.tensor import DTensor

    class FakeSharded(torch.Tensor):
        to_local = DTensor.to_local

    with pytest.raises(TypeError, match="vocab-sharded"):
        linear_cross_entropy(torch.zeros(2, 4), torch.zeros(8, 4).as_subclass(FakeSharded), torch.zeros(2).long())
