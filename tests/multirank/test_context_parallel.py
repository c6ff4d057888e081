"""Context parallel on 2 and 4 gloo ranks: the whole model (MLA exchanging latents, causal and document
masks against the gathered keys, the MoE aux loss summed over the sequence) gives the outputs, losses
and gradients of the model on the whole sequence."""

import io

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from moonlight import ModelArgs, Moonlight
from moonlight.parallel.context import apply_context_parallel, zigzag_indices, zigzag_slice
from tests.dist import run_ranks

SEQ = 32
LENGTHS = [[5, 9, 2, 16], [20, 12]]  # documents per row, crossing the chunk borders


def _model():
    args = ModelArgs.preset("debug")
    args = ModelArgs(**{**args.__dict__, "kernels": "torch"})
    torch.manual_seed(0)
    model = Moonlight(args)
    model.init_weights(std=0.1)
    return model.double()


def _inputs(documents: bool):
    tokens = torch.randint(0, 320, (2, SEQ), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 320, (2, SEQ), generator=torch.Generator().manual_seed(2))
    if not documents:
        return tokens, labels, {"positions": torch.arange(SEQ).expand(2, SEQ)}
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in LENGTHS])
    ids = torch.stack([torch.cat([torch.full((n,), d) for d, n in enumerate(row)]) for row in LENGTHS])
    return tokens, labels, {"positions": positions, "document_ids": ids}


def _run(model, tokens, labels, packing, ranks=1):
    """Logits and the gradients of ranks * sum(CE) + the MoE aux losses (attached in backward). As in
    the trainer, the CE of each of `ranks` ranks is scaled by their number and their gradients are
    averaged: each token's loss counts once, and the aux loss (the whole sequence's on every rank) too."""
    model.train()
    logits = model(tokens, **packing)
    (ranks * F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _cp_worker(rank, world, documents):
    from torch.distributed.device_mesh import init_device_mesh

    tokens, labels, packing = _inputs(documents)
    model = _model()
    apply_context_parallel(model, init_device_mesh("cpu", (world,), mesh_dim_names=("cp",)))
    local = {k: zigzag_slice(v, world, rank) for k, v in packing.items()}
    logits, grads = _run(model, zigzag_slice(tokens, world, rank), zigzag_slice(labels, world, rank), local, world)
    for g in grads.values():  # parameters are replicated over cp: average as data parallel does
        dist.all_reduce(g)
        g /= world
    aux = [m.last_aux_loss for m in model.moe_layers()]
    buffer = io.BytesIO()  # plain bytes: tensors in a queue would share fds with the dead child
    torch.save((logits, grads, aux), buffer)
    return buffer.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("documents", [False, True], ids=["causal", "documents"])
@pytest.mark.parametrize("cp", [2, 4])
def test_context_parallel_model_equals_whole_sequence(cp, documents):
    tokens, labels, packing = _inputs(documents)
    model = _model()
    logits, grads = _run(model, tokens, labels, packing)
    aux = [m.last_aux_loss for m in model.moe_layers()]
    assert all(a > 0 for a in aux)  # the aux loss is on, so its gradient is compared too
    for rank, (cp_logits, cp_grads, cp_aux) in enumerate(
        torch.load(io.BytesIO(b)) for b in run_ranks(_cp_worker, cp, documents)
    ):
        torch.testing.assert_close(cp_logits, logits[:, zigzag_indices(SEQ, cp, rank)], rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(cp_aux, aux, rtol=1e-6, atol=0)  # fp32 router; every cp rank: the whole sequence's
        for name, g in grads.items():
            tol = dict(rtol=1e-4, atol=1e-6) if "router" in name else dict(rtol=1e-8, atol=1e-12)  # fp32 routing
            torch.testing.assert_close(cp_grads[name], g, **tol, msg=lambda m: f"{name}: {m}")
