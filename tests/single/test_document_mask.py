"""Document masking in one model: a packed row (positions restarting per document, attention within
each document) gives every document the logits, loss and gradients it gets when run alone (dense mask,
Triton RoPE, the varlen path's plumbing), and packed documents read nothing back from the device."""

import pytest
import torch
import torch.nn.functional as F

from moonlight import ModelArgs, Moonlight
from moonlight.model.model import DocumentMask
from tests.helpers import summed_loss

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
            alone = model(tokens[row : row + 1, doc])  # plain causal attention, positions 0..n-1
            torch.testing.assert_close(packed[row, doc], alone[0], **tol)
            alone_loss = alone_loss + F.cross_entropy(alone[0].double(), labels[row, doc], reduction="sum")
            start += n
    alone_loss.backward()
    torch.testing.assert_close(packed_loss, alone_loss, **tol)
    # float64 stays float64 in the router and the norms (no fp32 upcast rounds the packed and the
    # single-document shapes differently), so its gradients agree to fp64 rounding too
    grad_tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-3)
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
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]])
    assert torch.equal(mask, expected)


def test_triton_rope_takes_per_token_positions():
    """The Triton RoPE kernel (interpreted on CPU) with restarted positions matches the torch one."""
    tokens = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(1))
    positions, documents = _packed(LENGTHS)
    torch_logits = _model(torch.float32)(tokens, positions=positions, document_ids=documents)
    triton_logits = _model(torch.float32, kernels="triton")(tokens, positions=positions, document_ids=documents)
    torch.testing.assert_close(triton_logits, torch_logits, atol=1e-5, rtol=1e-4)


def test_varlen_path_flattens_rows_into_documents(monkeypatch):
    """The CUDA varlen path's plumbing (documents of all rows as one ragged batch, cu_seqlens, causal
    window) on CPU, with flash attention's varlen kernel replaced by per-document SDPA."""
    import moonlight.model.model as model_module

    def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
        assert torch.equal(cu_q, cu_k) and window_size == (-1, 0) and cu_q.dtype == torch.int32
        assert max_q == max_k == int((cu_q[1:] - cu_q[:-1]).max())
        out = [
            F.scaled_dot_product_attention(
                q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), is_causal=True, scale=scale
            ).transpose(0, 1)
            for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist())
        ]
        return torch.cat(out)

    monkeypatch.setattr(model_module, "varlen_attn", reference_varlen)
    _, documents = _packed([[5, 9, 2], [16], [4, 12]])
    documents[1] = 0  # rows 1 and 2 both use id 0 at their seam: every row still starts a document
    q, k, v = (torch.randn(3, 16, 2, 8, dtype=torch.float64) for _ in range(3))
    ragged = DocumentMask(documents, torch.float64, varlen=True)
    assert ragged.cu_seqlens.tolist() == [0, 5, 14, 16, 32, 36, 48]
    dense = DocumentMask(documents, torch.float64, varlen=False)
    torch.testing.assert_close(ragged.attention(q, k, v, 0.3), dense.attention(q, k, v, 0.3))


# ------------------------------------------------------------------ varlen metadata from host ids

ROWS = {
    "several_rows": [[5, 9, 2], [16], [4, 12]],
    "single_tokens": [[1, 1, 1, 13], [1] * 16],
    "one_document_per_row": [[16], [16]],  # equal ids at the seam: every row still starts a document
    "one_row": [[16]],
}


@pytest.mark.parametrize("lengths", list(ROWS.values()), ids=list(ROWS))
def test_varlen_metadata_from_host_ids_matches_the_documents(lengths):
    """Ids on the host, activations elsewhere (meta stands in for the GPU): the bounds and the longest
    document are the documents' own, and only their copies live on the device."""
    _, documents = _packed(lengths)
    flat = [n for row in lengths for n in row]
    expected = torch.cumsum(torch.tensor([0] + flat), 0).tolist()
    on_host = DocumentMask(documents, torch.bfloat16, torch.device("cpu"), varlen=True)
    assert on_host.cu_seqlens.dtype == torch.int32 and on_host.cu_seqlens.tolist() == expected
    assert on_host.max_len == max(flat) and isinstance(on_host.max_len, int)  # on the host
    elsewhere = DocumentMask(documents, torch.bfloat16, torch.device("meta"), varlen=True)
    assert elsewhere.cu_seqlens.device.type == elsewhere.document_ids.device.type == "meta"
    assert elsewhere.cu_seqlens.shape == on_host.cu_seqlens.shape and elsewhere.max_len == on_host.max_len


def _meta_forward_backward(model, tokens, positions, documents):
    summed_loss(model, tokens, tokens, positions=positions, document_ids=documents).backward()


def test_packed_forward_reads_nothing_back_from_the_device(monkeypatch):
    """A packed-document forward + backward of a bf16 model on a device that is not the host (meta,
    standing in for CUDA: it takes the varlen kernel) with the ids on the host reads nothing back from
    that device; with the ids on the device the documents' bounds would be read back."""
    import moonlight.model.model as model_module
    from tests.helpers import host_syncs, recording_host_syncs

    monkeypatch.setattr(DocumentMask, "varlen_devices", ("meta",))
    calls = []

    def varlen_spy(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        calls.append((cu_q.device.type, isinstance(max_q, int)))
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kw)

    varlen_attn = model_module.varlen_attn
    monkeypatch.setattr(model_module, "varlen_attn", varlen_spy)
    args = ModelArgs.preset("debug", kernels="torch")
    with torch.device("meta"):
        model = Moonlight(args).to(torch.bfloat16)
    positions, documents = _packed(ROWS["several_rows"])
    tokens, positions = torch.zeros_like(positions, device="meta"), positions.to("meta")

    assert host_syncs(lambda: _meta_forward_backward(model, tokens, positions, documents), device_only=True) == []
    assert calls == [("meta", True)] * args.num_hidden_layers

    syncs = []
    with pytest.raises(NotImplementedError), recording_host_syncs(syncs, device_only=True):
        _meta_forward_backward(model, tokens, positions, documents.to("meta"))
    assert syncs == ["aten.nonzero.default"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_packed_documents_add_no_host_sync_on_cuda():
    """bf16 on CUDA (the varlen kernel), ids on the host: a packed forward + backward syncs no more
    often than an unpacked one (counted by the sync debug mode)."""
    import warnings

    model = _model(torch.bfloat16).cuda()
    tokens = torch.randint(0, 320, (3, 16), generator=torch.Generator().manual_seed(1)).cuda()
    positions, documents = _packed(ROWS["several_rows"])
    packed = {"positions": positions.cuda(), "document_ids": documents}

    def syncs(**packing):
        summed_loss(model, tokens, tokens, **packing).backward()  # warm-up: lazy initialization may sync
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                summed_loss(model, tokens, tokens, **packing).backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return [str(w.message) for w in caught]

    assert syncs(**packed) == syncs()
