"""dp-step: the training step of dp-cifar's CNN under data parallelism -- ours (DataParallel:
gradient buckets all-reduced during backward by a progress thread), ours with --grad-compress
bf16, and torch DistributedDataParallel on gloo -- same model, initial weights, batch and
optimizer, modes interleaved step by step so background load hits them alike. --hybrid adds
the pp=2 x dp=N/2 grid of the same model and global batch (mpipar.Pipeline, 1F1B, 4
micro-batches; ranks fill the grid pp-major, so on hosts of N/2 ranks each stage's replicas
share a host and the activations cross the links).

    mpirun -np 4 python -m mpipar.bench dp-step [--width 16] [--batch 32] [--steps 30] [--hybrid]
    sudo python -m mpipar.bench allreduce-hosts --step --configs 2x2   (across emulated hosts)

Each figure is the median over steps of the slowest rank's step time (forward, backward, the
gradient all-reduce, SGD step); 'local' is the same step without any communication. The inputs
are synthetic (random images and labels): only time is measured.
"""
from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch
from torch import nn

from ..comm import World, failure
from ..topology import share_cores
from ..data_parallel.buckets import DEFAULT_BUCKET_MB
from ..data_parallel.wrapper import DataParallel
from .allreduce import init_gloo

MODES = ("local", "ours", "ours+bf16", "ddp-gloo")
HYBRID = "pp2-ours"


def cnn(width: int) -> nn.Sequential:
    """dp-cifar's model (examples/split_cnn.py's layers) at `width` channels, seeded."""
    from ..app.registry import load
    torch.manual_seed(0)
    specs = load("dp-cifar").layers(SimpleNamespace(width=width))
    return nn.Sequential(*[s.build() for s in specs])


class Mode:
    def __init__(self, name: str, world: World, width: int, bucket_mb: float):
        self.name, self.model = name, cnn(width)
        self.dp = self.ddp = None
        if name.startswith("ours"):
            self.dp = DataParallel(self.model, world, bucket_mb=bucket_mb,
                                   grad_compress="bf16" if name.endswith("bf16") else None)
        elif name == "ddp-gloo":
            self.ddp = torch.nn.parallel.DistributedDataParallel(self.model)
        self.pipe = None
        if name == HYBRID:   # the same global batch: each replica of the pp=2 grid takes 2 ranks' samples
            from ..pipeline.pipe import DataParallelOptions, Pipeline
            from ..rankmap import Grid
            from ..topology import Topology
            topo = Topology.build(world, Grid(pp=2, dp=world.size // 2))
            self.pipe = Pipeline(self.model, topo, schedule="1f1b", microbatches=4, balance="params",
                                 loss_fn=nn.CrossEntropyLoss(), data_parallel=DataParallelOptions(bucket_mb=bucket_mb))
        params = self.pipe.parameters() if self.pipe else self.model.parameters()
        self.opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
        self.times: list[float] = []

    def step(self, x, y) -> None:
        self.opt.zero_grad(set_to_none=True)
        if self.pipe:
            self.pipe.step(torch.cat([x, x]), torch.cat([y, y]))
            self.opt.step()
            return
        if self.dp:
            self.dp.begin_step()
        model = self.ddp or self.model
        nn.functional.cross_entropy(model(x), y).backward()
        if self.dp:
            self.dp.finish()
        self.opt.step()

    def timed(self, world: World, x, y) -> float:
        world.barrier()
        t0 = time.perf_counter()
        self.step(x, y)
        return float(world.allgather_floats([time.perf_counter() - t0]).max())


FLAGS = ("width", "batch", "steps", "wait", "bucket_mb", "hybrid")   # what allreduce-hosts --step passes on


def add_args(p: argparse.ArgumentParser, wait: str = "auto") -> None:
    """dp-step's flags (also allreduce-hosts --step's, which passes them on: FLAGS)."""
    p.add_argument("--width", type=int, default=16, help="channels of the first conv block (dp-cifar: 16)")
    p.add_argument("--batch", type=int, default=32, help="samples per rank per step (dp-cifar: 128 over 4 ranks)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per mode")
    p.add_argument("--wait", default=wait, choices=["auto", "spin", "poll"],
                   help=f"how our ranks wait for messages (default {wait}; auto: poll when a host has more "
                        "ranks than cores; emulated hosts share this machine's cores, which auto cannot see)")
    p.add_argument("--hybrid", action="store_true", help="also time the pp=2 x dp=N/2 grid of the same "
                   "model and global batch (even rank counts)")
    p.add_argument("--bucket-mb", type=float, default=DEFAULT_BUCKET_MB, help="our gradient buckets "
                   f"(default {DEFAULT_BUCKET_MB:g}, as the trainer's; DDP keeps its own, 25 MiB after a first 1 MiB)")


def main(argv) -> int:
    p = argparse.ArgumentParser(prog="python -m mpipar.bench dp-step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    args = p.parse_args(argv)
    world = World()
    failure.install(world.host)
    share_cores(world, world.hosts(), args.wait)   # as the trainer does: torch threads, waits
    dist = init_gloo(world)
    g = torch.Generator().manual_seed(world.rank)
    x = torch.randn(args.batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    names = MODES + ((HYBRID,) if args.hybrid and world.size % 2 == 0 else ())
    modes = [Mode(name, world, args.width, args.bucket_mb) for name in names]
    for m in modes:
        m.step(x, y)                                    # warm-up: connections, buffers
    for i in range(args.steps):
        for m in modes[i % len(modes):] + modes[:i % len(modes)]:
            m.times.append(m.timed(world, x, y))
    ms = {m.name: statistics.median(m.times) * 1e3 for m in modes}
    params = sum(q.numel() for q in modes[0].model.parameters())
    if world.rank == 0:
        print(f"dp-cifar CNN, width {args.width} ({params / 1e6:.2f} M parameters, {params * 4 / 2 ** 20:.1f} MiB "
              f"of gradients), {world.size} ranks, batch {args.batch} per rank, our buckets {args.bucket_mb:g} MiB, "
              f"waits {'poll' if world.board.poll is not None else 'spin'}, "
              f"synthetic inputs; ms per "
              f"step, median of {args.steps} (slowest rank)")
        print("  ".join(f"{k} {v:.1f}" for k, v in ms.items()))
        print(f"ours/ddp-gloo {ms['ours'] / ms['ddp-gloo']:.2f}  ours+bf16/ddp-gloo "
              f"{ms['ours+bf16'] / ms['ddp-gloo']:.2f}  (step-time ratios, < 1: ours faster); "
              f"communication not hidden: ours {ms['ours'] - ms['local']:.1f} ms, ours+bf16 "
              f"{ms['ours+bf16'] - ms['local']:.1f} ms, ddp-gloo {ms['ddp-gloo'] - ms['local']:.1f} ms", flush=True)
        if HYBRID in ms:
            print(f"pp=2 x dp={world.size // 2} (1F1B, 4 micro-batches; the same global batch): {ms[HYBRID]:.1f} ms, "
                  f"{ms[HYBRID] / ms['ddp-gloo']:.2f}x ddp-gloo's step, {ms[HYBRID] / ms['ours']:.2f}x ours (dp={world.size})",
                  flush=True)
    for m in modes:
        if m.dp:
            m.dp.remove()
        if m.pipe:
            m.pipe.close()
    dist.destroy_process_group()
    return 0
