"""TP / SP / FSDP2 / HSDP / EP / activation checkpointing: one training step matches the single-process
model.

Every configuration runs on forked gloo ranks (tests/dist.py). The reference is the same model on the full
global batch; each data-parallel rank gets its slice of the batch; the loss is the mean over the
global batch; every gradient, gathered with full_tensor(), must equal the reference's in fp32.
The sequence aux loss is on (aux_loss_alpha=0.001 x 10 so it matters), and the MoE load counters,
summed over the routing mesh (dp, and tp when each tp rank routes its own sequence shard), must equal
the reference's."""

import copy

import pytest
import torch
import torch.distributed as dist

from tests.dist import run_ranks
from tests.helpers import (
    GLOBAL_BATCH,
    PARALLEL_TP_FSDP_SEQ,
    parallel_tp_fsdp_args,
    parallel_tp_fsdp_reference,
    reference_step,
    summed_loss,
)

ATOL, RTOL = 1e-5, 1e-4


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _step_worker(rank, world_size, degrees, sequence_parallel, ac_mode, chunked_loss=False):
    from moonlight.parallel.mesh import ParallelDims, build_mesh
    from moonlight.parallel.parallelize import parallelize_model
    from moonlight.parallel.tensor import cross_entropy_loss, reduce_token_losses

    ref, inputs, labels = parallel_tp_fsdp_reference()
    model = copy.deepcopy(ref)
    ref_loss, ref_grads, ref_counts = reference_step(ref, inputs, labels)

    dims = ParallelDims(world_size=world_size, **degrees)
    mesh = build_mesh(dims, "cpu")
    parallelize_model(model, dims, mesh, sequence_parallel=sequence_parallel, ac_mode=ac_mode)
    per = GLOBAL_BATCH // mesh.dp_size
    sl = slice(mesh.dp_rank * per, (mesh.dp_rank + 1) * per)
    model.train()
    if chunked_loss:  # the loss from hidden states, reading the head's weight FSDP left unsharded
        loss = reduce_token_losses(summed_loss(model, inputs[sl], labels[sl]), labels[sl])
    else:
        logits = model(inputs[sl])
        if dims.tp > 1:
            assert logits.placements[0].is_shard() and logits.to_local().shape[-1] == ref.args.vocab_size // dims.tp
        loss = cross_entropy_loss(logits, labels[sl])
    loss.backward()

    global_loss = loss.detach().clone()
    dist.all_reduce(global_loss, group=mesh["dp"].get_group())
    global_loss /= mesh.dp_size
    torch.testing.assert_close(global_loss, ref_loss, atol=ATOL, rtol=RTOL)
    names = set()
    for name, p in model.named_parameters():
        names.add(name)
        assert p.grad is not None, name
        torch.testing.assert_close(_full(p.grad), ref_grads[name], atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")
    assert names == set(ref_grads)
    for name, m in model.named_modules():
        if hasattr(m, "tokens_per_expert"):
            c = m.tokens_per_expert.clone()
            dist.all_reduce(c, group=mesh["routing"].get_group())
            torch.testing.assert_close(c, ref_counts[name], atol=0, rtol=0)
    return float(global_loss)


def _cases_worker(rank, world_size, cases):
    for name, degrees, sequence_parallel, ac_mode, *chunked_loss in cases:
        try:
            _step_worker(rank, world_size, degrees, sequence_parallel, ac_mode, *chunked_loss)
        except AssertionError as e:
            raise AssertionError(
                f"{name} ({degrees}, sequence_parallel={sequence_parallel}, ac_mode={ac_mode}): {e}"
            ) from None


# Several configurations per forked run: each run pays the process start once (2 cores, 4 ranks).
def test_tp_sp_fsdp_two_ranks():
    run_ranks(
        _cases_worker,
        2,
        [
            ("tp2", dict(tp=2), False, "none"),
            ("tp2_sp", dict(tp=2), True, "none"),
            ("fsdp2", dict(dp_shard=2), False, "none"),
            ("fsdp2_chunked_loss", dict(dp_shard=2), False, "none", True),
        ],
    )


def test_hsdp_and_fsdp_x_tp_four_ranks():
    run_ranks(
        _cases_worker,
        4,
        [
            ("hsdp2x2", dict(dp_replicate=2, dp_shard=2), False, "none"),
            ("fsdp2_tp2_sp", dict(dp_shard=2, tp=2), True, "none"),
            ("fsdp2_tp2", dict(dp_shard=2, tp=2), False, "none"),
        ],
    )


def test_activation_checkpointing_same_grads():
    run_ranks(
        _cases_worker,
        4,
        [
            ("fsdp2_tp2_sp_ac_full", dict(dp_shard=2, tp=2), True, "full"),
            ("fsdp2_tp2_sp_ac_selective", dict(dp_shard=2, tp=2), True, "selective"),
            ("hsdp2x2_ac_full", dict(dp_replicate=2, dp_shard=2), False, "full"),
            ("fsdp2_tp2_sp_ac_op", dict(dp_shard=2, tp=2), True, "op"),
            ("fsdp2_ep2_tp2_sp_ac_op", dict(dp_shard=2, ep=2, tp=2), True, "op"),
        ],
    )


def test_expert_parallel_with_fsdp_hsdp_tp():
    """EP (moonlight.parallel.expert) composed with FSDP (experts over dp_shard_mod_ep), HSDP and TP."""
    run_ranks(
        _cases_worker,
        4,
        [
            ("fsdp4_ep2", dict(dp_shard=4, ep=2), False, "none"),
            ("fsdp4_ep4_ac_full", dict(dp_shard=4, ep=4), False, "full"),
            ("hsdp2x2_ep2", dict(dp_replicate=2, dp_shard=2, ep=2), False, "none"),
            ("fsdp2_ep2_tp2_sp", dict(dp_shard=2, ep=2, tp=2), True, "none"),
        ],
    )


@pytest.mark.slow
@pytest.mark.floor  # torch 2.11 cannot slice (cp, tp) out of the unflattened world mesh
def test_expert_parallel_spanning_tp():
    """EP over dp_shard x tp (ep does not divide dp_shard): each tp rank routes its own sequence shard;
    plain EP experts, FSDP-sharded experts (tp4: two tp ranks per expert shard), HSDP, checkpointing."""
    run_ranks(
        _cases_worker,
        4,
        [
            ("fsdp2_tp2_sp_ep4", dict(dp_shard=2, tp=2, ep=4), True, "none"),
            ("tp4_sp_ep2", dict(dp_shard=1, tp=4, ep=2), True, "none"),
            ("hsdp2_tp2_sp_ep2", dict(dp_replicate=2, dp_shard=1, tp=2, ep=2), True, "none"),
            ("fsdp2_tp2_sp_ep4_ac_full", dict(dp_shard=2, tp=2, ep=4), True, "full"),
            ("fsdp2_tp2_sp_ep4_ac_op", dict(dp_shard=2, tp=2, ep=4), True, "op"),
        ],
    )


def _expert_rows_worker(rank, world_size, degrees):
    """Rows the routed experts' GEMMs process on this rank in one forward of the global batch."""
    import moonlight.model.model as model_module
    from moonlight.parallel.mesh import ParallelDims, build_mesh
    from moonlight.parallel.parallelize import parallelize_model

    ref, inputs, _ = parallel_tp_fsdp_reference()
    dims = ParallelDims(world_size=world_size, **degrees)
    mesh = build_mesh(dims, "cpu")
    parallelize_model(ref, dims, mesh, sequence_parallel=True)
    rows = []
    swiglu = model_module.grouped_swiglu

    def counting(x, counts, *weights):
        rows.append(x.shape[0])
        return swiglu(x, counts, *weights)

    model_module.grouped_swiglu = counting
    per = GLOBAL_BATCH // mesh.dp_size
    with torch.no_grad():
        ref(inputs[mesh.dp_rank * per : (mesh.dp_rank + 1) * per])
    return sum(rows)


@pytest.mark.slow
def test_routed_expert_work_is_not_repeated_when_ep_spans_tp():
    """tp2 x ep4 (EP spans tp): the routed experts process tokens x top_k rows per MoE layer over all
    ranks, as one process does; tp2 x ep2 (EP over dp_shard) processes every row once per tp rank."""
    args = parallel_tp_fsdp_args()
    moe_layers = args.num_hidden_layers - args.first_k_dense_replace
    single = GLOBAL_BATCH * PARALLEL_TP_FSDP_SEQ * args.num_experts_per_tok * moe_layers
    spanning = sum(run_ranks(_expert_rows_worker, 4, dict(dp_shard=2, tp=2, ep=4)))
    over_dp_shard = sum(run_ranks(_expert_rows_worker, 4, dict(dp_shard=2, tp=2, ep=2)))
    assert (spanning, over_dp_shard) == (single, 2 * single)


def _stages_worker(rank, world_size, degrees, sequence_parallel):
    """Two pipeline-stage modules (stage 0: embed + layers 0-1; stage 1: layer 2 + norm + lm_head),
    parallelized separately and chained on the same ranks: same loss and gradients as one model."""
    from moonlight.parallel.mesh import ParallelDims, build_mesh
    from moonlight.parallel.parallelize import parallelize_model
    from moonlight.parallel.tensor import cross_entropy_loss

    ref, inputs, labels = parallel_tp_fsdp_reference()
    first, last = copy.deepcopy(ref), copy.deepcopy(ref)
    ref_loss, ref_grads, _ = reference_step(ref, inputs, labels)
    first.norm = first.lm_head = None
    del first.layers["2"]
    last.embed = None
    del last.layers["0"], last.layers["1"]
    dims = ParallelDims(world_size=world_size, **degrees)
    mesh = build_mesh(dims, "cpu")
    for stage in (first, last):
        parallelize_model(stage, dims, mesh, sequence_parallel=sequence_parallel, ac_mode="selective")
    per = GLOBAL_BATCH // mesh.dp_size
    sl = slice(mesh.dp_rank * per, (mesh.dp_rank + 1) * per)
    hidden = first(inputs[sl])
    seq = PARALLEL_TP_FSDP_SEQ // dims.tp if sequence_parallel else PARALLEL_TP_FSDP_SEQ
    assert type(hidden) is torch.Tensor and hidden.shape == (per, seq, ref.args.hidden_size), hidden.shape
    sent = hidden.detach().requires_grad_()  # what a pipeline send/recv does
    loss = cross_entropy_loss(last(sent), labels[sl])
    loss.backward()
    hidden.backward(sent.grad)
    global_loss = loss.detach().clone()
    dist.all_reduce(global_loss, group=mesh["dp"].get_group())
    torch.testing.assert_close(global_loss / mesh.dp_size, ref_loss, atol=ATOL, rtol=RTOL)
    for stage in (first, last):
        for name, p in stage.named_parameters():
            torch.testing.assert_close(
                _full(p.grad), ref_grads[name], atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}"
            )


def test_pipeline_stage_modules():
    run_ranks(_stages_worker, 4, dict(dp_shard=2, tp=2), True)


def _bf16_worker(rank, world_size):
    """FSDP2 mixed precision (bf16 params, fp32 reduce) with TP+SP: runs, and lands near fp32."""
    from moonlight.model.model import Router
    from moonlight.parallel.mesh import ParallelDims, build_mesh
    from moonlight.parallel.parallelize import parallelize_model
    from moonlight.parallel.tensor import cross_entropy_loss

    ref, inputs, labels = parallel_tp_fsdp_reference()
    model = copy.deepcopy(ref)
    ref_loss, ref_grads, _ = reference_step(ref, inputs, labels)
    dims = ParallelDims(world_size=world_size, dp_shard=1, tp=2)
    mesh = build_mesh(dims, "cpu")
    parallelize_model(model, dims, mesh, sequence_parallel=True, param_dtype="bfloat16", reduce_dtype="float32")
    seen = {}
    for m in model.modules():
        if isinstance(m, Router):
            # grouped with its block (weight gathered in bf16), routing upcast to fp32 as in the HF reference
            m.register_forward_hook(
                lambda mod, a, out: seen.update(router=(mod.weight.dtype, out[0].dtype, out[2].dtype))
            )
    logits = model(inputs)
    assert logits.dtype == torch.bfloat16
    loss = cross_entropy_loss(logits, labels)
    loss.backward()
    assert seen["router"] == (torch.bfloat16, torch.float32, torch.float32)
    torch.testing.assert_close(loss.detach(), ref_loss, atol=0, rtol=2e-2)
    # bf16 noise can flip a few top-k choices, which moves the routed-expert gradients most.
    cos = sorted(
        float(torch.nn.functional.cosine_similarity(_full(p.grad).flatten(), ref_grads[n].flatten(), dim=0))
        for n, p in model.named_parameters()
    )
    assert all(_full(p.grad).dtype == torch.float32 for p in model.parameters())
    assert cos[0] > 0.9 and cos[len(cos) // 2] > 0.99, cos


def test_mixed_precision_bf16():
    run_ranks(_bf16_worker, 2)
