"""benchmarks/cpu_proxies.py: the op counter counts what it should, and one training step of the
Moonlight-width slice (meta device, Triton kernels) stays within the launch, copy and fill budgets
recorded there and in benchmarks/README.md."""

import torch

from benchmarks.cpu_proxies import BUDGETS, build, slice_args, step_counts
from benchmarks.op_counter import OpCounter
from moonlight.kernels.moe_permute import permute_tokens


def test_counter_counts_kernels_casts_and_fills_but_not_views():
    x = torch.randn(8, 4)
    expert_ids = torch.tensor([[0], [1]] * 4)
    counter = OpCounter()
    with counter:
        y = x.t().reshape(-1)  # a copy (reshape of a transpose) ...
        x.view(2, 16).float()  # ... views and a same-dtype .float() are free
        x.double()  # a cast: 8 x 4 x 8 bytes
        torch.zeros(3)  # a fill
        permute_tokens(x, expert_ids, 2, impl="triton")
    counts = counter.summary()
    assert counts["copies"] == {"aten.clone": y.numel() * 4, "aten._to_copy": 8 * 4 * 8}
    assert counts["fill_bytes"] >= 3 * 4
    assert counter.launches["triton._expand_rows_kernel"] == 1


def test_a_slice_training_step_stays_within_its_budget():
    """Shapes only (meta device): about 2 s. The debug model's budget is checked by the script."""
    model = build(slice_args(), "meta", torch.bfloat16)
    counts = step_counts(model, torch.zeros(1, 4096, dtype=torch.long, device="meta"))
    for key, budget in BUDGETS["slice bf16 meta"].items():
        assert counts[key] <= budget, (key, counts[key], budget, counts["top_ops"])
