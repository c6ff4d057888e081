"""Distributed Muon's owner assignment (moonlight.train.muon): the largest matrices go first to the
least loaded rank of the group sharing them, so the Newton-Schulz FLOPs balance per sharing group."""

from moonlight.train.muon import MatrixPlan, assign_owners, ns_flops


# ------------------------------------------------------------------------------------------
# Owner assignment
# ------------------------------------------------------------------------------------------


def _plan(members, shape, count=1, stacked=False):
    box = (slice(0, shape[0]), slice(0, shape[1]))
    return MatrixPlan(tuple(members), 0, (box,) * len(members), shape, count, stacked)


def test_owners_balance_ns_flops_per_sharing_group():
    group, other = (0, 1, 2, 3), (0, 2)
    shared = [
        _plan(group, (32, 64)),
        _plan(group, (64, 64)),
        _plan(group, (32, 32), count=8, stacked=True),
        _plan(group, (64, 64)),
        _plan(group, (48, 64)),
        _plan(group, (16, 16)),
    ]
    plans = shared + [_plan(other, (64, 64)), _plan(other, (64, 64)), _plan((0,), (8, 8))]
    assign_owners(plans, [5] * len(plans))
    assert plans[1].owners == (0,) and plans[3].owners == (1,)  # largest first, to the least loaded
    assert plans[-1].owners == (0,)  # unshared: local
    assert sorted(plans[6].owners + plans[7].owners) == [0, 1]  # another group balances on its own
    loads = [0] * 4
    for plan in shared:
        for owner in plan.owners:
            loads[owner] += ns_flops(*plan.shape)
    assert max(loads) <= 1.2 * min(loads), loads
    # the experts of one weight are spread, several per owner (orthogonalized as one batch)
    assert len(plans[2].owned_by) > 1 and max(len(ks) for ks in plans[2].owned_by.values()) > 1
