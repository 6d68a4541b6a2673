"""One run of one example on this rank: grid, rank map, banner, training, summary."""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from . import __version__
from .errors import ConfigError
from .model import check_unique, param_counts
from .rankmap import Grid, RankMap, human, parse_balance
from .topology import Topology


def threads_per_rank(hosts: list[str], host: str) -> int:
    """Share this host's cores among the ranks on it (oversubscription otherwise thrashes)."""
    return max(1, (os.cpu_count() or 1) // max(1, hosts.count(host)))


def banner(world, hosts, example, args, grid) -> str:
    cuda = "yes" if world.cuda_support else "no"
    return (f"mpipar {__version__} | {world.mpi_library} | {world.size} ranks on {len(set(hosts))} host(s) | "
            f"torch {torch.__version__} | CUDA-aware MPI: {cuda} ({world.policy.describe()})\n"
            f"example {example.name}: {example.summary}\n"
            f"grid pp={grid.pp} dp={grid.dp} tp={grid.tp} | schedule {args.schedule}, "
            f"{args.microbatches} micro-batch(es) | global batch {args.batch_size} | seed {args.seed}")


def partition(world, example, specs, args, grid, train):
    names = [s.name for s in specs]
    times = None
    if args.balance == "time":
        buf = torch.zeros(len(specs), dtype=torch.float64)
        if world.rank == 0:  # one rank profiles, everyone uses its numbers: the map must agree
            from .profile import layer_times
            buf[:] = torch.tensor(layer_times(specs, train.x[:args.batch_size], args.seed))
        times = world.bcast_(buf, 0).tolist()
    from .pipeline.plan import virtual_stage_count   # p*v stages when a rank holds v chunks
    return parse_balance(args.balance, names, virtual_stage_count(args, grid.pp), param_counts(specs), times)


def compare(example, specs, train, test, args, rows, grid, log) -> None:
    """Train the same model single-process (rank 0) and overlay the learning curves."""
    from .train.curves import plot_overlay
    from .train.reference import reference_rows
    ref = reference_rows(example, specs, train, test, args)
    label = f"mpipar pp={grid.pp} dp={grid.dp} tp={grid.tp}, {args.schedule}"
    png = plot_overlay(rows, ref, Path(args.out) / "learning_curves.png",
                       f"{example.name}: {label} vs single process (seed {args.seed})", label)
    gap = max(abs(a["train_loss"] - b["train_loss"]) for a, b in zip(rows, ref))
    log(f"learning curves: {png} (largest train-loss gap to single process: {gap:.2e})")


def run_example(world, example, args) -> dict:
    log = print if world.rank == 0 and args.log_level != "quiet" else (lambda *a, **k: None)
    hosts = world.hosts()
    torch.set_num_threads(threads_per_rank(hosts, world.host))
    if args.wait == "poll" or (args.wait == "auto" and hosts.count(world.host) > (os.cpu_count() or 1)):
        world.board.use_polling(2e-4)   # oversubscribed: sleep between tests instead of spinning in MPI_Wait
    if example.main is not None:
        return example.main(args, world, log)
    grid = Grid.parse(args.grid, world.size)
    specs = example.layers(args)
    check_unique(specs)
    if grid.tp > 1 and not any(s.tp for s in specs):
        raise ConfigError(f"--grid {args.grid}: example {example.name} has no tensor-parallel layers, "
                          f"so tp must be 1 (examples with them: mlp, tp-mlp, tp-transformer)")
    if args.balance != "time":   # validate the map before loading any data
        partition(world, example, specs, args, grid, None)
    train, test = example.data(args)
    rankmap = RankMap(grid, partition(world, example, specs, args, grid, train))
    topo = Topology.build(world, grid)

    from .train.trainer import PipelineTrainer
    trainer = PipelineTrainer(topo, rankmap, example, specs, args, log)
    from .data_parallel.wrapper import attach as attach_dp   # --grid dp=D: replicas synced by our ring
    attach_dp(trainer, topo, args)
    if example.on_trainer:
        example.on_trainer(trainer, args)
    mine = sum(p.numel() for p in trainer.module.parameters())
    counts = world.allgather_floats([mine, trainer.full_param_count()])
    params, full = [int(v) for v in counts[:, 0]], [int(v) for v in counts[:, 1]]
    log(banner(world, hosts, example, args, grid))
    log(f"data: {train.note}")
    log(rankmap.table(hosts, params))
    from .checkpoint import attach   # checkpoint/restart, fault injection (--checkpoint-dir, --inject-fault)
    attach(trainer, rankmap, len(train.y), args, log)

    t0 = time.perf_counter()
    rows = trainer.fit(train, test)
    elapsed = time.perf_counter() - t0
    if args.save_params and topo.dp_rank == 0:
        state = trainer.state_dict()   # tp > 1: gathers the shards (every tp rank takes part)
        if topo.tp_rank == 0:
            out = Path(args.save_params)
            out.mkdir(parents=True, exist_ok=True)
            torch.save(state, out / f"stage{topo.pp_rank}.pt")
    if args.compare and world.rank == 0:
        compare(example, specs, train, test, args, rows, grid, log)
    world.barrier()
    extra = example.after_fit(trainer, train, test, args, log) if example.after_fit else None
    last = rows[-1] if rows else {}
    metric = next((k for k in last if k.startswith("test_") and k != "test_loss"), None)
    summary = {"example": example.name, "ranks": world.size, "epochs": len(rows), "seconds": elapsed,
               **{k: v for k, v in last.items() if k != "epoch"}}
    log(f"summary: {example.name} on {world.size} ranks (pp={grid.pp} dp={grid.dp} tp={grid.tp}), "
        f"{len(rows)} epochs in {elapsed:.1f} s: test loss {last.get('test_loss', float('nan')):.4g}"
        + (f", {metric.replace('test_', 'test ')} {last[metric]:.4g}" if metric else "")
        + f", {last.get('samples_per_s', 0):.0f} samples/s"
        + (f"; {example.report(last, train, test, args)}" if example.report and last else "")
        + (f"; {extra}" if extra else "")
        + f"; total params {human(sum(full[r] for r in range(world.size) if grid.coords(r)[1:] == (0, 0)))}")
    return summary
