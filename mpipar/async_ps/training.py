"""One asynchronous run on every rank of a World: servers serve, workers loop (compute, push,
take the answer), then every rank learns the final parameters and the servers' record.

A straggler is simulated by sleeping (F-1) x the measured compute time after each step, so the
slow worker uses no extra CPU and the other ranks' speed is not disturbed (fair on a shared box).
With `step_time` T every step is padded by sleeping to T wall seconds (the straggler's to F x T):
an emulated cluster with a core per worker, when the host has fewer cores than workers.
For the same reason waiting ranks sleep-poll (`idle_poll`) rather than spin in MPI: with more
ranks than cores a spinning waiter steals CPU from the ranks that compute, which would slow
synchronous rounds (where workers wait most) more than asynchronous ones.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from ..comm.world import pending_message
from ..comm.tags import label
from ..errors import ConfigError
from .flat import flat_grad, flatten_
from .gate import ProtocolError
from .protocol import Roles, ShardLayout
from .server import Coordinator, ShardState, follow
from .worker import PSClient


@dataclass
class AsyncPlan:
    """What a run needs beyond the World; the rest is the same for every model."""
    model: Callable[[], nn.Module]                       # identical on every rank (seed inside)
    grad_step: Callable[[nn.Module, int, int], torch.Tensor]   # (model, worker, step) -> loss, after backward
    optimizer: Callable[[list], torch.optim.Optimizer]   # over the server's shard, elementwise
    servers: int = 1
    max_staleness: int = 0
    steps: int | Sequence[int] | None = None   # pushes per worker (None: until the budget stops it)
    budget: int = 0                  # stop every worker once this many gradients are applied (0: off)
    slow_rank: int = -1              # world rank of a simulated straggler (-1: none)
    slow_factor: float = 1.0
    step_time: float = 0.0           # > 0: every step padded to this wall time by sleeping (x slow_factor)
    snapshot_every: int = 0          # reporter keeps the parameters every this many applied gradients
    idle_poll: float | None = 5e-4   # waiting ranks sleep-poll (s) instead of spinning; None: spin


@dataclass
class Snapshot:
    seconds: float     # since the start of training (reporter's clock)
    applied: int       # gradients applied by the servers when these parameters were answered
    version: int
    loss: float        # the reporter's last training loss
    flat: torch.Tensor


@dataclass
class AsyncResult:
    final: torch.Tensor                      # final flat parameters (every rank)
    seconds: float                           # coordinator: start to the last worker leaving (every rank)
    applied: int                             # gradients applied
    updates: int                             # optimizer steps (a merge of several gradients is one)
    histogram: dict[int, int]                # staleness -> gradients applied with it (every rank)
    pushes: list[int]                        # per worker (every rank)
    reporter: int                            # rank (in the run's World) that kept the snapshots
    snapshots: list[Snapshot] = field(default_factory=list)   # on the reporter only
    gate: object = None                      # the coordinator's StalenessGate (rank 0 only)
    compute_ms: list[float] = field(default_factory=list)   # per worker: mean compute per step, unpadded

    @property
    def max_staleness_seen(self) -> int:
        return max(self.histogram, default=0)


def check_plan(plan: AsyncPlan, roles: Roles) -> None:
    if plan.max_staleness < 0:
        raise ConfigError(f"--max-staleness must be >= 0, got {plan.max_staleness}")
    if plan.slow_rank >= 0 and not (roles.servers <= plan.slow_rank < roles.size):
        raise ConfigError(f"--slow-rank {plan.slow_rank} is not a worker: workers are ranks "
                          f"{roles.servers}..{roles.size - 1} (ranks 0..{roles.servers - 1} serve)")
    if plan.steps is None and plan.budget <= 0:
        raise ConfigError("an asynchronous run needs a step count or a budget, or it never ends")
    if isinstance(plan.steps, Sequence) and len(plan.steps) != roles.workers:
        raise ConfigError(f"{len(plan.steps)} step counts for {roles.workers} workers")


def reporter_rank(roles: Roles, slow_rank: int) -> int:
    """The first worker that is not the straggler keeps the snapshots."""
    return next((r for r in range(roles.servers, roles.size) if r != slow_rank), roles.servers)


def train_async(world, plan: AsyncPlan) -> AsyncResult:
    """Run `plan` on every rank of `world` (a private copy of it, so runs never mix messages)."""
    world = world.split(0, world.rank, "async")
    roles = Roles(world.size, plan.servers, world.rank)
    check_plan(plan, roles)
    model = plan.model()
    flat = flatten_(model)
    layout = ShardLayout(flat.numel(), roles.servers)
    reporter = reporter_rank(roles, plan.slow_rank)
    coordinator, snapshots, compute = None, [], (0.0, 0)
    state = ShardState(layout.shard(flat, roles.index), plan.optimizer) if roles.is_server else None
    world.barrier()
    t0 = time.perf_counter()
    if roles.is_coordinator:
        coordinator = Coordinator(world, roles, layout, state, plan.max_staleness, plan.budget,
                                  plan.idle_poll).run(t0)
    elif roles.is_server:
        follow(world, roles, layout, state, plan.idle_poll)
    else:
        snapshots, compute = work(world, roles, layout, model, flat, plan, t0, world.rank == reporter)
    result = finish(world, roles, layout, flat.dtype, state, coordinator, reporter, snapshots)
    spent = world.allgather_floats(list(compute))[roles.servers:]
    result.compute_ms = [1e3 * s / max(n, 1) for s, n in spent.tolist()]
    return result


def work(world, roles, layout, model, flat, plan: AsyncPlan, t0: float, reporting: bool):
    """The worker loop: compute on the parameters in hand, push, receive the next ones.
    Returns (snapshots, (compute seconds, steps))."""
    w = roles.index
    cap = plan.steps[w] if isinstance(plan.steps, Sequence) else plan.steps
    slow = plan.slow_factor if world.rank == plan.slow_rank else 1.0
    client = PSClient(world, roles, layout, flat, plan.idle_poll)
    reply, step, loss, snapshots, final, computing = client.pull(), 0, float("nan"), [], False, 0.0
    while not reply.stop and (cap is None or step < cap):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss = float(plan.grad_step(model, w, step).detach())
        grad = flat_grad(model)
        computing += time.perf_counter() - start
        pace(start, slow, plan.step_time)
        step += 1
        final = cap is not None and step == cap
        before = reply.applied
        reply = client.push(grad, final)
        if final:
            break
        every = plan.snapshot_every
        if reporting and every and reply.applied // every > before // every:
            snapshots.append(Snapshot(time.perf_counter() - t0, reply.applied, reply.version, loss, flat.clone()))
    if not final:
        client.leave()
    client.close()
    return snapshots, (computing, step)


def pace(start: float, slow: float, step_time: float) -> None:
    """Sleep so the step started at `start` lasts slow x step_time (emulated cluster: one core
    per worker, whatever else runs on this box), or, with step_time 0, slow x its compute time."""
    spent = time.perf_counter() - start
    target = slow * (step_time if step_time > 0 else spent)
    if target > spent:
        time.sleep(target - spent)


def finish(world, roles, layout, dtype, state, coordinator, reporter, snapshots) -> AsyncResult:
    """Collectives after the protocol: final shards from each server, the coordinator's record."""
    final = torch.empty(layout.numel, dtype=dtype)
    if state is not None:
        layout.shard(final, roles.index).copy_(state.published)
    for s in range(roles.servers):
        world.bcast_(layout.shard(final, s), root=s)
    W = roles.workers
    n = torch.zeros(1, dtype=torch.int64)
    if coordinator:
        hist = coordinator.gate.histogram()
        n[0] = max(hist, default=0) + 1
    world.bcast_(n, 0)
    record = torch.zeros(3 + W + int(n[0]), dtype=torch.float64)
    if coordinator:
        g = coordinator.gate
        record[:3] = torch.tensor([coordinator.seconds, g.applied, len(g.updates)], dtype=torch.float64)
        record[3:3 + W] = torch.tensor(coordinator.pushes, dtype=torch.float64)
        for s, c in hist.items():
            record[3 + W + s] = c
    world.bcast_(record, 0)
    histogram = {s: int(c) for s, c in enumerate(record[3 + W:].tolist()) if c}
    leftover = pending_message(world)   # after the collectives: every protocol message has landed
    if leftover:
        raise ProtocolError(f"rank {world.world_rank}: a message from rank {leftover[0]} "
                            f"({label(leftover[1])}) was never received")
    return AsyncResult(final, float(record[0]), int(record[1]), int(record[2]), histogram,
                       [int(v) for v in record[3:3 + W]], reporter, snapshots,
                       coordinator.gate if coordinator else None)
