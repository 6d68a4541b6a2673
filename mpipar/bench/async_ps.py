"""async: the Cora GCN on parameter servers, synchronous (k=0) against asynchronous (k>0) with one
worker F x slower: batches/s, time to a test accuracy, final accuracy, staleness histograms.
Run `mpirun -np 4 python -m mpipar.bench async` (1 server + 3 workers; `async` = this module).

Every configuration runs the async-gcn-cora example itself (same model, data, optimizer, stop
rule: --epochs x W pushes), one after another in one launch, for each seed; figures are means
over the seeds, speed-ups the geometric mean of per-seed ratios (paired runs, back to back).

Two ways to time a step (--step-time): by default every worker's step is padded by sleeping to
T seconds (the straggler's to F x T): a cluster with one core per worker, emulated on a box with
fewer cores than workers; the protocol is then what is measured. With --step-time 0 a step takes
its measured compute time and the straggler sleeps (F-1) x that; on an oversubscribed, shared
host the result then also measures the kernel's scheduler: a worker that computes all the time
(async) gets a smaller CPU share than one that mostly sleeps (sync), so expect noisy ratios.
"""
from __future__ import annotations

import argparse
import os
import statistics

from ..async_ps.report import histogram_lines
from ..comm import World, failure


def run_config(world, example, parse, flags: list[str]) -> dict:
    args, _ = parse(["async-gcn-cora", *flags, "--log-level", "quiet"])
    return example.main(args, world, lambda *a, **k: None)


def mean(rows, key):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.fmean(vals) if vals else None


def speedup(runs, sync) -> float:
    """Geometric mean over seeds of batches/s relative to the sync run of the same seed (the two
    ran back to back, so a change in the machine's load between seeds cancels out)."""
    ratios = [r["batches_per_s"] / s["batches_per_s"] for r, s in zip(runs, sync)]
    return statistics.geometric_mean(ratios)


def main(argv) -> int:
    p = argparse.ArgumentParser(prog="python -m mpipar.bench async")
    p.add_argument("--staleness", default="4,8", help="comma-separated k values compared with k=0")
    p.add_argument("--epochs", type=int, default=40, help="one epoch = W pushes")
    p.add_argument("--servers", type=int, default=1)
    p.add_argument("--slow-rank", type=int, default=-1, help="straggler's world rank (default: the last rank)")
    p.add_argument("--slow-factor", type=float, default=3.0)
    p.add_argument("--step-time", type=float, default=0.2,
                   help="pad each step to this many seconds by sleeping (straggler: F times it), so "
                        "2 cores emulate a core per worker; 0: steps take their measured compute time")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; figures are means over them")
    p.add_argument("--target", type=float, default=0.75, help="test accuracy for time-to-accuracy")
    p.add_argument("--out", default=None, help="where the runs' metrics go (default runs/bench-async)")
    args = p.parse_args(argv)
    world = World()
    failure.install(world.host)
    if world.size < args.servers + 2:
        raise SystemExit("async needs >= servers + 2 ranks: mpirun -np 4 python -m mpipar.bench async")
    import torch
    torch.set_num_threads(1)
    from ..app import registry
    from ..run import parse
    example = registry.load("async-gcn-cora")
    slow = args.slow_rank if args.slow_rank >= 0 else world.size - 1
    ks = [0] + [int(k) for k in args.staleness.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    out = args.out or os.path.join("runs", "bench-async")
    results = {k: [] for k in ks}
    for seed in seeds:
        for k in ks:
            flags = ["--epochs", str(args.epochs), "--servers", str(args.servers), "--max-staleness", str(k),
                     "--slow-rank", str(slow), "--slow-factor", str(args.slow_factor), "--seed", str(seed),
                     "--step-time", str(args.step_time),
                     "--target", str(args.target), "--out", os.path.join(out, f"k{k}_seed{seed}")]
            results[k].append(run_config(world, example, parse, flags))
            if world.rank == 0:
                r = results[k][-1]
                print(f"  seed {seed} k={k}: {r['batches_per_s']:.1f} batches/s, test accuracy "
                      f"{r['test_accuracy']:.4f}, {r['seconds']:.1f} s", flush=True)
    if world.rank == 0:
        report(results, args, world.size, slow, seeds)
    world.barrier()
    return 0


def report(results: dict, args, size: int, slow: int, seeds: list[int]) -> None:
    W = size - args.servers
    timing = (f"every step padded to {args.step_time:g} s (straggler {args.slow_factor * args.step_time:g} s) "
              f"by sleeping: an emulated core per worker" if args.step_time > 0 else
              "steps take their measured compute time on this box")
    print(f"\nCora GCN (2 layers, hidden 16, RMSprop lr 0.01), {args.servers} server(s) + {W} workers on "
          f"{os.cpu_count()} cores; worker rank {slow} is a {args.slow_factor:g}x straggler (sleeps); {timing}; "
          f"{args.epochs} epochs = {args.epochs * W} pushes; means over seeds {seeds}; load average at the "
          f"end {os.getloadavg()[0]:.1f}")
    print(f"{'mode':<6} {'k':>3} {'batches/s':>10} {'vs sync':>8} {'time to ' + format(args.target, '.0%'):>12} "
          f"{'final acc':>9} {'last-10 acc':>11} {'d points':>8} {'updates':>8} {'max stale':>9} "
          f"{'pushes per worker (seed 0)':>28} {'compute ms/step (seed 0)':>26}")
    sync = results[0]
    base_acc = mean(sync, "test_accuracy")
    for k, runs in results.items():
        bps, acc = mean(runs, "batches_per_s"), mean(runs, "test_accuracy")
        reached = [r["time_to_target"] for r in runs]
        tta = f"{statistics.fmean(reached):.1f} s" if all(t is not None for t in reached) else "not always"
        smooth = mean(runs, "last10_test_accuracy")   # final accuracy swings +-1.5 points per epoch
        print(f"{'sync' if k == 0 else 'async':<6} {k:>3} {bps:>10.1f} {speedup(runs, sync):>7.2f}x {tta:>12} "
              f"{acc:>9.4f} {smooth:>11.4f} {100 * (acc - base_acc):>+8.1f} {mean(runs, 'updates'):>8.0f} "
              f"{max(r['max_staleness_seen'] for r in runs):>9} {str(runs[0]['pushes_per_worker']):>28} "
              f"{str([round(v) for v in runs[0]['compute_ms_per_worker']]):>26}")
    for k, runs in results.items():
        if k:
            hist = {}
            for r in runs:
                for s, c in r["histogram"].items():
                    hist[s] = hist.get(s, 0) + c
            print(f"staleness histogram, k={k} (all seeds, {sum(hist.values())} gradients):")
            print("\n".join(histogram_lines(hist)))
    for k in results:
        if k:
            ratio = speedup(results[k], sync)
            gap = 100 * (mean(results[k], "test_accuracy") - base_acc)
            smooth = 100 * (mean(results[k], "last10_test_accuracy") - mean(sync, "last10_test_accuracy"))
            print(f"acceptance k={k}: throughput {ratio:.2f}x sync (goal >= 2x: "
                  f"{'met' if ratio >= 2 else f'missed by {2 - ratio:.2f}x'}); final accuracy {gap:+.1f} points "
                  f"(goal within 1: {'met' if abs(gap) <= 1 else 'missed'}; last-10 mean {smooth:+.1f} points)")
