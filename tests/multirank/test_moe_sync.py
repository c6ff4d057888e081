"""Host syncs of one MoE layer (forward + backward) under expert parallel on 2 gloo ranks: exactly
one, the all-to-all split sizes (counted as in tests/single/test_moe_sync.py)."""

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
