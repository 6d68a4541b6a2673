"""device: moving device tensors between 2 ranks, and all-reducing them, each way mpipar can.

    mpirun -np 2 python -m mpipar.bench device [--device cuda] [--sizes 64K,1M,16M] [--rounds 5]

p2p (ping-pong, one-way time): `staged` = mpipar send/recv of device tensors through pinned host
buffers and a side stream (what runs when MPI is not CUDA-aware); `direct` = mpipar handing the
device buffers to MPI (only when the MPI library says it is CUDA-aware, else n/a); `host` = the
same bytes as CPU tensors, the floor staging adds its copies to. all-reduce (sum, float32):
`ours` = copy to host, mpipar's all-reduce, copy back (how gradient buckets reduce device
gradients); `native` = MPI_Allreduce of the same host copy. Best of --rounds, slowest rank; ratios
from the same run. `--device cpu` runs every row on CPU tensors (a self-test of the script: the
staged and host columns then measure the same thing).
"""
from __future__ import annotations

import argparse
import time

import torch

from ..comm import Kind, World, devices, failure, tag
from ..comm.cuda import BufferPolicy
from ..data_parallel.reduce import make_plan, next_seq
from ..errors import ConfigError


def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}.get(text[-1:], 1)
    return int(float(text.rstrip("KMG")) * scale)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pingpong(world: World, buf: torch.Tensor, iters: int) -> float:
    """One-way seconds per message, ping-pong between ranks 0 and 1 (the received tensor is sent back)."""
    peer, t = 1 - world.rank, tag(Kind.TEST, 2)
    world.barrier()
    t0 = time.perf_counter()
    x = buf
    for _ in range(iters):
        if world.rank == 0:
            world.send(x, peer, t)
            x = world.recv(peer, t, device=buf.device)
        else:
            x = world.recv(peer, t, device=buf.device)
            world.send(x, peer, t)
    sync(buf.device)
    return (time.perf_counter() - t0) / (2 * iters)


def host_buffer(n: int, device) -> torch.Tensor:
    return torch.empty(n, pin_memory=device.type == "cuda")


def reduce_ours(world: World, t: torch.Tensor, host: torch.Tensor, plan) -> float:
    """As gradient buckets reduce device gradients: into a pinned host buffer whose all-reduce
    was prepared once (make_plan), reduced, copied back."""
    world.barrier()
    t0 = time.perf_counter()
    host.copy_(t)
    plan.run(next_seq(world))
    t.copy_(host, non_blocking=True)
    sync(t.device)
    return time.perf_counter() - t0


def reduce_native(world: World, t: torch.Tensor, host: torch.Tensor) -> float:
    world.barrier()
    t0 = time.perf_counter()
    host.copy_(t)
    world.allreduce_native(host)
    t.copy_(host, non_blocking=True)
    sync(t.device)
    return time.perf_counter() - t0


def slowest(world: World, seconds: float) -> float:
    return float(world.allgather_floats([seconds]).max())


def main(argv) -> int:
    p = argparse.ArgumentParser(prog="python -m mpipar.bench device", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--sizes", default="64K,1M,16M")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=10, help="ping-pongs per round")
    args = p.parse_args(argv)
    world = World()
    failure.install(world.host)
    if world.size != 2:
        raise ConfigError(f"bench device runs on 2 ranks (mpirun -np 2 ...), not {world.size}")
    device = devices.choose(args.device, world)
    staged = World(world.comm.Dup(), name="staged", policy=BufferPolicy(False))
    direct = World(world.comm.Dup(), name="direct", policy=BufferPolicy(True)) if world.cuda_support else None
    log = print if world.rank == 0 else (lambda *a, **k: None)
    log(f"bench device: 2 ranks, {devices.describe(device, world, world.policy)}; {world.mpi_library}, "
        f"CUDA-aware: {'yes' if world.cuda_support else 'no'}; best of {args.rounds}, slowest rank")
    log(f"{'size':>8} {'staged ms':>10} {'direct ms':>10} {'host ms':>8} {'staged/host':>11} "
        f"{'ours AR ms':>11} {'native AR ms':>12} {'ours/native':>11}")
    for nbytes in (parse_size(s) for s in args.sizes.split(",")):
        n = max(1, nbytes // 4)
        dev = torch.full((n,), float(world.rank + 1), device=device)
        host = dev.to("cpu")
        best = {k: float("inf") for k in ("staged", "direct", "host", "ours", "native")}
        ours_buf, native_buf = host_buffer(n, device), host_buffer(n, device)
        plan = make_plan(world, ours_buf, "sum")
        for _ in range(args.rounds):           # the columns take turns, so a slow spell hits them alike
            best["staged"] = min(best["staged"], slowest(world, pingpong(staged, dev, args.iters)))
            if direct is not None and device.type == "cuda":
                best["direct"] = min(best["direct"], slowest(world, pingpong(direct, dev, args.iters)))
            best["host"] = min(best["host"], slowest(world, pingpong(world, host, args.iters)))
            best["ours"] = min(best["ours"], slowest(world, reduce_ours(world, dev.clone(), ours_buf, plan)))
            best["native"] = min(best["native"], slowest(world, reduce_native(world, dev.clone(), native_buf)))
        got = dev.clone()                      # correctness rides along
        reduce_ours(world, got, ours_buf, plan)
        plan.close()
        torch.testing.assert_close(got.cpu(), torch.full((n,), 3.0))
        direct_ms = f"{best['direct'] * 1e3:>10.3f}" if best["direct"] < float("inf") else f"{'n/a':>10}"
        log(f"{nbytes / 2 ** 20:>7.3g}M {best['staged'] * 1e3:>10.3f} {direct_ms} {best['host'] * 1e3:>8.3f} "
            f"{best['staged'] / best['host']:>10.2f}x {best['ours'] * 1e3:>11.3f} {best['native'] * 1e3:>12.3f} "
            f"{best['native'] / best['ours']:>10.2f}x")
    return 0
