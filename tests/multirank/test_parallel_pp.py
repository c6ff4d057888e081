"""Pipeline parallel on 2 gloo ranks: pipelined steps (several schedules and layouts, with expert
parallel too, the loss from the last stage's hidden states or from its logits) equal one process, no
[B, S, V] logits exist with the loss from hidden states, the token-sum loss needs no gradient scaling,
and a forward-only (validation) pass gives one process's loss under every schedule, the next step unchanged."""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.graph import GradientEdge
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from moonlight.config import ModelArgs
from moonlight.model.model import Moonlight, RMSNorm
from moonlight.parallel.expert import apply_expert_parallel
from moonlight.parallel.pipeline import (
    build_pipeline_stages,
    build_schedule,
    cross_entropy_loss,
    hidden_states_loss,
    pipeline_step,
)
from moonlight.parallel.pipeline_layout import (
    SPLIT_BACKWARD_SCHEDULES,
    schedule_problems,
    splits_backward_through_python_nodes,
)
from tests.dist import reduce_grads_without_fsdp, run_ranks

ATOL, RTOL = 1e-5, 1e-4


# ------------------------------------------------------------------ pipelined steps


def _args(**kw):
    base = dict(kernels="torch", aux_loss_alpha=0.0, num_hidden_layers=4)
    base.update(kw)
    return ModelArgs.preset("debug", **base)


def _reference(args):
    torch.manual_seed(1234)
    model = Moonlight(args)
    model.init_weights()
    return model


def _batch(args, bsz, seqlen=6):
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, args.vocab_size, (bsz, seqlen + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _loader(state, ep_mesh=None):
    def parallelize(module, stage_index):
        module.to_empty(device="cpu")
        module.init_weights()  # buffers that are not in the state dict (load counters)
        own = module.state_dict()
        module.load_state_dict({k: state[k] for k in own}, strict=True)
        if ep_mesh is not None:
            apply_expert_parallel(module, ep_mesh)
        return module

    return parallelize


def _grads(parts):
    out = {}
    for part in parts:
        for name, p in part.named_parameters():
            if p.grad is not None:
                g = p.grad
                out[name] = (g.full_tensor() if isinstance(g, DTensor) else g).detach().numpy()
    return out


class _VocabShapes(TorchDispatchMode):
    """The shapes of the tensors made by the ops run inside whose last dimension is the vocabulary."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.shapes = vocab, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.ndim and t.shape[-1] == self.vocab:
                self.shapes.add(tuple(t.shape))
        return out


def _stages_and_schedule(args, layout, pp_mesh, schedule, n_mb, bsz, parallelize_fn, from_hidden, **kw):
    """The trainer's pipeline: with from_hidden (a whole head) the last stage returns its hidden states
    and the schedule's loss applies the head in chunks, else the loss is taken on the stage's logits."""
    stages, parts = build_pipeline_stages(
        args, layout, pp_mesh, "cpu", schedule=schedule, parallelize_fn=parallelize_fn, return_hidden=from_hidden
    )
    loss_fn = hidden_states_loss(parts) if from_hidden else cross_entropy_loss
    return parts, build_schedule(stages, schedule, n_mb, loss_fn, local_batch_size=bsz, **kw)


def _pp_rank(rank, world, args, layout, schedule, n_mb, bsz, from_hidden, token_sum=False, validate=False):
    """validate: a forward-only pass between the two steps, as the trainer validates (eval mode, no grad);
    its loss is returned in place of the vocab shapes."""
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("pp",))
    state = _reference(args).state_dict()
    parts, sched = _stages_and_schedule(
        args, layout, mesh, schedule, n_mb, bsz, _loader(state), from_hidden, scale_grads=not token_sum
    )
    names = {n for part in parts for n, _ in part.named_parameters()}
    inputs, labels = _batch(args, bsz)
    num_tokens = labels.numel() if token_sum else None  # sum(CE) / tokens, no 1/n_microbatches
    with _VocabShapes(args.vocab_size) as vocab_shapes:
        for step in range(2):  # the trainer loop: zero grads, step (the first step also infers shapes)
            if validate and step == 1:
                val_loss = _forward_only(sched, parts, inputs, labels)
            for part in parts:
                part.zero_grad(set_to_none=True)
            loss = pipeline_step(sched, inputs, labels, num_tokens=num_tokens)
    extra = val_loss if validate else vocab_shapes.shapes
    return (None if loss is None else loss.item()), _grads(parts), sorted(names), _loads(parts), extra


def _forward_only(sched, parts, inputs, labels):
    for part in parts:
        part.eval()
    with torch.no_grad():
        loss = pipeline_step(sched, inputs, labels, forward_only=True)
    for part in parts:
        part.train()
    return None if loss is None else loss.item()


def _loads(parts):
    return {
        name: m.tokens_per_expert.numpy().copy()
        for part in parts
        for name, m in part.named_modules()
        if hasattr(m, "tokens_per_expert")
    }


def _check_against_reference(args, bsz, results, ep=1, steps=2):
    ref = _reference(args)
    inputs, labels = _batch(args, bsz * ep)
    loss = F.cross_entropy(ref(inputs).flatten(0, 1), labels.flatten())
    loss.backward()
    # MoE load counters: every real token counted once per step, shape inference not at all
    loads = {}
    for r in results:
        for name, load in r[3].items():
            loads[name] = loads.get(name, 0) + load
    want = {n: steps * m.tokens_per_expert.numpy() for n, m in ref.named_modules() if hasattr(m, "tokens_per_expert")}
    assert loads.keys() == want.keys()
    for name in want:
        assert (loads[name] == want[name]).all(), (name, loads[name], want[name])
    losses = [r[0] for r in results if r[0] is not None]
    assert losses
    for value in losses:
        assert abs(value - loss.item()) <= ATOL + RTOL * abs(loss.item())
    seen = set()
    for r in results:
        for name, g in r[1].items():
            torch.testing.assert_close(
                torch.from_numpy(g), ref.get_parameter(name).grad, atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}"
            )
            seen.add(name)
    assert seen == {n for n, _ in ref.named_parameters()}


def _check_vocab_shapes(args, results, from_hidden, microbatch_shape):
    """From hidden states: the last stage's loss makes [tokens, V] rows (one chunk here: the debug
    vocabulary is small) and no [mb, S, V] logits, on any rank; from logits: those logits exist."""
    last = next(r[4] for r in results if r[0] is not None)
    logits = (*microbatch_shape, args.vocab_size)
    if from_hidden:
        assert last and all(len(shape) == 2 for r in results for shape in r[4]), [r[4] for r in results]
    else:
        assert logits in last, last


HEAD_LOSSES = pytest.mark.parametrize("from_hidden", [True, False], ids=["from_hidden", "from_logits"])


@HEAD_LOSSES
@pytest.mark.floor  # torch 2.11's schedules take no loss_kwargs
def test_pp2_token_sum_loss_without_grad_scaling(from_hidden):
    args, bsz = _args(), 4
    results = run_ranks(_pp_rank, 2, args, [2, 2], "1F1B", 4, bsz, from_hidden, True)
    _check_against_reference(args, bsz, results)
    _check_vocab_shapes(args, results, from_hidden, (1, 6))


def _refused_here(schedule, vp):
    """Whether this torch refuses the schedule (the split-backward ones on torch 2.11), checking that the
    refusal names the schedules that work and that the weight-only backward really fails here."""
    if schedule not in SPLIT_BACKWARD_SCHEDULES or splits_backward_through_python_nodes():
        return False
    problems = schedule_problems(schedule, vp)
    assert len(problems) == 1 and "use one of ['1F1B', 'GPipe', 'Interleaved1F1B', 'LoopedBFS']" in problems[0]
    norm, x = RMSNorm(4, 1e-6), torch.randn(2, 4)
    with pytest.raises(RuntimeError, match="_input_metadata"):
        torch.autograd.grad([GradientEdge(norm(x).grad_fn, 0)], [norm.weight], grad_outputs=[torch.ones(2, 4)])
    return True


@pytest.mark.parametrize(
    "schedule,layout,n_mb,aux",
    [
        ("1F1B", [2, 2], 2, 0.0),
        ("GPipe", [3, 1], 4, 0.01),
        ("Interleaved1F1B", [1, 1, 1, 1], 2, 0.0),
        ("InterleavedZeroBubble", [1, 1, 1, 1], 4, 0.0),
        ("ZBVZeroBubble", [1, 1, 1, 1], 2, 0.01),
        ("DualPipeV", [1, 1, 1, 1], 4, 0.0),
    ],
)
@HEAD_LOSSES
@pytest.mark.floor  # torch 2.11 refuses the split-backward schedules, newer ones run them
def test_pp2_matches_single_process(schedule, layout, n_mb, aux, from_hidden):
    if _refused_here(schedule, len(layout) // 2):
        return
    args, bsz = _args(aux_loss_alpha=aux), 4
    results = run_ranks(_pp_rank, 2, args, layout, schedule, n_mb, bsz, from_hidden)
    # stage placement: global layer keys, embed only on stage 0, lm_head only on the last stage
    v = schedule in ("ZBVZeroBubble", "DualPipeV")
    first_rank_layers = {n.split(".")[1] for n in results[0][2] if n.startswith("layers.")}
    want = {"0", "3"} if v else {"0", "2"} if len(layout) == 4 else {str(i) for i in range(layout[0])}
    assert first_rank_layers == want
    assert any(n.startswith("embed.") for n in results[0][2])
    last = 0 if v else 1
    assert any(n.startswith("lm_head.") for n in results[last][2])
    assert not any(n.startswith("lm_head.") for n in results[1 - last][2])
    _check_against_reference(args, bsz, results)
    _check_vocab_shapes(args, results, from_hidden, (bsz // n_mb, 6))


@pytest.mark.parametrize(
    "schedule,layout,n_mb",
    [
        ("1F1B", [2, 2], 2),
        ("GPipe", [3, 1], 4),
        ("Interleaved1F1B", [1, 1, 1, 1], 2),
        ("LoopedBFS", [1, 1, 1, 1], 2),
        ("InterleavedZeroBubble", [1, 1, 1, 1], 4),
        ("ZBVZeroBubble", [1, 1, 1, 1], 2),
        ("DualPipeV", [1, 1, 1, 1], 4),
    ],
)
def test_pp2_forward_only_between_steps_matches_single_process(schedule, layout, n_mb):
    """Validation's forward-only pass gives the single-process loss, counts no MoE load, and leaves the
    schedule ready for the next training step (its grads and loads those of a run without it)."""
    if _refused_here(schedule, len(layout) // 2):
        return
    args, bsz = _args(aux_loss_alpha=0.01), 4
    results = run_ranks(_pp_rank, 2, args, layout, schedule, n_mb, bsz, True, False, True)
    _check_against_reference(args, bsz, results)
    ref = _reference(args)
    ref.eval()
    inputs, labels = _batch(args, bsz)
    with torch.no_grad():
        want = F.cross_entropy(ref(inputs).flatten(0, 1), labels.flatten()).item()
    (val_loss,) = [r[4] for r in results if r[4] is not None]
    assert abs(val_loss - want) <= ATOL + RTOL * abs(want)


def _pp_ep_rank(rank, world, args, layout, schedule, n_mb, bsz, from_hidden):
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "ep"))
    state = _reference(args).state_dict()
    parts, sched = _stages_and_schedule(
        args, layout, mesh["pp"], schedule, n_mb, bsz, _loader(state, mesh["ep"]), from_hidden
    )
    inputs, labels = _batch(args, 2 * bsz)
    ep_rank = mesh["ep"].get_local_rank()
    sl = slice(ep_rank * bsz, (ep_rank + 1) * bsz)  # each ep rank: its own data shard
    loss = pipeline_step(sched, inputs[sl], labels[sl])
    for part in parts:
        reduce_grads_without_fsdp(part, mesh["ep"])
        for m in part.modules():  # the load counters of the whole dp group, as the bias update needs
            if hasattr(m, "tokens_per_expert"):
                torch.distributed.all_reduce(m.tokens_per_expert, group=mesh["ep"].get_group())
    if loss is not None:
        torch.distributed.all_reduce(loss, group=mesh["ep"].get_group())
        loss = loss / 2
    loads = _loads(parts) if mesh["ep"].get_local_rank() == 0 else {}
    return (None if loss is None else loss.item()), _grads(parts), [], loads


@HEAD_LOSSES
@pytest.mark.parametrize("schedule,layout", [("1F1B", [2, 2]), ("ZBVZeroBubble", [1, 1, 1, 1])])
def test_pp2_ep2_matches_single_process(schedule, layout, from_hidden):
    if _refused_here(schedule, len(layout) // 2):
        return
    args, bsz = _args(), 2
    results = run_ranks(_pp_ep_rank, 4, args, layout, schedule, 2, bsz, from_hidden)
    _check_against_reference(args, bsz, results, ep=2, steps=1)
