"""allreduce: our all-reduce (pipelined ring; recursive doubling / halving-doubling for small sizes) against
native MPI_Allreduce and torch.distributed gloo, float32 1 KiB .. 64 MiB, all in the same run.

    mpirun -np 4 python -m mpipar.bench allreduce [--sizes 1K,64K,64M] [--no-gloo]
    mpirun -np 4 python -m mpipar.bench allreduce --overlap    (CNN step: buckets+overlap vs after backward)

busbw = algbw * 2(n-1)/n (algbw = bytes / time), as nccl-tests define it: the per-link rate a
bandwidth-optimal all-reduce needs. Native is the faster of blocking MPI_Allreduce (tuned) and
MPI_Iallreduce (World.allreduce_native, libnbc) at each size. Each time is the best over
rounds of the slowest rank's mean per call (a shared machine only ever adds time; --stat median
for the median); implementations alternate within every round so background load hits them alike.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

import torch

from ..comm import World, failure
from ..comm.world import allreduce_blocking
from ..comm.shared import one_host
from ..data_parallel.compress import WIRE_DTYPES, wire_dtype
from ..data_parallel.reduce import choose_algorithm, grouped, make_plan, next_seq

SIZES = "1K,4K,16K,64K,256K,1M,4M,16M,64M"
UNITS = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    return int(float(text[:-1]) * UNITS[text[-1]]) if text[-1] in UNITS else int(text)


def human_bytes(n: int) -> str:
    for unit in ("G", "M", "K"):
        if n >= UNITS[unit] and n % UNITS[unit] == 0:
            return f"{n // UNITS[unit]} {unit}iB"
    return f"{n} B"


def init_gloo(world: World):
    """torch.distributed with gloo, rendezvous at MASTER_ADDR:MASTER_PORT (rank 0 picks a free
    port when the environment names none). Only this benchmark ever uses torch.distributed."""
    import torch.distributed as dist
    port = torch.zeros(1, dtype=torch.int64)
    if world.rank == 0:
        port[0] = int(os.environ.get("MASTER_PORT", 0)) or free_port()
    world.bcast_(port, 0)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(int(port[0]))
    dist.init_process_group("gloo", rank=world.rank, world_size=world.size)
    return dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def calls_per_round(nbytes: int) -> int:
    return max(1, min(100, (4 * 2 ** 20) // max(nbytes, 1)))


def measure(world: World, fn, buf: torch.Tensor, calls: int) -> float:
    """Slowest rank's mean seconds per call over `calls` back-to-back calls."""
    world.barrier()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(buf)
    dt = (time.perf_counter() - t0) / calls
    return float(world.allgather_floats([dt]).max())


def ours(world: World, args, algorithm: str | None = None):
    """Our all-reduce as gradient buckets run it: prepared once per buffer (make_plan, like
    MPI_Allreduce_init), then run per call with fresh requests. algorithm 'bf16' / 'fp16':
    auto with the messages across hosts cast to that type (--grad-compress)."""
    current = {}
    algorithm = algorithm or args.algorithm
    wire = wire_dtype(algorithm) if algorithm in WIRE_DTYPES else None
    algorithm = "auto" if wire is not None else algorithm

    def run(buf):
        if current.get("buf") is not buf:
            if current:
                current["plan"].close()
            alg = algorithm   # "flat": auto's choice before the hierarchical all-reduce (by size only)
            if alg == "flat":
                alg = choose_algorithm(buf.numel() * buf.element_size(), world.size).replace("none", "ring")
            current.update(buf=buf, plan=make_plan(world, buf, "sum", alg,
                                                   args.piece_kb * 1024 if args.piece_kb else None, wire=wire))
        current["plan"].run(next_seq(world))
    return run


def implementations(world: World, dist, args) -> dict:
    impls = {
        "ours": ours(world, args),
        "mpi": lambda b: allreduce_blocking(world, b),
        "mpi_nb": lambda b: world.allreduce_native(b),
    }
    if dist is not None:
        impls["gloo"] = lambda b: dist.all_reduce(b)
    for alg in filter(None, (args.extra or "").split(",")):
        impls[f"ours:{alg}"] = ours(world, args, alg)   # in --out's rows only
    return impls


def bench_size(world: World, impls: dict, nbytes: int, rounds: int) -> dict:
    numel = nbytes // 4
    bufs = {name: torch.zeros(numel) for name in impls}   # zeros: no overflow, no denormals
    calls = calls_per_round(nbytes)
    times = {name: [] for name in impls}
    names = list(impls)
    for name in names:                                     # warm-up: connections, buffers, caches
        impls[name](bufs[name])
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(measure(world, impls[name], bufs[name], calls))
    return times


def busbw(nbytes: int, seconds: float, n: int) -> float:
    return nbytes / seconds * 2 * (n - 1) / n / 1e9 if n > 1 else float("nan")


def table(rows: list[dict], n: int, gloo: bool, stat: str = "best") -> str:
    head = (f"{'size':>8} {'algo':>8} {'ours us':>9} {'busbw':>6} {'MPI us':>9} {'busbw':>6} "
            f"{'Iall us':>9} {'busbw':>6}" + (f" {'gloo us':>9} {'busbw':>6}" if gloo else "")
            + f" {'ours/native':>11}" + (f" {'ours/gloo':>9}" if gloo else ""))
    lines = [f"all-reduce of float32 on {n} ranks ({stat} of rounds, slowest rank); busbw in GB/s "
             f"(= algbw*2(n-1)/n); ratios are busbw ours / busbw peer (native = faster of MPI_Allreduce "
             f"and MPI_Iallreduce)", head]
    for row in rows:
        b, t = row["bytes"], row["seconds"]
        native = min(t["mpi"], t["mpi_nb"])
        line = (f"{human_bytes(b):>8} {row['algorithm']:>8} {t['ours'] * 1e6:>9.1f} {busbw(b, t['ours'], n):>6.2f} "
                f"{t['mpi'] * 1e6:>9.1f} {busbw(b, t['mpi'], n):>6.2f} "
                f"{t['mpi_nb'] * 1e6:>9.1f} {busbw(b, t['mpi_nb'], n):>6.2f}")
        if gloo:
            line += f" {t['gloo'] * 1e6:>9.1f} {busbw(b, t['gloo'], n):>6.2f}"
        line += f" {native / t['ours']:>10.2f}x"
        if gloo:
            line += f" {t['gloo'] / t['ours']:>8.2f}x"
        lines.append(line)
    return "\n".join(lines)


def main(argv) -> int:
    p = argparse.ArgumentParser(prog="python -m mpipar.bench allreduce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=SIZES, help=f"comma-separated byte sizes (default {SIZES})")
    p.add_argument("--rounds", type=int, default=7, help="rounds per size")
    p.add_argument("--stat", default="best", choices=["best", "median"], help="statistic over rounds")
    p.add_argument("--algorithm", default="auto", choices=["auto", "ring", "halving", "doubling", "shm", "hier"])
    p.add_argument("--extra", default="", help="also time these algorithms of ours, e.g. flat,hier,bf16 "
                   "(flat: auto's choice by size alone, blind to hosts; bf16/fp16: auto with that wire "
                   "type across hosts; written to --out only; see allreduce_hosts)")
    p.add_argument("--piece-kb", type=int, default=0, help="ring piece size in KiB (0: default)")
    p.add_argument("--no-gloo", action="store_true", help="skip the torch.distributed gloo peer")
    p.add_argument("--out", default=None, help="also write the rows as JSON here (rank 0)")
    p.add_argument("--overlap", action="store_true", help="CNN step time: bucketing+overlap vs after backward")
    p.add_argument("--bucket-mb", default=None, help="--overlap: bucket sizes in MiB, e.g. 1,4,16 (default: the trainer's)")
    p.add_argument("--batch", type=int, default=8, help="--overlap: samples per rank per step")
    p.add_argument("--steps", type=int, default=40, help="--overlap: timed steps per mode")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    world = World()
    failure.install(world.host)
    if args.overlap:
        from ._overlap import run
        return run(world, args)
    dist = None if args.no_gloo else init_gloo(world)
    impls = implementations(world, dist, args)
    rows = []
    for nbytes in (parse_size(s) for s in args.sizes.split(",")):
        rounds = bench_size(world, impls, nbytes, args.rounds)
        pick = min if args.stat == "best" else statistics.median
        seconds = {name: pick(ts) for name, ts in rounds.items()}
        algorithm = args.algorithm if args.algorithm != "auto" else choose_algorithm(nbytes, world.size, one_host(world), grouped(world), not one_host(world))
        rows.append({"bytes": nbytes, "algorithm": algorithm, "seconds": seconds, "rounds": rounds})
        if world.rank == 0 and not args.out:
            print(f"  {human_bytes(nbytes)} done", flush=True)
    if world.rank == 0:
        print(table(rows, world.size, dist is not None, args.stat), flush=True)
        print(f"load average during the run: {os.getloadavg()[0]:.1f} (on {os.cpu_count()} cores)", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"ranks": world.size, "rows": rows}, f, indent=1)
    if dist is not None:
        dist.destroy_process_group()
    return 0
