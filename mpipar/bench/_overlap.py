"""allreduce --overlap: training-step time of a CIFAR-sized CNN under data parallelism with
gradient buckets all-reduced from autograd hooks during backward ("overlap") against the same
buckets all-reduced after backward ("after"), plus the step without any communication ("local")
so the table shows how much of the communication the overlap hides. Modes alternate step by
step (ranks aligned by a barrier before each step), so background load hits them alike; each
number is the median over steps of the slowest rank's step time."""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from ..data_parallel.buckets import DEFAULT_BUCKET_MB
from ..data_parallel.wrapper import DataParallel


def cnn() -> nn.Module:
    """The dp-cifar shape: 3 conv blocks and a 2-layer head (~2.2 M parameters, 8.8 MB of grads)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(128 * 8 * 8, 256), nn.ReLU(), nn.Linear(256, 10))


class Mode:
    def __init__(self, name: str, world, bucket_mb: float | None, algorithm: str = "auto"):
        self.name, self.model = name, cnn()
        self.dp = None if name == "local" else DataParallel(self.model, world, bucket_mb=bucket_mb,
                                                            overlap=name.startswith("overlap"),
                                                            background=(name == "overlap+thread"),
                                                            algorithm=algorithm)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01)
        self.times: list[float] = []

    def step(self, x, y) -> None:
        self.opt.zero_grad(set_to_none=True)
        if self.dp:
            self.dp.begin_step()
        nn.functional.cross_entropy(self.model(x), y).backward()
        if self.dp:
            self.dp.finish()
        self.opt.step()

    def timed_step(self, world, x, y) -> float:
        """One step after a barrier; the slowest rank's time."""
        world.barrier()
        t0 = time.perf_counter()
        self.step(x, y)
        return float(world.allgather_floats([time.perf_counter() - t0]).max())

    @property
    def ms(self) -> float:
        return statistics.median(self.times) * 1e3


def run(world, args) -> int:
    g = torch.Generator().manual_seed(world.rank)
    x, y = torch.randn(args.batch, 3, 32, 32, generator=g), torch.randint(0, 10, (args.batch,), generator=g)
    sizes = [float(s) for s in str(args.bucket_mb or DEFAULT_BUCKET_MB).split(",")]
    lines = [f"CNN ({sum(p.numel() for p in cnn().parameters()) / 1e6:.2f} M params) data-parallel step on "
             f"{world.size} ranks, all-reduce {args.algorithm}, batch {args.batch} per rank; ms per step (median of {args.steps} steps "
             f"per mode, modes interleaved)",
             f"{'bucket MB':>9} {'buckets':>7} {'local':>8} {'after':>8} {'hooks':>8} {'thread':>8} "
             f"{'after/hooks':>11} {'after/thread':>12} {'comm hidden':>11}"]
    for mb in sizes:
        modes = [Mode(name, world, mb, args.algorithm) for name in ("local", "after", "overlap", "overlap+thread")]
        for m in modes:
            m.step(x, y)                                    # warm-up
        for i in range(args.steps):
            for m in modes[i % 4:] + modes[:i % 4]:
                m.times.append(m.timed_step(world, x, y))
        local, after, hooks, thread = (m.ms for m in modes)
        hidden = (after - thread) / (after - local) if after > local else float("nan")
        lines.append(f"{mb:>9g} {len(modes[2].dp.buckets.buckets):>7} {local:>8.1f} {after:>8.1f} {hooks:>8.1f} "
                     f"{thread:>8.1f} {after / hooks:>10.3f}x {after / thread:>11.3f}x {hidden:>10.0%}")
        for m in modes:
            if m.dp:
                m.dp.remove()
    if world.rank == 0:
        print("\n".join(lines), flush=True)
    return 0
