"""dp-gpt: tokens/s of gpt-shakespeare's GPT (nanoGPT's CPU configuration: 4 layers, 4 heads, 128
wide, context 64, AdamW) trained by ONE process against dp=N (mpipar.DataParallel, the user API)
on this host: same model, initial weights, global batch and optimizer. Beside them the host's
ceiling for N processes: every rank training its 1/N of the batch alone (no communication), at
once, on its share of the cores -- N such processes can do no better than that, so
dp/ceiling is what the engine keeps of it and ceiling/single what the host allows at all (on
2 cores: 2 x one thread against torch's two threads in one process).

    mpirun -np 2 python -m mpipar.bench dp-gpt [--batch 12] [--steps 20] [--rounds 3]

The three phases alternate over the rounds so background load hits them alike; a rank that waits
(the others while one process trains) sleeps instead of spinning. Tokens are synthetic (random
ids: only time is measured). Figures: median over the rounds of tokens/s of each phase (a
phase's time is its slowest rank's)."""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import mpipar
from ..comm import World, failure
from ..tensor.gpt import ReferenceGPT
from .pipeline import load_average

VOCAB, BLOCK, LAYERS, HEADS, WIDTH = 128, 64, 4, 4, 128    # nanoGPT's CPU run (vocabulary padded)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mpipar.bench dp-gpt", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=12, help="global batch (sequences of 64 characters)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per phase and round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before each phase")
    p.add_argument("--rounds", type=int, default=3)
    return p


def model() -> ReferenceGPT:
    torch.manual_seed(0)
    return ReferenceGPT(VOCAB, BLOCK, LAYERS, HEADS, WIDTH)


def batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, BLOCK), generator=g), torch.randint(0, VOCAB, (n, BLOCK), generator=g)


def trainer(net, opt, x, y):
    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x).view(-1, VOCAB), y.view(-1)).backward()
        opt.step()
    return step


def seconds(step, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    world = World()
    failure.install(world.host)
    n, cores = world.size, len(os.sched_getaffinity(0))
    if args.batch % n:
        raise SystemExit(f"--batch {args.batch}: give a multiple of the {n} ranks")
    topo = mpipar.init(grid="dp", stall_timeout=0, world=world)
    share = max(1, cores // n)
    single_net = model()
    single = trainer(single_net, torch.optim.AdamW(single_net.parameters(), lr=1e-3), *batch(args.batch, 1))
    alone_net = model()
    alone = trainer(alone_net, torch.optim.AdamW(alone_net.parameters(), lr=1e-3), *batch(args.batch // n, 2 + world.rank))
    dp_net = model()
    dp = mpipar.DataParallel(dp_net, topo)
    dp_step = trainer(dp_net, dp.optimizer(torch.optim.AdamW(dp_net.parameters(), lr=1e-3)),
                      *batch(args.batch // n, 2 + world.rank))
    tokens = args.batch * BLOCK * args.steps
    rates = {"single": [], "ceiling": [], "dp": []}

    def phase(name, step, threads, everyone=True):
        world.board.use_polling(1e-3, 0.02)     # waiting ranks sleep
        world.barrier()
        world.board.use_polling(None)
        torch.set_num_threads(threads)
        took = seconds(step, args.steps, args.warmup) if everyone or world.rank == 0 else 0.0
        world.board.use_polling(1e-3, 0.02)
        slowest = float(world.allgather_floats([took]).max())
        world.board.use_polling(None)
        rates[name].append(tokens / slowest)

    for _ in range(args.rounds):
        phase("single", single, cores, everyone=False)
        phase("ceiling", alone, share)
        phase("dp", dp_step, share)
    med = {k: statistics.median(v) for k, v in rates.items()}
    if world.rank == 0:
        print(f"dp-gpt: GPT {LAYERS} layers x {WIDTH} wide, context {BLOCK}, global batch {args.batch} "
              f"(synthetic tokens); {n} ranks on {cores} cores; {args.rounds} rounds of {args.steps} steps; "
              f"load average {load_average()}")
        for k, label in (("single", f"1 process, {cores} threads"), ("ceiling", f"{n} alone, {share} thread(s) each"),
                         ("dp", f"dp={n} (DataParallel), {share} thread(s) each")):
            print(f"  {k:8s} {label:36s} {med[k]:>9,.0f} tokens/s  (rounds: "
                  f"{', '.join(f'{r:,.0f}' for r in rates[k])})")
        print(f"  dp/single {med['dp'] / med['single']:.2f}x   dp/ceiling {med['dp'] / med['ceiling']:.2f}   "
              f"ceiling/single {med['ceiling'] / med['single']:.2f}x (the most {n} processes can gain here)")
    return 0
