"""ParallelDims validation (clear errors before anything is built) and mesh construction at scale
with the fake process group (no communication), each in a forked child so the parent never holds a
process group."""

import pytest
import torch

from moonlight.config import ModelArgs
from moonlight.errors import ParallelConfigError
from moonlight.parallel.mesh import ParallelDims
from tests.dist import run_forked


def _debug(**kw):
    return ModelArgs.preset("debug", kernels="torch", **kw)


def test_dp_shard_fills_the_rest():
    d = ParallelDims(dp_replicate=2, tp=2, pp=2, world_size=64)
    assert d.dp_shard == 8 and d.dp == 16
    assert ParallelDims(world_size=4).dp_shard == 4
    d.validate(ModelArgs(), pp_layout=[14, 13])


INVALID = {
    "product": (dict(dp_shard=3, tp=2, world_size=4), {}, "must multiply to the number of ranks"),
    "unresolvable": (dict(tp=3, world_size=4), {}, "cannot resolve dp_shard=-1"),
    "heads_tp": (dict(tp=8, world_size=8), {}, "num_attention_heads=4 is not divisible by tp=8"),
    "vocab_tp": (dict(tp=2, world_size=2), dict(vocab_size=321), "vocab_size=321 is not divisible by tp=2"),
    "experts_ep": (dict(dp_shard=3, ep=3, world_size=3), {}, "n_routed_experts=8 is not divisible by ep=3"),
    "ep_borrow": (dict(dp_shard=2, ep=4, world_size=2), {}, "ep=4 does not divide dp_shard=2: expert parallel"),
    "ep_span_needs_sp": (
        dict(dp_shard=2, tp=2, ep=4, world_size=4),
        {},
        "so the expert groups take tensor-parallel ranks, which needs sequence_parallel=True",
    ),
    "ep_span_divides": (
        dict(dp_shard=2, tp=2, ep=8, world_size=4),
        dict(sequence_parallel=True),
        "ep=8 divides neither dp_shard=2 nor dp_shard x tp=4",
    ),
    "layers_pp_vp": (dict(pp=2, world_size=2), dict(vp=3), "6 stages exceed the 4 decoder layers"),
    "pp_layout_sum": (dict(pp=2, world_size=2), dict(pp_layout=[2, 3]), "sums to 5 but the model has 4 layers"),
    "pp_layout_empty_stage": (dict(pp=2, world_size=2), dict(pp_layout=[4, 0]), "at least one decoder layer"),
    "sp_needs_tp": (dict(world_size=2), dict(sequence_parallel=True), "sequence_parallel=True needs tensor parallel"),
    "sp_seq_len": (dict(tp=2, world_size=2), dict(sequence_parallel=True, seq_len=7), "seq_len=7 is not divisible"),
    "cp_seq_len": (dict(cp=2, world_size=2), dict(seq_len=30), "seq_len=30 is not divisible by 2 x cp = 4"),
    "cp_sp_seq_len": (
        dict(cp=2, tp=4, world_size=8),
        dict(sequence_parallel=True, seq_len=12),
        "use a seq_len that is a multiple of 8",
    ),
    "sp_seq_len_fix": (dict(tp=4, world_size=4), dict(sequence_parallel=True, seq_len=6), "a multiple of 4"),
    "ep_borrow_cp": (dict(dp_shard=1, cp=2, tp=2, ep=4, world_size=4), {}, "ep=4 does not divide dp_shard=1 x cp=2"),
}


@pytest.mark.parametrize("name", list(INVALID))
def test_invalid_degrees_fail_fast(name):
    dims_kw, extra, message = INVALID[name]
    extra = dict(extra)
    model_kw = {k: extra.pop(k) for k in list(extra) if k in ("vocab_size",)}
    with pytest.raises(ParallelConfigError) as info:
        ParallelDims(**dims_kw).validate(_debug(**model_kw), **extra)
    assert message in str(info.value)


def test_all_errors_reported_at_once():
    with pytest.raises(ParallelConfigError) as info:
        ParallelDims(tp=8, ep=3, dp_shard=1, world_size=8).validate(_debug(vocab_size=324))
    text = str(info.value)
    assert "num_attention_heads" in text and "vocab_size" in text and "n_routed_experts" in text
    assert "ep=3 divides neither dp_shard=1 nor dp_shard x tp=8" in text


def test_ep_spans_tp_only_when_ep_does_not_divide_dp_shard():
    over_dp_shard = ParallelDims(dp_shard=2, tp=2, ep=2, world_size=4).validate(_debug(), sequence_parallel=True)
    assert not over_dp_shard.ep_spans_tp and over_dp_shard.expert_shard == 1
    spanning = ParallelDims(dp_shard=2, tp=2, ep=4, world_size=4).validate(_debug(), sequence_parallel=True)
    assert spanning.ep_spans_tp and spanning.expert_shard == 1
    tp4 = ParallelDims(dp_shard=1, tp=4, ep=2, world_size=4).validate(_debug(), sequence_parallel=True)
    assert tp4.ep_spans_tp and tp4.expert_shard == 2
    assert "ep=4 over dp_shard x cp x tp" in spanning.describe()


def test_nonpositive_degree():
    with pytest.raises(ParallelConfigError, match="tp must be a positive integer"):
        ParallelDims(tp=0, world_size=2)


def _fake_mesh_worker(rank, dims_kw):
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from moonlight.parallel.mesh import build_mesh

    dist.init_process_group("fake", rank=rank, world_size=64, store=FakeStore())
    try:
        dims = ParallelDims(world_size=64, **dims_kw).validate(ModelArgs(), pp_layout=[14, 13])
        mesh = build_mesh(dims, "cpu")
        out = {
            name: (mesh[name].size(), mesh[name].mesh.flatten().tolist())
            for name in (
                "pp",
                "dp_replicate",
                "dp_shard",
                "cp",
                "tp",
                "dp",
                "dp_cp",
                "fsdp",
                "ep",
                "dp_shard_mod_ep",
                "expert_fsdp",
                "replicas",
            )
        }
        out["ranks"] = (mesh.dp_rank, mesh.cp_rank, mesh.tp_rank, mesh.pp_rank)
        no_ep = build_mesh(ParallelDims(dp_shard=32, tp=2, world_size=64), "cpu")
        try:
            no_ep["ep"]
            out["ep_missing_error"] = None
        except KeyError as e:
            out["ep_missing_error"] = str(e)
        return out
    finally:
        dist.destroy_process_group()


def test_fake_mesh_64_ranks():
    rank = 45  # pp 1, dp_replicate 0, dp_shard 6, tp 1  (45 = 32 + 0*16 + 6*2 + 1)
    out = run_forked(_fake_mesh_worker, rank, dict(dp_replicate=2, tp=2, ep=4, pp=2))
    assert out["pp"] == (2, [13, 45])
    assert out["tp"] == (2, [44, 45])
    assert out["cp"] == (1, [45])
    assert out["dp_shard"] == (8, [33 + 2 * i for i in range(8)])
    assert out["dp_replicate"] == (2, [45, 61])
    assert out["dp"][0] == 16 and out["dp"][1] == [33 + 2 * i for i in range(16)]
    assert out["fsdp"] == (16, [33 + 2 * i for i in range(16)])  # HSDP: 2-D (replicate, shard)
    # ep borrows 4 consecutive dp_shard ranks (same pp/dp_replicate/tp): dp_shard 4..7
    assert out["ep"] == (4, [41, 43, 45, 47])
    assert out["dp_shard_mod_ep"] == (2, [37, 45])
    assert out["expert_fsdp"] == (4, [37, 45, 53, 61])
    assert out["replicas"] == (32, list(range(32, 64)))
    assert out["ranks"] == (6, 0, 1, 1)
    assert "only when ep > 1" in out["ep_missing_error"]


def _fake_spanning_mesh_worker(rank):
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from moonlight.parallel.mesh import build_mesh

    dist.init_process_group("fake", rank=rank, world_size=48, store=FakeStore())
    try:
        dims = ParallelDims(dp_replicate=2, tp=2, ep=4, pp=2, world_size=48)
        dims.validate(ModelArgs(), pp_layout=[14, 13], sequence_parallel=True)
        mesh = build_mesh(dims, "cpu")
        return {
            name: (mesh[name].size(), mesh[name].mesh.flatten().tolist())
            for name in ("dp", "routing", "ep", "dp_shard_tp_mod_ep", "expert_fsdp")
        }
    finally:
        dist.destroy_process_group()


def test_fake_mesh_ep_spanning_tp():
    rank = 45  # pp 1, dp_replicate 1, dp_shard 4, tp 1: index 9 of the flattened (dp_shard=6, tp=2)
    out = run_forked(_fake_spanning_mesh_worker, rank)
    assert out["dp"] == (12, list(range(25, 48, 2)))
    assert out["routing"] == (24, list(range(24, 48)))  # every tp rank routes its own tokens
    assert out["ep"] == (4, [44, 45, 46, 47])  # 4 consecutive ranks of (dp_shard, tp): indices 8..11
    assert out["dp_shard_tp_mod_ep"] == (3, [37, 41, 45])  # indices 1, 5, 9: the same ep index
    assert out["expert_fsdp"] == (6, [25, 29, 33, 37, 41, 45])  # x dp_replicate


def test_fake_mesh_64_ranks_context_parallel():
    rank = 45  # pp 1, dp_replicate 0, dp_shard 3, cp 0, tp 1  (45 = 32 + 0*16 + 3*4 + 0*2 + 1)
    out = run_forked(_fake_mesh_worker, rank, dict(dp_replicate=2, cp=2, tp=2, ep=4, pp=2))
    assert out["tp"] == (2, [44, 45])
    assert out["cp"] == (2, [45, 47])
    assert out["dp_shard"] == (4, [33, 37, 41, 45])
    # the loader's data-parallel group leaves cp out: cp ranks read the same batch
    assert out["dp"] == (8, [33, 37, 41, 45, 49, 53, 57, 61])
    # ranks holding different tokens: FSDP shards and averages over dp_shard x cp (x dp_replicate)
    assert out["dp_cp"] == out["fsdp"] == (16, [33 + 2 * i for i in range(16)])
    # ep borrows 4 consecutive ranks of the (dp_shard, cp) grid: index dp_shard * cp + cp = 6 -> 4..7
    assert out["ep"] == (4, [41, 43, 45, 47])
    assert out["dp_shard_mod_ep"] == (2, [37, 45])
    assert out["expert_fsdp"] == (4, [37, 45, 53, 61])
    assert out["ranks"] == (3, 0, 1, 1)


def _fake_full_model_worker(rank):
    """The real 16B config on the meta device, tp2 x fsdp32 with sequence parallel, on 64 fake ranks."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from moonlight.model import Moonlight
    from moonlight.parallel.mesh import build_mesh
    from moonlight.parallel.parallelize import parallelize_model
    from moonlight.parallel.load import local_region

    dist.init_process_group("fake", rank=rank, world_size=64, store=FakeStore())
    try:
        args = ModelArgs(kernels="torch")
        dims = ParallelDims(tp=2, world_size=64)
        mesh = build_mesh(dims, "cpu")
        with torch.device("meta"):
            model = Moonlight(args)
        parallelize_model(model, dims, mesh, sequence_parallel=True, ac_mode="full", param_dtype="bfloat16")
        params = dict(model.named_parameters())
        return {
            n: (tuple(local_region(params[n])[1]), tuple(local_region(params[n])[2]), str(params[n].placements))
            for n in (
                "embed.weight",
                "lm_head.weight",
                "layers.0.attn.q_proj.weight",
                "layers.0.attn.o_proj.weight",
                "layers.1.ffn.experts.gate_proj",
                "layers.1.attn.kv_a_proj.weight",
                "layers.1.ffn.shared_experts.down_proj.weight",
            )
        }
    finally:
        dist.destroy_process_group()


def test_fake_full_size_model_shards():
    out = run_forked(_fake_full_model_worker, 3)  # dp_shard 1, tp 1
    # vocab 163840 / tp 2 = 81920 rows, then / 32 fsdp = 2560 rows: rank holds vocab half 1, block 1
    assert out["embed.weight"][:2] == ((2560, 2048), (81920 + 2560, 0))
    assert out["lm_head.weight"][:2] == ((2560, 2048), (81920 + 2560, 0))
    assert out["layers.0.attn.q_proj.weight"][:2] == ((48, 2048), (1536 + 48, 0))  # 3072 rows
    assert out["layers.0.attn.o_proj.weight"][:2] == ((64, 1024), (64, 1024))  # [2048, 2048] cols by tp
    assert out["layers.1.ffn.experts.gate_proj"][:2] == ((2, 1408, 2048), (2, 0, 0))  # 64 experts / 32
    assert out["layers.1.attn.kv_a_proj.weight"][:2] == ((18, 2048), (18, 0))  # 576 rows, replicated over tp
    assert out["layers.1.ffn.shared_experts.down_proj.weight"][:2] == ((64, 1408), (64, 1408))
