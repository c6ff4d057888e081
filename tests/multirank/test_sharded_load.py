"""Sharded HF load on gloo ranks: each rank's local shard equals the matching slice of the checkpoint
tensor, and each rank reads only the bytes of its own shards (plus the small router-bias buffers), also
when FSDP shards are uneven."""

import pytest
import torch

from moonlight.hf import HFCheckpoint
from tests.dist import run_ranks
from tests.helpers import sharded_load_args


class CountingCheckpoint(HFCheckpoint):
    """An HFCheckpoint whose slice reads are counted (bytes actually materialized per key)."""

    def __init__(self, path):
        super().__init__(path)
        self.bytes_read = 0
        self.keys_read = set()

    def read(self, key, region):
        t = super().read(key, region)
        self.bytes_read += t.numel() * t.element_size()
        self.keys_read.add(key)
        return t

    def get(self, key):
        raise AssertionError("a sharded load must never read a whole tensor with get()")


def _load_worker(rank, world_size, path, degrees, sequence_parallel):
    from torch.distributed.tensor import DTensor

    from moonlight.hf import HFCheckpoint, hf_keys
    from moonlight.model import Moonlight
    from moonlight.parallel.mesh import ParallelDims, build_mesh
    from moonlight.parallel.parallelize import parallelize_model
    from moonlight.parallel.load import load_hf_sharded, local_region

    args = sharded_load_args()
    dims = ParallelDims(world_size=world_size, **degrees)
    mesh = build_mesh(dims, "cpu")
    with torch.device("meta"):
        model = Moonlight(args)
    parallelize_model(model, dims, mesh, sequence_parallel=sequence_parallel)
    model.to_empty(device="cpu")
    ckpt = CountingCheckpoint(path)
    stats = load_hf_sharded(model, checkpoint=ckpt)

    full = HFCheckpoint(path)
    expected_bytes = 0
    sharded = 0
    for name, t in list(model.named_parameters()) + [
        (n, b) for n, b in model.named_buffers() if n.endswith("expert_bias")
    ]:
        keys = hf_keys(name, args)
        ref = torch.stack([full.get(k) for k in keys]) if len(keys) > 1 else full.get(keys[0])
        local, shape, offset = local_region(t)
        region = tuple(slice(o, o + s) for o, s in zip(offset, shape))
        torch.testing.assert_close(local, ref[region], atol=0, rtol=0, msg=lambda m: f"{name}: {m}")
        if isinstance(t, DTensor):
            torch.testing.assert_close(t.full_tensor(), ref, atol=0, rtol=0)
            sharded += local.numel() < ref.numel()
        expected_bytes += local.numel() * ref.element_size()
    assert stats["bytes_read"] == ckpt.bytes_read == expected_bytes, (stats, ckpt.bytes_read, expected_bytes)
    return dict(bytes_read=ckpt.bytes_read, sharded=sharded, keys=len(ckpt.keys_read))


def _total_bytes(path):
    from moonlight.hf import HFCheckpoint

    ck = HFCheckpoint(path)
    return sum(ck.get(k).numel() * ck.get(k).element_size() for k in ck.key_to_file)


@pytest.mark.parametrize(
    "degrees,sp",
    [(dict(dp_shard=2, tp=2), True), (dict(dp_shard=4), False), (dict(dp_shard=4, ep=2), False)],
    ids=["fsdp2_tp2_sp", "fsdp4", "fsdp4_ep2"],
)
def test_each_rank_reads_only_its_shards(hf_dir, degrees, sp):
    args = sharded_load_args()
    results = run_ranks(_load_worker, 4, hf_dir, degrees, sp)
    total = _total_bytes(hf_dir)
    bias_bytes = (args.num_hidden_layers - args.first_k_dense_replace) * args.n_routed_experts * 4
    # Every rank read exactly its local shards (checked in the worker); here: how much that is.
    for r in results:
        assert r["sharded"] > 0
    if degrees.get("tp", 1) > 1:
        # TP-split matrices are read 1/4 per rank; what only FSDP splits (routed experts, router,
        # kv_a_proj, norms: replicated across tp) 1/2; router biases whole.
        for r in results:
            assert r["bytes_read"] < (total - bias_bytes) / 2 + bias_bytes, (r, total)
    else:
        # a quarter of the weights, plus the replicated router biases read whole on every rank
        for r in results:
            assert r["bytes_read"] <= (total - bias_bytes) / 4 + bias_bytes + 1024, (r, total)
        assert sum(r["bytes_read"] for r in results) == pytest.approx(total + 3 * bias_bytes, rel=0.01)
        # 8 experts over 4 ranks (FSDP rows, or EP 2 x FSDP 2): each rank opens 2 of the 8 expert keys
        n_moe = args.num_hidden_layers - args.first_k_dense_replace
        expert_keys = n_moe * 3 * args.n_routed_experts // 4
        other_keys = 3 + 7 * args.num_hidden_layers + args.first_k_dense_replace * 3 + n_moe * 5
        assert all(r["keys"] == expert_keys + other_keys for r in results), results


def test_uneven_fsdp_shards(hf_dir):
    """dp_shard=3: hidden 128, vocab 320 and the expert count do not split evenly (FSDP pads)."""
    run_ranks(_load_worker, 3, hf_dir, dict(dp_shard=3), False)
