"""Multi-rank checks of async_ps on 4 ranks, one launch: k=0 equals single-process training
(1 and 2 servers, workers leaving early), k>0 never exceeds k (from the servers' record),
budget stops, a straggler, and every run ends with nothing in flight."""
import time

import torch
from torch import nn
from torch.testing import assert_close

from mpipar.async_ps import AsyncPlan, train_async
from mpipar.async_ps.flat import flatten_
from mpipar.comm import World, failure

torch.set_num_threads(1)
T0 = time.perf_counter()
world = World()
failure.install(world.host)
assert world.size == 4, "run on 4 ranks"
M, D, C, T = 4, 6, 3, 32   # rows per worker shard, features, classes, distinct steps of data
g = torch.Generator().manual_seed(7)
X = torch.randn(T, 3 * M, D, generator=g)
Y = torch.randint(0, C, (T, 3 * M), generator=g)


def make():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, C))


def shard(w, step):
    rows = slice(w * M, (w + 1) * M)
    return X[step % T, rows], Y[step % T, rows]


def grad_step(delay=None):
    def step(model, w, t):
        x, y = shard(w, t)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if delay:
            time.sleep(delay(w, t))
        return loss
    return step


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


def check_parity(name, servers, steps, opt, **plan):
    workers = world.size - servers
    r = train_async(world, AsyncPlan(make, grad_step(), opt, servers=servers, max_staleness=0, steps=steps, **plan))
    assert_close(r.final, reference(opt, steps, workers), msg=lambda m: f"{name}: {m}")
    assert r.histogram == {0: sum(steps)}, (name, r.histogram)
    assert r.updates == max(steps), (name, r.updates)   # one merged update per round
    if world.rank == 0:
        print(f"[{time.perf_counter() - T0:.1f} s] ok {name}: k=0 equals single-process training after {max(steps)} steps", flush=True)


def check_bounded(name, servers, k, **plan):
    r = train_async(world, AsyncPlan(make, grad_step(plan.pop("delay", None)), rmsprop, servers=servers,
                                     max_staleness=k, **plan))
    assert max(r.histogram) <= k, (name, r.histogram)
    assert sum(r.histogram.values()) == r.applied == sum(r.pushes), (name, r.histogram, r.pushes)
    if r.gate is not None:   # the coordinator's full record, update by update
        assert all(s <= k for u in r.gate.updates for s in u.staleness)
        assert [u.version for u in r.gate.updates] == list(range(r.updates))
    if world.rank == 0:
        print(f"[{time.perf_counter() - T0:.1f} s] ok {name}: staleness histogram {dict(sorted(r.histogram.items()))} (k={k}), "
              f"pushes per worker {r.pushes}, {r.updates} updates", flush=True)
    return r


check_parity("1 server, 3 workers, RMSprop", 1, [24, 24, 24], rmsprop)
check_parity("2 servers, 2 workers, Adam, spinning waits", 2, [20, 20], adam, idle_poll=None)
check_parity("1 server, workers leave early", 1, [4, 22, 9], rmsprop)
check_parity("3 servers, 1 worker", 3, [20], adam)

# k > 0: the worker 0 is slow, so the others run ahead; different step counts, one finishes first
r = check_bounded("k=2, uneven steps", 1, 2, steps=[6, 15, 25], delay=lambda w, t: 0.03 if w == 0 else 0.002)
assert r.pushes == [6, 15, 25] and max(r.histogram) >= 1, (r.pushes, r.histogram)
r = check_bounded("k=3, 2 servers, budget", 2, 3, budget=30, slow_rank=2, slow_factor=20.0)
assert 30 <= r.applied < 30 + 2 and r.pushes[0] < r.pushes[1], (r.applied, r.pushes)
r = check_bounded("k=3, worker with no steps", 1, 3, steps=[0, 12, 12], delay=lambda w, t: 0.004 * w)
assert r.pushes == [0, 12, 12]
world.barrier()
if world.rank == 0:
    print(f"async checks passed on {world.size} ranks", flush=True)
