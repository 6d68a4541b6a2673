"""zero: per-replica model-state memory and step time, plain data parallelism vs ZeRO stages 1,
2 and 3, side by side in one job.

    mpirun -np N --bind-to none python -m mpipar.bench zero [--width 1024] [--depth 6] [--steps 10]
    mpirun -np N --bind-to none python -m mpipar.bench zero --modes zero3     # one mode: its peak RSS

Model state per replica, measured from the tensors each replica holds (parameters, gradients,
optimizer state; each storage counted once, so views cost nothing and a copy counts), against the
formula for fp32 Adam with Psi parameters on N replicas: DP 16 Psi bytes, stage 1 8 Psi + 8 Psi / N,
stage 2 4 Psi + 12 Psi / N (at the step; a bucket more while backward reduces it), stage 3
16 Psi / N (between uses; one layer's parameters and gradients more while it runs). Step time: the median over steps of the slowest replica's
forward+backward+reduction+step, ZeRO over DP. A synthetic MLP on synthetic inputs (the figures
are about memory and time, not learning). Peak RSS is the process's high-water mark (largest over
the replicas; "over start": above its resident memory before the first model was built, i.e.
without the interpreter and torch), so it describes a mode only when that mode runs alone
(`--modes`); with several modes the columns are left out. It counts the pages of shared memory
a rank touched, its peers' included (the one-host collectives read their segments).
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
from torch import nn

from ..comm import World, failure
from ..data_parallel import DataParallel
from ..data_parallel.memory import formula_bytes, model_state_bytes
from ..data_parallel.zero import ShardedOptimizer
from ..topology import share_cores


def model(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 8))


def rss_mib() -> float:
    """This process's resident memory now (Linux /proc), MiB."""
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(world, kind: str, args) -> tuple[int, float]:
    """(model-state bytes this replica holds, median step seconds of the slowest replica)."""
    net = model(args.width, args.depth)
    params = list(net.parameters())
    if kind == "dp":
        dp = DataParallel(net, world, op="sum")
        opt = torch.optim.Adam(params, lr=1e-4)
    else:
        dp, opt = None, ShardedOptimizer(params, world, torch.optim.Adam, stage=int(kind[-1]), lr=1e-4, units=list(net))
    g = torch.Generator().manual_seed(world.rank)
    x, y = torch.randn(args.batch, args.width, generator=g), torch.randn(args.batch, 8, generator=g)
    times = []
    for i in range(args.warmup + args.steps):
        world.barrier()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        if dp is not None:
            dp.begin_step()
        else:
            opt.begin_step(1)
        (nn.functional.mse_loss(net(x), y) / world.size).backward()
        if dp is not None:
            dp.finish()
        opt.step()
        dt = float(world.allgather_floats([time.perf_counter() - t0]).max())
        if i >= args.warmup:
            times.append(dt)
    held = model_state_bytes(params, opt)
    if dp is not None:
        dp.remove()
    return held, statistics.median(times)


def main(argv) -> int:
    p = argparse.ArgumentParser(prog="python -m mpipar.bench zero", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--batch", type=int, default=32, help="samples per replica per step")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--modes", default="dp,zero1,zero2,zero3", help="which of dp, zero1, zero2, zero3 (comma-separated)")
    args = p.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - {"dp", "zero1", "zero2", "zero3"})
    if unknown or not modes:
        p.error(f"--modes: {', '.join(unknown) or 'none given'}; choose from dp, zero1, zero2, zero3")
    world = World()
    failure.install(world.host)
    share_cores(world, world.hosts(), "auto")
    log = print if world.rank == 0 else (lambda *a, **k: None)
    psi = sum(q.numel() for q in model(args.width, args.depth).parameters())
    n = world.size
    log(f"zero: MLP {args.depth}x{args.width} ({psi:,} parameters, fp32 Adam) on {n} replicas, batch {args.batch} "
        f"per replica, synthetic inputs; model state = parameters + gradients + optimizer state, per replica")
    formula = {kind: formula_bytes(0 if kind == "dp" else int(kind[-1]), psi, n) for kind in modes}
    start = rss_mib()
    results = {kind: run(world, kind, args) for kind in modes}
    peaks = world.allgather_floats([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, start])
    peak, grown = float(peaks[:, 0].max()), float((peaks[:, 0] - peaks[:, 1]).max())
    base = results.get("dp", (0, 0.0))[1]
    log(f"{'mode':<6} {'held MiB':>9} {'formula MiB':>11} {'held/formula':>12} {'max over ranks MiB':>18} "
        f"{'step ms':>8} {'vs dp':>6}" + (f" {'peak RSS MiB':>12} {'over start':>10}" if len(modes) == 1 else ""))
    for kind, (held, seconds) in results.items():
        top = float(world.allgather_floats([held]).max())
        log(f"{kind:<6} {held / 2**20:>9.2f} {formula[kind] / 2**20:>11.2f} {held / formula[kind]:>12.3f} "
            f"{top / 2**20:>18.2f} {seconds * 1e3:>8.1f} " + (f"{seconds / base:>5.2f}x" if base else f"{'-':>6}")
            + (f" {peak:>12.1f} {grown:>10.1f}" if len(modes) == 1 else ""))
    return 0
