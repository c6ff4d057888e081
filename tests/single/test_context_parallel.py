"""Context parallel (moonlight.parallel.context) without ranks: the zig-zag slicing balances causal
work and covers the sequence, and a model call without the global positions is refused."""

import pytest
import torch

from moonlight.parallel.context import zigzag_indices, zigzag_slice


def test_zigzag_chunks_balance_causal_work_and_cover_the_sequence():
    cp, seq = 4, 64
    held = [zigzag_indices(seq, cp, r) for r in range(cp)]
    assert torch.equal(torch.cat(held).sort().values, torch.arange(seq))
    assert held[1].tolist() == list(range(8, 16)) + list(range(48, 56))  # chunks 1 and 2*cp-1-1 = 6
    # causal work: keys visible to the rank's queries, the same on every rank
    assert len({int((idx + 1).sum()) for idx in held}) == 1
    x = torch.arange(2 * seq).view(2, seq)
    for r in range(cp):
        assert torch.equal(zigzag_slice(x, cp, r), x[:, held[r]])
    with pytest.raises(ValueError, match="2 \\* cp"):
        zigzag_slice(torch.zeros(1, 30), cp, 0)


def test_context_parallel_without_positions_is_refused():
    """A slice's tokens are not positions 0..S-1: without the global positions RoPE would be wrong."""
    from moonlight.parallel.context import ContextParallelKeyExchange

    latent, k_pe, cos = torch.zeros(1, 4, 8), torch.zeros(1, 4, 4), torch.ones(4, 2)
    with pytest.raises(ValueError, match="context parallel needs each token's global RoPE position"):
        ContextParallelKeyExchange(None, 2, 0).gather_keys(latent, k_pe, cos, cos, "torch")
