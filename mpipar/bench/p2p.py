"""p2p: mpipar send/recv (header + payload, shape-checked) against raw mpi4py Send/Recv on the
same buffers, ping-pong between ranks 0 and 1, 4 KiB ... 64 MiB."""
from __future__ import annotations

import argparse
import time

import torch

from ..comm import Kind, World, failure, tag
from ..comm.cuda import mpi_buffer


def pingpong_raw(world: World, buf: torch.Tensor, iters: int) -> float:
    comm, peer, b = world.comm, 1 - world.rank, mpi_buffer(buf)
    world.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        if world.rank == 0:
            comm.Send(b, dest=peer, tag=1)
            comm.Recv(b, source=peer, tag=1)
        else:
            comm.Recv(b, source=peer, tag=1)
            comm.Send(b, dest=peer, tag=1)
    return (time.perf_counter() - t0) / (2 * iters)


def pingpong_ours(world: World, buf: torch.Tensor, iters: int) -> float:
    peer, t = 1 - world.rank, tag(Kind.TEST, 1)
    world.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        if world.rank == 0:
            world.send(buf, peer, t)
            world.recv(peer, t, out=buf)
        else:
            world.recv(peer, t, out=buf)
            world.send(buf, peer, t)
    return (time.perf_counter() - t0) / (2 * iters)


def main(argv) -> int:
    p = argparse.ArgumentParser(prog="python -m mpipar.bench p2p")
    p.add_argument("--min-kib", type=int, default=4)
    p.add_argument("--max-mib", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="alternating rounds; the best of each is kept")
    args = p.parse_args(argv)
    world = World()
    failure.install(world.host)
    if world.size < 2:
        raise SystemExit("p2p needs 2 ranks: mpirun -np 2 python -m mpipar.bench p2p")
    if world.rank >= 2:
        world.barrier()
        return 0
    sizes, s = [], args.min_kib * 1024
    while s <= args.max_mib * 2**20:
        sizes.append(s)
        s *= 4
    if world.rank == 0:
        print(f"{'size':>9} {'raw us':>10} {'ours us':>10} {'raw GB/s':>9} {'ours GB/s':>9} {'ours/raw':>9}")
    for size in sizes:
        buf = torch.zeros(size // 4, dtype=torch.float32)
        iters = max(3, min(200, int(2e8 // size)))
        raw = ours = float("inf")
        for _ in range(args.repeats):   # interleave so both see the same machine noise
            raw = min(raw, pingpong_raw(world, buf, iters))
            ours = min(ours, pingpong_ours(world, buf, iters))
        if world.rank == 0:
            label = f"{size // 2**20} MiB" if size >= 2**20 else f"{size // 1024} KiB"
            print(f"{label:>9} {raw * 1e6:>10.1f} {ours * 1e6:>10.1f} {size / raw / 1e9:>9.2f} "
                  f"{size / ours / 1e9:>9.2f} {ours / raw:>9.3f}", flush=True)
    world.barrier() if world.size > 2 else None
    return 0
