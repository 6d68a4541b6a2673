"""balance: a real model's pipeline step under each way of cutting it -- by parameters, by layer
count, by measured time (the command line's default) and the best contiguous cut (every cut of
the layers into the pp stages, each one run) -- with the bubble measured from the timeline next
to the one the simulator predicts from the profile.

    mpirun -np 2 --bind-to none python -m mpipar.bench balance [--examples pipeline-cifar,transformer-split]
                                                                [--schedule 1f1b] [--microbatches 8] [--steps 20]

Run it with one core per rank (no oversubscription), so stages really run side by side. Each
figure is the median over steps of the slowest rank's step time (forward+backward over the
micro-batches and SGD), after warm-up steps; the cuts take turns step by step.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ..comm import World, failure
from ..pipeline.pipe import (Pipeline, balance_table, inflight_per_stage, partition, shared_costs,
                             virtual_stages)
from ..topology import Topology, share_cores
from ..rankmap import Grid, stages_from_sizes


def every_cut(n: int, k: int):
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        yield [b - a for a, b in zip(bounds, bounds[1:])]


def run_cuts(topo, specs, example, x, y, cuts, args, tmp: Path) -> dict:
    """{sizes: (median step seconds, measured bubble on rank 0)} of the pipeline cut each way.
    The cuts take turns step by step, so a slow spell of a shared machine hits them alike."""
    pipes, opts, times = {}, {}, {}
    for i, sizes in enumerate(cuts):
        key = tuple(sizes)
        pipes[key] = Pipeline(specs, topo, loss_fn=example.loss(), schedule=args.schedule,
                              microbatches=args.microbatches, balance=list(sizes), timeline=str(tmp / f"t{i}"))
        opts[key] = torch.optim.SGD(pipes[key].parameters(), lr=1e-3)
        times[key] = []
    world = topo.world
    for i in range(args.warmup + args.steps):
        for key, pipe in pipes.items():
            world.barrier()
            t0 = time.perf_counter()
            opts[key].zero_grad(set_to_none=True)
            pipe.step(x, y)
            opts[key].step()
            dt = float(world.allgather_floats([time.perf_counter() - t0]).max())
            if i >= args.warmup:
                times[key].append(dt)
    out = {}
    for key, pipe in pipes.items():
        out[key] = statistics.median(times[key]), pipe.write_timeline(log=lambda *a, **k: None)
        pipe.close()
    return out


def bench_example(world, name: str, args, log) -> None:
    from ..run import parse
    ex_args, example = parse([name, "--schedule", args.schedule, "--microbatches", str(args.microbatches),
                              "--batch-size", str(args.batch_size), "--log-level", "quiet"])
    specs = example.layers(ex_args)
    train, _ = example.data(ex_args)
    x, y = train.x[:args.batch_size], train.y[:args.batch_size]
    grid = Grid(pp=world.size)
    topo = Topology.build(world, grid)
    n = virtual_stages(args.schedule, None, world.size)
    costs = shared_costs(specs, x[:max(1, args.batch_size // args.microbatches)], world, ex_args.seed)
    inflight = inflight_per_stage(args.schedule, world.size, args.microbatches, n // world.size)
    names = [s.name for s in specs]
    chosen = {b: [len(s) for s in partition(specs, b, n, costs=costs)] for b in ("params", "layers", "time")}
    with tempfile.TemporaryDirectory(prefix="mpipar-balance-") as tmp:
        results = run_cuts(topo, specs, example, x, y, list(every_cut(len(specs), n)), args, Path(tmp))
    best = min(results, key=lambda s: results[s][0])
    log(f"{name}: {len(specs)} layers on {world.size} ranks, {args.schedule}, {args.microbatches} micro-batches "
        f"of {args.batch_size // args.microbatches}; step ms (median of {args.steps}, slowest rank)")
    log(f"{'balance':<8} {'sizes':<12} {'step ms':>8} {'vs best':>8} {'bubble':>7} {'predicted':>9}")
    rows = [(b, chosen[b]) for b in ("params", "layers", "time")] + [("best", list(best))]
    for label, sizes in rows:
        seconds, bubble = results[tuple(sizes)]
        _, _, predicted = balance_table(stages_from_sizes(names, sizes), costs, args.schedule, world.size, args.microbatches,
                                        n // world.size, inflight)
        log(f"{label:<8} {','.join(map(str, sizes)):<12} {seconds * 1e3:>8.1f} {seconds / results[best][0]:>7.2f}x "
            f"{bubble if bubble is not None else float('nan'):>7.3f} {predicted:>9.3f}")


def main(argv) -> int:
    p = argparse.ArgumentParser(prog="python -m mpipar.bench balance", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", default="pipeline-cifar,transformer-split")
    p.add_argument("--schedule", default="1f1b")
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)
    world = World()
    failure.install(world.host)
    share_cores(world, world.hosts(), "auto")
    log = print if world.rank == 0 else (lambda *a, **k: None)
    for name in args.examples.split(","):
        bench_example(world, name, args, log)
    return 0
