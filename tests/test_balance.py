"""Partitioning by cost (--balance time, the command line's default), without MPI: the cut is
optimal on known cost vectors (against every contiguous split), respects a memory limit per
stage, works for interleaved chunks; a profile is measured once per cache key; the balance
table's prediction is the simulator's."""
import itertools

import pytest
import torch
from torch import nn

from mpipar import profile
from mpipar.errors import RankMapError
from mpipar.model import LayerSpec
from mpipar.pipeline.balance import balance_table, inflight_per_stage, partition, stage_memory
from mpipar.profile import LayerCost
from mpipar import rankmap
from mpipar.rankmap import interleaved_partition, linear_partition


def every_split(n, k):
    """All sizes of k contiguous non-empty groups of n layers."""
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        yield [b - a for a, b in zip(bounds, bounds[1:])]


def heaviest(weights, sizes):
    out, i = [], 0
    for s in sizes:
        out.append(sum(weights[i:i + s]))
        i += s
    return max(out)


@pytest.mark.parametrize("weights, k", [
    ([1, 1, 1, 1], 2), ([5, 1, 1, 1, 1, 1], 2), ([1, 2, 3, 4, 5, 6, 7, 8], 3),
    ([9, 1, 1, 9, 1, 1, 9], 3), ([0.3, 7.1, 0.2, 0.2, 3.3, 2.9, 0.1, 4.4, 1.0], 4), ([2, 2, 2], 3)])
def test_partition_is_optimal_against_every_contiguous_split(weights, k):
    sizes = linear_partition(weights, k)
    assert sum(sizes) == len(weights) and all(s > 0 for s in sizes) and len(sizes) == k
    assert heaviest(weights, sizes) == pytest.approx(min(heaviest(weights, s) for s in every_split(len(weights), k)))


def test_memory_limit_is_respected_and_an_impossible_one_is_refused():
    weights = [1, 1, 1, 1, 1, 1]
    mem = [10, 10, 10, 10, 10, 100]   # the last layer is big
    memory = lambda j, a, b: sum(mem[a:b])   # noqa: E731
    free = linear_partition(weights, 2)
    assert free == [3, 3]
    sizes = linear_partition(weights, 2, memory, limit=110)
    assert sizes == [4, 2]                      # [3, 3] would put 120 on stage 1
    assert memory(0, 0, 4) <= 110 and memory(1, 4, 6) <= 110
    with pytest.raises(RankMapError, match="keeps every stage within"):
        linear_partition(weights, 2, memory, limit=90)


def test_memory_depends_on_the_micro_batches_each_stage_holds():
    costs = [LayerCost(f"l{i}", 1.0, saved_bytes=100, param_bytes=1) for i in range(4)]
    inflight = inflight_per_stage("1f1b", 2, 8, 1)
    assert inflight == [2, 1]                   # 1F1B: stage s holds p - s micro-batches
    memory = stage_memory(costs, inflight)
    assert memory(0, 0, 2) == 2 * 4 * 1 + 2 * 2 * 100 and memory(1, 2, 4) == 2 * 4 * 1 + 1 * 2 * 100


def test_interleaved_chunks_are_cut_into_p_times_v_stages():
    specs = [LayerSpec(f"l{i}", lambda: nn.Linear(2, 2)) for i in range(8)]
    costs = [LayerCost(f"l{i}", w, 0, 0) for i, w in enumerate([4, 1, 1, 1, 1, 1, 1, 4])]
    stages = partition(specs, "time", 4, costs=costs)   # p=2, v=2
    sizes = [len(s) for s in stages]
    assert len(sizes) == 4 and sizes[0] == sizes[-1] == 1   # the costly ends stand alone
    assert heaviest([c.seconds for c in costs], sizes) == 4


def rank_sums(weights, sizes, p):
    groups, i = [], 0
    for s in sizes:
        groups.append(sum(weights[i:i + s]))
        i += s
    return max(sum(groups[r::p]) for r in range(p))


@pytest.mark.parametrize("weights, p, v", [
    ([4, 1, 1, 1, 1, 1, 1, 4], 2, 2), ([1, 2, 3, 4, 5, 6, 7, 8, 9], 2, 2), ([9, 1, 1, 9, 1, 1, 9, 2, 2, 5], 2, 3),
    ([0.3, 7.1, 0.2, 0.2, 3.3, 2.9, 0.1, 4.4, 1.0, 0.5, 2.5, 1.5], 3, 2), ([2] * 8, 4, 2)])
def test_interleaved_cut_minimises_the_heaviest_rank_against_every_split(weights, p, v):
    sizes = interleaved_partition(weights, p, v)
    assert sum(sizes) == len(weights) and len(sizes) == p * v and all(s > 0 for s in sizes)
    best = min(rank_sums(weights, s, p) for s in every_split(len(weights), p * v))
    assert rank_sums(weights, sizes, p) == pytest.approx(best)


def test_interleaved_cut_beats_the_per_chunk_cut_where_they_differ():
    weights = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    per_chunk = linear_partition(weights, 4)                  # minimises the heaviest chunk only
    ours = interleaved_partition(weights, 2, 2)
    assert rank_sums(weights, ours, 2) < rank_sums(weights, per_chunk, 2)


def test_interleaved_cut_keeps_each_rank_within_the_memory_limit():
    weights = [1] * 8
    mem = [10] * 7 + [100]
    memory = lambda j, a, b: sum(mem[a:b])   # noqa: E731
    sizes = interleaved_partition(weights, 2, 2, memory, limit=120)
    bounds = [0] + list(itertools.accumulate(sizes))
    held = [0, 0]
    for j, (a, b) in enumerate(zip(bounds, bounds[1:])):
        held[j % 2] += memory(j, a, b)
    assert max(held) <= 120 and sizes != [2, 2, 2, 2]       # [2,2,2,2] puts 130 on rank 1
    assert rank_sums(weights, sizes, 2) == 5                  # the best such cut: 5 and 3 layers
    with pytest.raises(RankMapError, match="keeps every rank within"):
        interleaved_partition(weights, 2, 2, memory, limit=50)


def test_interleaved_descent_on_many_cuts_is_valid_and_no_worse_than_its_start(monkeypatch):
    monkeypatch.setattr(rankmap, "EXHAUSTIVE_CUTS", 0)        # force the descent path
    weights = [float(w) for w in [5, 1, 1, 8, 2, 2, 9, 1, 3, 3, 7, 1, 1, 6, 2, 4]]
    sizes = interleaved_partition(weights, 2, 3)
    assert sum(sizes) == len(weights) and len(sizes) == 6 and all(s > 0 for s in sizes)
    assert rank_sums(weights, sizes, 2) <= rank_sums(weights, linear_partition(weights, 6), 2)


def test_interleaved_time_balance_goes_through_partition():
    specs = [LayerSpec(f"l{i}", lambda: nn.Linear(2, 2)) for i in range(9)]
    costs = [LayerCost(f"l{i}", w, 0, 0) for i, w in enumerate([1, 2, 3, 4, 5, 6, 7, 8, 9])]
    sizes = [len(s) for s in partition(specs, "time", 4, costs=costs, chunks=2)]
    assert sizes == interleaved_partition([c.seconds for c in costs], 2, 2)


def test_a_share_of_the_layers_is_profiled_with_the_same_numbers_as_the_whole():
    specs = [LayerSpec("a", lambda: nn.Linear(8, 16)), LayerSpec("b", lambda: nn.Linear(16, 32)),
             LayerSpec("c", lambda: nn.Linear(32, 4))]
    x = torch.randn(4, 8)
    whole = profile.profile_layers(specs, x, 0)
    tail = profile.profile_layers(specs, x, 0, which=range(1, 3))
    assert [c.name for c in tail] == ["b", "c"]
    assert [(c.saved_bytes, c.param_bytes) for c in tail] == [(c.saved_bytes, c.param_bytes) for c in whole[1:]]


def test_profile_runs_once_per_cache_key(tmp_path, monkeypatch):
    monkeypatch.setenv("MPIPAR_CACHE", str(tmp_path))
    calls = []
    real = profile.profile_layers
    monkeypatch.setattr(profile, "profile_layers", lambda *a, **k: calls.append(1) or real(*a, **k))
    specs = [LayerSpec("a", lambda: nn.Linear(8, 16)), LayerSpec("b", lambda: nn.Linear(16, 4))]
    first = profile.layer_costs(specs, torch.randn(4, 8), 0)
    again = profile.layer_costs(specs, torch.randn(4, 8), 0)
    assert len(calls) == 1 and first == again
    assert [c.name for c in first] == ["a", "b"] and all(c.seconds > 0 for c in first)
    assert first[0].param_bytes == (8 * 16 + 16) * 4 and first[0].saved_bytes > 0
    profile.layer_costs(specs, torch.randn(2, 8), 0)          # another micro-batch shape: a new key
    assert len(calls) == 2


def test_balance_table_predicts_the_simulated_bubble():
    costs = [LayerCost(f"l{i}", 0.003, 0, 0) for i in range(4)]
    stages = [["l0", "l1"], ["l2", "l3"]]
    text, seconds, bubble = balance_table(stages, costs, "1f1b", 2, 8, 1, inflight_per_stage("1f1b", 2, 8, 1))
    assert "bubble 0.111" in text and bubble == pytest.approx(1 / 9)   # equal stages: (p-1)/(m+p-1)
    assert seconds == pytest.approx((8 + 1) * 0.006)


def weighted_stages(stages, specs):
    from mpipar.model import param_counts
    weighted = {s.name for s, c in zip(specs, param_counts(specs)) if c}
    return [bool(weighted & set(st)) for st in stages]


def sequential_specs(*layers):
    return [LayerSpec(str(i), lambda layer=layer: layer) for i, layer in enumerate(layers)]


@pytest.mark.parametrize("balance, k", [("params", 3), ("params", 4), ("layers", 4), ("time", 4)])
def test_a_computed_cut_gives_every_stage_weights_when_there_are_enough(balance, k):
    """Issue 29: a stage of activations only has nothing for its rank's optimizer; with at least as
    many layers with weights as stages, every stage gets one (each kind alone leaves a stage without)."""
    specs = sequential_specs(nn.Tanh(), nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4), nn.ReLU(), nn.Dropout(),
                             nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    costs = [LayerCost(s.name, w, 0, 0) for s, w in zip(specs, [3, 1, 3, 1, 3, 3, 1, 3, 1])]
    stages = partition(specs, balance, k, costs=costs)
    assert [n for st in stages for n in st] == [s.name for s in specs] and len(stages) == k
    assert all(weighted_stages(stages, specs)), stages


def test_a_cut_the_user_gives_or_one_with_too_few_weighted_layers_stands():
    """README (d)'s 5 layers (3 with weights) on 4 stages keep a Tanh-only stage (Pipeline.parameters()
    hands it a placeholder); explicit sizes are never changed."""
    specs = sequential_specs(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))
    stages = partition(specs, "params", 4)
    assert len(stages) == 4 and weighted_stages(stages, specs).count(False) == 1
    assert partition(specs, [1, 1, 3], 3) == [["0"], ["1"], ["2", "3", "4"]]
