"""async_ps on 4 ranks: k=0 equals single-process training (1, 2 and 3 servers, workers leaving
early, spinning waits), k>0 never exceeds k (from the servers' record), a budget stops every
worker, a straggler, a worker with no steps, and every run ends with nothing in flight.

Where a check needs workers to interleave in a given way (someone runs ahead of a worker that is
still computing), the workers make it so with a message on a separate World (`hold`), not with
sleeps: the outcome then follows from the protocol, whatever the machine's load."""
import time
from contextlib import contextmanager

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from mpipar.async_ps import AsyncPlan, train_async
from mpipar.async_ps.flat import flatten_
from mpipar.comm import Kind, tag

NP = (4,)
TIMEOUT = 180

torch.set_num_threads(1)
M, D, C, T = 4, 6, 3, 32   # rows per worker shard, features, classes, distinct steps of data
g = torch.Generator().manual_seed(7)
X = torch.randn(T, 3 * M, D, generator=g)
Y = torch.randint(0, C, (T, 3 * M), generator=g)
GO, AHEAD = tag(Kind.TEST, 1), tag(Kind.TEST, 2)


def make():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, C))


def shard(w, step):
    """Worker w's rows of step `step`'s batch (features in the default dtype: see float64)."""
    rows = slice(w * M, (w + 1) * M)
    return X[step % T, rows].to(torch.get_default_dtype()), Y[step % T, rows]


def grad_step(delay=None, hook=None):
    def step(model, w, t):
        x, y = shard(w, t)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if hook:
            hook(w, t)
        if delay:
            time.sleep(delay(w, t))
        return loss
    return step


def hold(world, servers, waiting, waiting_for, ahead_step):
    """Workers' step hook: worker `waiting` does not finish its step 0 until worker `waiting_for`
    has begun step `ahead_step`, i.e. until that many of its pushes were applied; and no other
    worker finishes its step 0 before `waiting` is in its step 0 (so every worker's first
    parameters are version 0, and so is the base of `waiting`'s first gradient). Messages go on
    a World of their own, so they never meet the run's."""
    side = world.split(0, world.rank, "hold")
    workers = range(side.size - servers)

    def hook(w, t):
        if w == waiting and t == 0:
            for q in workers:
                if q != waiting:
                    side.send(torch.ones(1), servers + q, GO)
            side.recv(servers + waiting_for, AHEAD, shape=(1,), dtype=torch.float32)
        elif t == 0:
            side.recv(servers + waiting, GO, shape=(1,), dtype=torch.float32)
        if w == waiting_for and t == ahead_step:
            side.send(torch.ones(1), servers + waiting, AHEAD)
    return hook


def reference(opt, steps, workers):
    """Single process: at step t, one batch = concatenation of the shards of workers still active."""
    model = make()
    o = opt(list(model.parameters()))
    for t in range(max(steps)):
        active = [w for w in range(workers) if steps[w] > t]
        x = torch.cat([shard(w, t)[0] for w in active])
        y = torch.cat([shard(w, t)[1] for w in active])
        o.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        o.step()
    return flatten_(model)


def rmsprop(params):
    return torch.optim.RMSprop(params, lr=0.01, weight_decay=5e-4)


def adam(params):
    return torch.optim.Adam(params, lr=0.01)


@contextmanager
def float64():
    """The k=0 parity runs in float64: RMSprop and Adam divide by the root of the squared
    gradient, which amplifies the rounding of a mean over pushes (vs one batch's) towards the
    tolerance, and what is compared is the protocol, not that rounding. (The k>0 cases run float32.)"""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def check_parity(world, name, servers, steps, opt, **plan):
    workers = world.size - servers
    with float64():
        r = train_async(world, AsyncPlan(make, grad_step(), opt, servers=servers, max_staleness=0, steps=steps, **plan))
        want = reference(opt, steps, workers)
    assert r.final.dtype == want.dtype == torch.float64, (r.final.dtype, want.dtype)
    assert_close(r.final, want, msg=lambda m: f"{name}: {m}")
    assert r.histogram == {0: sum(steps)}, (name, r.histogram)
    assert r.updates == max(steps), (name, r.updates)   # one merged update per round


def check_bounded(world, name, servers, k, hook=None, **plan):
    r = train_async(world, AsyncPlan(make, grad_step(plan.pop("delay", None), hook), rmsprop, servers=servers,
                                     max_staleness=k, **plan))
    assert max(r.histogram) <= k, (name, r.histogram)
    assert sum(r.histogram.values()) == r.applied == sum(r.pushes), (name, r.histogram, r.pushes)
    if r.gate is not None:   # the coordinator's full record, update by update
        assert all(s <= k for u in r.gate.updates for s in u.staleness)
        assert [u.version for u in r.gate.updates] == list(range(r.updates))
    return r


@pytest.fixture(autouse=True)
def _four_ranks(world):
    assert world.size == 4, "run on 4 ranks"


# -- k = 0: synchronous, equal to single-process training ----------------------------------------

def test_k0_one_server_three_workers_rmsprop(world):
    check_parity(world, "1 server, 3 workers, RMSprop", 1, [24, 24, 24], rmsprop)


def test_k0_two_servers_two_workers_adam_spinning_waits(world):
    check_parity(world, "2 servers, 2 workers, Adam, spinning waits", 2, [20, 20], adam, idle_poll=None)


def test_k0_workers_leave_early(world):
    check_parity(world, "1 server, workers leave early", 1, [4, 22, 9], rmsprop)


def test_k0_three_servers_one_worker(world):
    check_parity(world, "3 servers, 1 worker", 3, [20], adam)


# -- k > 0 ---------------------------------------------------------------------------------------

def test_k2_uneven_steps_a_slow_worker_is_overtaken(world):
    """Worker 0 is slow; the others run ahead, each stops at its own step count. Worker 0's first
    gradient is held until worker 1 began its step 1 (one of its pushes applied): it is then
    applied at version >= 1 on base 0, so a staleness >= 1 is certain, not a matter of timing."""
    r = check_bounded(world, "k=2, uneven steps", 1, 2, steps=[6, 15, 25],
                      delay=lambda w, t: 0.03 if w == 0 else 0.002,
                      hook=hold(world, servers=1, waiting=0, waiting_for=1, ahead_step=1))
    assert r.pushes == [6, 15, 25] and max(r.histogram) >= 1, (r.pushes, r.histogram)


def test_k3_two_servers_budget_and_a_straggler(world):
    """Budget 30: every worker stops once 30 gradients are applied (at most one more in flight).
    The straggler (rank 2 = worker 0, 20x slower) holds its first gradient until worker 1 began
    step 3: worker 1's first three gradients fit the bound (version <= 3 while worker 0 is on base 0),
    its fourth must wait for the straggler, whose gradient goes in with staleness exactly k=3."""
    r = check_bounded(world, "k=3, 2 servers, budget", 2, 3, budget=30, slow_rank=2, slow_factor=20.0,
                      hook=hold(world, servers=2, waiting=0, waiting_for=1, ahead_step=3))
    assert 30 <= r.applied < 30 + 2, (r.applied, r.pushes)
    assert max(r.histogram) == 3 and r.pushes[1] >= 4, (r.histogram, r.pushes)
    if r.gate is not None:
        first = [(u.workers, u.staleness) for u in r.gate.updates[:4]]
        assert first == [((1,), (0,))] * 3 + [((0,), (3,))], first


def test_k3_a_worker_with_no_steps(world):
    r = check_bounded(world, "k=3, worker with no steps", 1, 3, steps=[0, 12, 12], delay=lambda w, t: 0.004 * w)
    assert r.pushes == [0, 12, 12]
