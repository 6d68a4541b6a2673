"""async_ps: the staleness gate simulated in one process (bound, sync at k=0, no deadlock,
protocol errors), the wire layout, flat parameters. The multi-rank checks are tests/mpi/cases_async.py
(and the example against its synchronous run: cases_example_runs.py), run case by case by
tests/test_mpi_cases.py."""
import heapq
import random

import pytest
import torch
from torch import nn

from mpipar.async_ps import ProtocolError, StalenessGate
from mpipar.async_ps.flat import flat_grad, flatten_
from mpipar.async_ps.protocol import Cmd, Roles, ShardLayout, command, parse_command
from mpipar.async_ps.report import histogram_lines, time_to
from mpipar.async_ps.training import AsyncPlan, check_plan, reporter_rank
from mpipar.errors import ConfigError


def simulate(k, durations, steps, seed=0):
    """Workers with given step times push to the gate; answers are instant. Returns the gate
    and, per update, the workers that were active (computing or buffered) just before it."""
    rng = random.Random(seed)
    W = len(durations)
    gate, events, base, done_steps, active_at = StalenessGate(W, k), [], {}, [0] * W, []
    for w in range(W):
        if steps[w] == 0:
            for u in gate.leave(w):
                raise AssertionError(f"leaving applied {u}")
        else:
            base[w] = gate.pull(w)
            heapq.heappush(events, (durations[w] * rng.uniform(0.5, 1.5), w))
    while events:
        t, w = heapq.heappop(events)
        done_steps[w] += 1
        final = done_steps[w] == steps[w]
        active = set(gate.computing) | set(gate.buffered) | {w}
        for u in gate.push(w, base[w], final):
            active_at.append((u, active))
            active = active - {q for q in u.workers if q not in u.reply}
            for r in u.reply:
                base[r] = u.version + 1
                heapq.heappush(events, (t + durations[r] * rng.uniform(0.5, 1.5), r))
    assert gate.finished, f"deadlock: computing {gate.computing}, buffered {gate.buffered}"
    return gate, active_at


@pytest.mark.parametrize("seed", range(40))
def test_gate_never_exceeds_k_and_never_deadlocks(seed):
    rng = random.Random(seed)
    W, k = rng.randint(1, 6), rng.randint(0, 5)
    durations = [rng.uniform(1, 5) for _ in range(W)]
    steps = [rng.randint(0, 30) for _ in range(W)]
    gate, _ = simulate(k, durations, steps, seed)
    hist = gate.histogram()
    assert max(hist, default=0) <= k
    assert sum(hist.values()) == gate.applied == sum(steps)
    assert [u.version for u in gate.updates] == list(range(gate.version))


@pytest.mark.parametrize("seed", range(10))
def test_k0_is_synchronous(seed):
    """k=0: every update averages the gradients of every worker still active, all on base V."""
    rng = random.Random(seed)
    W = rng.randint(2, 5)
    steps = [rng.randint(1, 12) for _ in range(W)]
    gate, active_at = simulate(0, [rng.uniform(1, 5) for _ in range(W)], steps, seed)
    assert len(gate.updates) == max(steps)
    for t, u in enumerate(gate.updates):
        assert set(u.workers) == {w for w in range(W) if steps[w] > t}, (t, u)
        assert set(u.staleness) == {0}


def test_straggler_staleness_reaches_but_never_passes_k():
    """A 3x straggler among 2 fast workers: unbounded, its gradients arrive several versions
    late (about 6: the others push twice per its step each); k=2 holds the fast ones back."""
    gate, _ = simulate(2, [1, 1, 3], [60, 60, 20])
    assert max(gate.histogram()) == 2
    gate, _ = simulate(100, [1, 1, 3], [60, 60, 20])
    assert 4 <= max(gate.histogram()) <= 20


def test_gate_protocol_errors():
    g = StalenessGate(2, 1)
    g.push(0, 0)                                    # applied: worker 0 now on version 1
    with pytest.raises(ProtocolError, match="pushed on base 0, but was answered version 1"):
        g.push(0, 0)
    g.leave(1)
    with pytest.raises(ProtocolError, match="worker 1 sent PUSH but has left"):
        g.push(1, 0)
    g2 = StalenessGate(2, 0)
    g2.push(0, 0)                                   # buffered: worker 1 still computing
    with pytest.raises(ProtocolError, match="has a push waiting"):
        g2.pull(0)
    with pytest.raises(ValueError):
        StalenessGate(2, -1)


def test_merge_when_stuck():
    """k=1, worker 2 slow: 0 and 1 cannot both run ahead; once 2 pushes, all three merge."""
    g = StalenessGate(3, 1)
    assert [u.workers for u in g.push(0, 0)] == [(0,)]   # V=1; others on base 0 stay within 1
    assert g.push(1, 0) == []                            # V=2 would leave worker 2 two behind
    assert g.push(0, 1) == []
    (u,) = g.push(2, 0)
    assert u.workers == (0, 1, 2) and u.staleness == (0, 1, 1) and g.version == 2


def test_roles_layout_and_command_words():
    r = Roles(size=5, servers=2, rank=3)
    assert (r.workers, r.is_server, r.index, r.worker_rank(2)) == (3, False, 1, 4)
    with pytest.raises(ConfigError, match="leaves no worker"):
        Roles(size=2, servers=2, rank=0)
    lay = ShardLayout(10, 3)
    assert [lay.bounds(s) for s in range(3)] == [(0, 4), (4, 7), (7, 10)]
    word = command(Cmd.APPLY, 4, [0, 3], [3])
    assert parse_command(word, 4) == (Cmd.APPLY, [0, 3], {3})
    assert parse_command(command(Cmd.STOP, 4), 4) == (Cmd.STOP, [], set())


def test_plan_checks():
    roles = Roles(4, 1, 0)
    plan = dict(model=None, grad_step=None, optimizer=None, steps=5)
    with pytest.raises(ConfigError, match="--slow-rank 0 is not a worker: workers are ranks 1..3"):
        check_plan(AsyncPlan(**plan, slow_rank=0), roles)
    with pytest.raises(ConfigError, match="never ends"):
        check_plan(AsyncPlan(**{**plan, "steps": None}), roles)
    with pytest.raises(ConfigError, match="2 step counts for 3 workers"):
        check_plan(AsyncPlan(**{**plan, "steps": [1, 2]}), roles)
    assert reporter_rank(roles, slow_rank=1) == 2 and reporter_rank(roles, slow_rank=3) == 1


def test_flatten_makes_views_and_grads_follow():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    before = [p.detach().clone() for p in m.parameters()]
    flat = flatten_(m)
    assert flat.numel() == sum(p.numel() for p in before)
    assert all(torch.equal(p, b) for p, b in zip(m.parameters(), before))
    flat.zero_()
    assert all(float(p.detach().abs().sum()) == 0 for p in m.parameters())
    m(torch.randn(5, 3)).sum().backward()
    g = flat_grad(m)
    assert torch.equal(g, torch.cat([p.grad.reshape(-1) for p in m.parameters()]))


def test_report_helpers():
    lines = histogram_lines({0: 3, 2: 1})
    assert len(lines) == 3 and "staleness   1" in lines[1] and "75.0%" in lines[0]
    rows = [{"seconds": 1.0, "acc": 0.5}, {"seconds": 2.0, "acc": 0.8}]
    assert time_to(rows, "acc", 0.7) == 2.0 and time_to(rows, "acc", 0.9) is None
