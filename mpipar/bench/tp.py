"""tp: ParallelMLP forward+backward at tp = 1, 2, 4 (as many as the job's ranks allow) against the
unsplit nn.Sequential on one rank: time per step, all-reduces per forward and backward, payload
bytes and ring-model bytes each rank sends per step. Run `mpirun -np 4 python -m mpipar.bench tp`.

Ranks outside the measured tp group wait at a barrier, so every row runs alone on the machine.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from ..comm import World, failure
from ..comm.waits import BOARD
from ..tensor import ParallelMLP, TPGroup, counter_init_, reference_mlp


def step_times(model, x, iters: int, warmup: int, sync=None) -> tuple[list[float], list[float]]:
    """Per-step wall time and time spent waiting in collectives (BOARD), after warm-up."""
    times, waits = [], []
    for i in range(warmup + iters):
        if sync:
            sync()
        t0, w0 = time.perf_counter(), BOARD.seconds
        model(x).sum().backward()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            waits.append(BOARD.seconds - w0)
    return times, waits


class Setup:
    """One row of the table: a module on ranks 0..tp-1 (tp=0: the unsplit module on rank 0)."""

    def __init__(self, world: World, tp: int, args, x):
        self.tp, self.x, self.args = tp, x, args
        self.active = world.rank < max(tp, 1)
        self.sub = world.split(0 if self.active else 1, world.rank, f"tp{tp}")
        self.best = [float("inf"), float("inf")]
        if not self.active:
            return
        if tp == 0:
            self.group, self.model = None, counter_init_(reference_mlp(args.d, args.hidden, args.d), args.seed)
            self.calls, self.bytes, self.wire = {}, 0, 0
            return
        self.group = TPGroup(self.sub)
        self.model = counter_init_(ParallelMLP(args.d, args.hidden, args.d, self.group), args.seed, self.group)
        self.model(x).sum().backward()                       # one step to count traffic
        c = self.group.counter
        self.calls, self.bytes, self.wire = dict(c.calls), c.total_bytes(), c.total_bytes(wire=True)

    def round(self, world: World) -> None:
        """Measure once (others wait at the barrier); keep the best median over rounds."""
        if self.active:
            sync = self.sub.barrier if self.tp > 1 else None
            times, waits = step_times(self.model, self.x, self.args.iters, self.args.warmup, sync)
            worst = self.sub.allgather_floats([statistics.median(times), statistics.median(waits)]).max(axis=0)
            if worst[0] < self.best[0]:
                self.best = list(worst)
        world.barrier()

    def row(self, base_ms: float) -> str:
        ms, comm = self.best[0] * 1e3, self.best[1] * 1e3
        name = "unsplit (1 rank)" if self.tp == 0 else f"tp={self.tp}"
        ar_f = self.calls.get(("allreduce", "forward"), 0)
        ar_b = self.calls.get(("allreduce", "backward"), 0)
        params = sum(q.numel() for q in self.model.parameters())
        return (f"{name:<16} {ms:>8.2f} {comm:>8.2f} {base_ms / ms:>9.2f}x {ar_f:>6} {ar_b:>6} "
                f"{sum(self.calls.values()):>9} {self.bytes:>14} {self.wire:>16} {params:>11}")


def main(argv) -> int:
    p = argparse.ArgumentParser(prog="python -m mpipar.bench tp")
    p.add_argument("--d", type=int, default=256, help="model width (input and output of the MLP)")
    p.add_argument("--hidden", type=int, default=1024, help="hidden width (split over tp)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--iters", type=int, default=20, help="timed steps per round (median kept)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best median is kept")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    world = World()
    failure.install(world.host)
    # the input needs a gradient, as it would in the middle of a network (this is f's all-reduce)
    x = torch.randn(args.batch, args.d, generator=torch.Generator().manual_seed(args.seed)).requires_grad_()
    hosts = len(set(world.hosts()))   # collective: every rank, before anyone may leave
    setups = [Setup(world, tp, args, x) for tp in (0, 1, 2, 4) if tp <= world.size]
    for _ in range(args.rounds):   # interleaved, so every row sees the same machine noise
        for s in setups:
            s.round(world)
    if world.rank == 0:
        print(f"ParallelMLP {args.d}->{args.hidden}->{args.d}, batch {args.batch}, fp32, 1 thread per rank, "
              f"{world.size} ranks on {hosts} host(s), {_cores()} cores; best of {args.rounds} rounds of "
              f"the median of {args.iters} steps")
        print(f"{'module':<16} {'ms/step':>8} {'comm ms':>8} {'vs unsplit':>10} {'AR fwd':>6} {'AR bwd':>6} "
              f"{'msgs/step':>9} {'payload B/step':>14} {'ring B/rank/step':>16} {'params/rank':>11}")
        base_ms = setups[0].best[0] * 1e3
        for s in setups:
            print(s.row(base_ms))
        print("comm ms = time waiting in all-reduces (slowest rank); msgs/step = collective calls per rank "
              "per step; ring B = 2(p-1)/p x payload per all-reduce. With more ranks than cores the "
              "tp>cores rows measure oversubscription, not scaling.")
    return 0


def _cores() -> int:
    import os
    return os.cpu_count() or 1
