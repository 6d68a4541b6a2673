"""balance: a real model's pipeline step under each way of cutting it -- by parameters, by layer
count, by measured time (the command line's default) and the best contiguous cut (every cut of
the layers into the pp stages, each one run) -- with the bubble measured from the timeline next
to the one the simulator predicts from the profile.

    mpirun -np 2 --bind-to none python -m mpipar.bench balance [--examples pipeline-cifar,transformer-split]
                                                                [--schedule 1f1b,eager-1f1b] [--microbatches 8] [--steps 20]

Run it with one core per rank (no oversubscription), so stages really run side by side. Each
figure is the median over steps of the slowest rank's step time (forward+backward over the
micro-batches and SGD), after warm-up steps; the cuts take turns step by step. With more than
one schedule (`--schedule 1f1b,eager-1f1b`) the first runs every cut and the others the default
cut, in the same turns.
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
from ..pipeline.balance import balance_table, inflight_per_stage, partition, shared_costs
from ..pipeline.pipe import Pipeline, virtual_stages
from ..pipeline.schedules import get as get_schedule
from ..topology import Topology, share_cores
from ..rankmap import Balance, Grid, stages_from_sizes


def every_cut(n: int, k: int):
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        yield [b - a for a, b in zip(bounds, bounds[1:])]


def run_cuts(topo, specs, example, x, y, runs, args, tmp: Path) -> dict:
    """{(schedule, sizes): (median step seconds, measured bubble on rank 0)} of the pipeline cut
    each way under each schedule. They take turns step by step, so a slow spell of a shared
    machine hits them alike."""
    pipes, opts, times = {}, {}, {}
    for i, (schedule, sizes) in enumerate(runs):
        key = (schedule, tuple(sizes))
        pipes[key] = Pipeline(specs, topo, loss_fn=example.loss(), schedule=schedule,
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
    from ..app.run import parse
    schedules = [get_schedule(s) for s in args.schedule.split(",")]   # parsed once, here
    first = schedules[0]
    ex_args, example = parse([name, "--schedule", first.name, "--microbatches", str(args.microbatches),
                              "--batch-size", str(args.batch_size), "--log-level", "quiet"])
    specs = example.layers(ex_args)
    train, _ = example.data(ex_args)
    x, y = train.x[:args.batch_size], train.y[:args.batch_size]
    grid = Grid(pp=world.size)
    topo = Topology.build(world, grid)
    n = virtual_stages(first, world.size)
    costs = shared_costs(specs, x[:max(1, args.batch_size // args.microbatches)], world, ex_args.seed)
    names = [s.name for s in specs]
    chosen = {b: [len(s) for s in partition(specs, Balance(b), n, costs=costs)] for b in ("params", "layers", "time")}
    cuts = list(every_cut(len(specs), n))
    runs = [(first, c) for c in cuts] + [(s, chosen["time"]) for s in schedules[1:]]
    with tempfile.TemporaryDirectory(prefix="mpipar-balance-") as tmp:
        results = run_cuts(topo, specs, example, x, y, runs, args, Path(tmp))
    best = min((k for k in results if k[0] == first), key=lambda k: results[k][0])
    log(f"{name}: {len(specs)} layers on {world.size} ranks, {args.microbatches} micro-batches "
        f"of {args.batch_size // args.microbatches}; step ms (median of {args.steps}, slowest rank); "
        f"formula bubble {first.bubble(world.size, args.microbatches, 1):.3f}")
    log(f"{'schedule':<11} {'balance':<8} {'sizes':<12} {'step ms':>8} {'vs best':>8} {'bubble':>7} {'predicted':>9}")
    rows = [(first, b, chosen[b]) for b in ("params", "layers", "time")] + [(first, "best", list(best[1]))]
    rows += [(s, "time", chosen["time"]) for s in schedules[1:]]
    for schedule, label, sizes in rows:
        seconds, bubble = results[(schedule, tuple(sizes))]
        inflight = inflight_per_stage(schedule, world.size, args.microbatches, n // world.size)
        _, _, predicted = balance_table(stages_from_sizes(names, sizes), costs, schedule, world.size, args.microbatches,
                                        n // world.size, inflight)
        log(f"{schedule:<11} {label:<8} {','.join(map(str, sizes)):<12} {seconds * 1e3:>8.1f} "
            f"{seconds / results[best][0]:>7.2f}x {bubble if bubble is not None else float('nan'):>7.3f} {predicted:>9.3f}")


def main(argv) -> int:
    p = argparse.ArgumentParser(prog="python -m mpipar.bench balance", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", default="pipeline-cifar,transformer-split")
    p.add_argument("--schedule", default="1f1b,eager-1f1b", help="comma-separated; the first runs every cut")
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
