"""Host syncs of one MoE layer (forward + backward): none without expert parallel, one with it (the
all-to-all split sizes), and the layer compiles as one graph.

On a CPU there is no device queue to drain, so the run is instrumented instead: every op that
would read device memory back to the host on a GPU is counted (`.item()`, `bool()`, `int()` all
reach `aten._local_scalar_dense`; `torch.equal` returns a host bool; `.tolist()` does not dispatch
and is counted at the Python level; `nonzero`, `bincount`, `masked_select`, `unique` and
`repeat_interleave` without `output_size` read sizes back). On CUDA the same layer runs under
`torch.cuda.set_sync_debug_mode("error")`.
"""

from torch.distributed.device_mesh import init_device_mesh

from moonlight.parallel.expert import apply_expert_parallel
from tests.dist import run_ranks
from tests.helpers import host_syncs
from tests.helpers import moe_sync_args, moe_sync_inputs, moe_sync_moe, moe_sync_step


def _ep_syncs(rank, world):
    args = moe_sync_args()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    moe = apply_expert_parallel(moe_sync_moe(args), mesh, align=4)
    x = moe_sync_inputs(args, batch=1 + rank)
    moe_sync_step(moe, x)  # warm up (first collectives set up the group)
    return host_syncs(lambda: moe_sync_step(moe, x))


def test_expert_parallel_moe_layer_syncs_once():
    for syncs in run_ranks(_ep_syncs, 2):
        assert syncs == ["tolist"]
