"""Run a function on N forked gloo ranks and collect what each returns.

Forking after torch is imported keeps multi-rank tests to seconds (spawn re-imports torch
in every worker). Each worker returns a picklable value; an exception in any rank fails
the caller with that rank's traceback.
"""

import io
import multiprocessing as mp
import os
import tempfile
import traceback

import torch
import torch.distributed as dist

from moonlight.distributed import local_tensor
from moonlight.model.model import GroupedExperts


def _worker(rank, world_size, init_file, fn, args, queue):
    try:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
        # GNU OpenMP is not fork-safe: a child that enters the parent's thread pool can hang forever
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        queue.put((rank, True, result))
    except BaseException:  # report every failure, including asserts, to the parent
        queue.put((rank, False, traceback.format_exc()))


def run_ranks(fn, world_size, *args, timeout=300):
    """Call fn(rank, world_size, *args) on world_size forked ranks; return the results by rank."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "pg_init")
        procs = [
            ctx.Process(target=_worker, args=(r, world_size, init_file, fn, args, queue)) for r in range(world_size)
        ]
        for p in procs:
            p.start()
        results, errors = {}, []
        try:
            for _ in range(world_size):
                rank, ok, value = queue.get(timeout=timeout)
                if ok:
                    results[rank] = value
                else:
                    errors.append(f"rank {rank} failed:\n{value}")
                    break  # the others may be stuck in a collective
        finally:
            for p in procs:
                p.join(timeout=5 if errors else timeout)
                if p.is_alive():
                    p.kill()
        if errors:
            raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]


def _forked_call(fn, args, queue):
    try:
        torch.set_num_threads(1)  # see _worker: never enter the parent's OpenMP pool after fork
        queue.put((True, fn(*args)))
    except BaseException:
        queue.put((False, traceback.format_exc()))


def run_forked(fn, *args, timeout=300):
    """fn(*args) in one forked child (no process group), e.g. to keep a fake process group out of
    the test process; returns its result or fails with its traceback."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_forked_call, args=(fn, args, queue))
    proc.start()
    try:
        ok, value = queue.get(timeout=timeout)
    finally:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
    if not ok:
        raise AssertionError(value)
    return value


def gathered_weights(model_parts) -> bytes | None:
    """The full state dict of a run's model parts, serialized on rank 0 (None elsewhere): plain bytes,
    since tensors in a multiprocessing queue would share fds with a dead child."""
    from moonlight.checkpoint.export import gather_full_state_dict

    weights = gather_full_state_dict(model_parts)
    if weights is None:
        return None
    buffer = io.BytesIO()
    torch.save(weights, buffer)
    return buffer.getvalue()


@torch.no_grad()
def reduce_grads_without_fsdp(model, mesh):
    """Data-parallel gradients for a test that runs EP over all of its dp ranks without FSDP (the
    trainer shards every dp > 1 run with FSDP): each rank's loss is its local mean, so the dense
    gradients are averaged over `mesh`; an expert's gradient already sums the tokens of all ep (= dp)
    ranks and is only divided by their number."""
    experts = {id(p) for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()}
    for p in model.parameters():
        if p.grad is not None:
            grad = local_tensor(p.grad)
            if id(p) not in experts:
                dist.all_reduce(grad, group=mesh.get_group())
            grad.div_(mesh.size())
