"""Document masking: a packed row (positions restarting per document, attention within each document)
gives every document the logits, loss and gradients it gets when run alone; and the trainer's losses
with document masking are the single-process ones in every parallel layout."""

import json

import pytest
import torch
import torch.nn.functional as F

from moonlight import ModelArgs, Moonlight
from moonlight.model.model import DocumentMask

LENGTHS = [[5, 9, 2], [16]]  # two rows of 16 tokens: three documents, then one


def _model(dtype=torch.float64, **overrides):
    args = ModelArgs.preset("debug")
    args = ModelArgs(**{**args.__dict__, "kernels": "torch", "aux_loss_alpha": 0.0, **overrides})
    torch.manual_seed(0)
    model = Moonlight(args)
    model.init_weights(std=0.1)
    return model.to(dtype)


def _packed(lengths):
    positions = [torch.cat([torch.arange(n) for n in row]) for row in lengths]
    documents = [torch.cat([torch.full((n,), d) for d, n in enumerate(row)]) for row in lengths]
    return torch.stack(positions), torch.stack(documents)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_packed_row_equals_each_document_alone(dtype):
    model = _model(dtype)
    tokens = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(2))
    positions, documents = _packed(LENGTHS)

    packed = model(tokens, positions=positions, document_ids=documents)
    packed_loss = F.cross_entropy(packed.flatten(0, 1).double(), labels.flatten(), reduction="sum")
    packed_loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    alone_loss = 0.0
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-5, rtol=1e-4)
    for row, lengths in enumerate(LENGTHS):
        start = 0
        for n in lengths:
            doc = slice(start, start + n)
            alone = model(tokens[row:row + 1, doc])  # plain causal attention, positions 0..n-1
            torch.testing.assert_close(packed[row, doc], alone[0], **tol)
            alone_loss = alone_loss + F.cross_entropy(alone[0].double(), labels[row, doc], reduction="sum")
            start += n
    alone_loss.backward()
    torch.testing.assert_close(packed_loss, alone_loss, **tol)
    # the router computes its scores in fp32 (as the reference does), so even float64 gradients
    # carry fp32 rounding from the routing weights
    grad_tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-3)
    for n, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[n], p.grad, **grad_tol, msg=lambda m: f"{n}: {m}")


def test_without_document_ids_the_row_attends_across_documents():
    model = _model()
    tokens = torch.randint(0, 320, (1, 16), generator=torch.Generator().manual_seed(1))
    positions, documents = _packed([[8, 8]])
    masked = model(tokens, positions=positions, document_ids=documents)
    plain = model(tokens)
    torch.testing.assert_close(masked[:, :8], plain[:, :8])  # the first document is the row's prefix
    assert (masked[:, 8:] - plain[:, 8:]).abs().max() > 1e-3


def test_dense_mask_is_block_diagonal_causal():
    _, documents = _packed([[2, 3]])
    mask = DocumentMask(documents, torch.float32).dense[0, 0].int()
    expected = torch.tensor([[1, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0],
                             [0, 0, 1, 0, 0],
                             [0, 0, 1, 1, 0],
                             [0, 0, 1, 1, 1]])
    assert torch.equal(mask, expected)


def test_triton_rope_takes_per_token_positions():
    """The Triton RoPE kernel (interpreted on CPU) with restarted positions matches the torch one."""
    tokens = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(1))
    positions, documents = _packed(LENGTHS)
    torch_logits = _model(torch.float32)(tokens, positions=positions, document_ids=documents)
    triton_logits = _model(torch.float32, kernels="triton")(tokens, positions=positions, document_ids=documents)
    torch.testing.assert_close(triton_logits, torch_logits, atol=1e-5, rtol=1e-4)
