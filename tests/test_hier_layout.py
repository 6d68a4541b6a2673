"""The hierarchical all-reduce's bookkeeping, in one process: which rank owns which slice on hosts
of equal and unequal rank counts (every slice owned once per host, so each crosses hosts on
exactly one rail with one rank per host), and when `auto` picks it (tests/test_hier_hosts.py
runs it across hosts)."""
import pytest

from mpipar.comm.shared import HostLayout
from mpipar.data_parallel.reduce import choose_algorithm


def layout(sizes):
    host_of = [h for h, s in enumerate(sizes) for _ in range(s)]
    local_of = [l for s in sizes for l in range(s)]
    return HostLayout(host_of, local_of, list(sizes), node=None, rails={})


@pytest.mark.parametrize("sizes", [[2, 2], [2, 2, 2], [2, 1, 1], [2, 2, 1], [3, 1], [1, 1, 1, 1], [4]])
def test_every_slice_has_one_owner_per_host(sizes):
    lay = layout(sizes)
    assert lay.slices == max(sizes) and lay.describe() == "+".join(map(str, sizes))
    for j in range(lay.slices):
        owners = [r for r in range(sum(sizes)) if j in lay.owned(r)]
        assert sorted(lay.host_of[r] for r in owners) == list(range(len(sizes)))   # one per host
        for r in owners:
            assert lay.local_of[r] == lay.owner_local(lay.host_of[r], j)
    for r in range(sum(sizes)):   # a rank's share of the slices is as even as its host allows
        L = sizes[lay.host_of[r]]
        assert len(lay.owned(r)) in (lay.slices // L, -(-lay.slices // L))


def test_equal_hosts_give_each_local_rank_its_own_slice():
    lay = layout([2, 2, 2])
    assert [lay.owned(r) for r in range(6)] == [[0], [1]] * 3


def test_auto_picks_hier_only_across_hosts_with_a_shared_host():
    for nbytes in (4, 64 * 2 ** 10, 2 ** 20, 64 * 2 ** 20):
        assert choose_algorithm(nbytes, 4, shared=False, grouped=True) == "hier"
        assert choose_algorithm(nbytes, 4, shared=True, grouped=False) == choose_algorithm(nbytes, 4, shared=True)
        assert choose_algorithm(nbytes, 4, shared=False, grouped=False) in ("doubling", "halving", "ring")
    assert choose_algorithm(2 ** 20, 1, grouped=True) == "none"


def test_across_hosts_the_ring_replaces_halving():
    assert choose_algorithm(4 * 2 ** 20, 4) == "halving"                    # one host: unchanged
    assert choose_algorithm(4 * 2 ** 20, 4, across=True) == "ring"
    assert choose_algorithm(1024, 4, across=True) == "doubling"


def test_members_list_each_hosts_ranks_by_local_rank_when_hosts_interleave():
    lay = HostLayout([0, 1, 0, 1, 2], [0, 0, 1, 1, 0], [2, 2, 1], node=None, rails={})   # --map-by node
    assert lay.members == [[0, 2], [1, 3], [4]]
    assert all(lay.local_of[q] == l for ranks in lay.members for l, q in enumerate(ranks))
