"""The flow of a tensor-parallel example: build the model sharded over the tp axis (each rank
materialises only its shard), train it with the shared sampler and metrics, then train the
single-device twin on the same batches (rank 0, with --compare), overlay the learning curves and
say whether the parameters still agree. One loop (`train_epochs`) serves both models."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..version import __version__
from ..errors import ConfigError
from ..rankmap import Grid, human
from ..topology import Topology
from ..tensor.clip import clip_grad_norm_tp
from ..tensor.group import TPGroup
from ..tensor.init import counter_init_
from ..tensor.sharding import gather_full_state_dict, tp_plan
from .batches import epoch_batches
from .metrics import MetricsFile, Tally, format_row, summarize
from .tp_parity import largest_relative_difference, parity_line, parity_step


def tp_group(world, args) -> TPGroup:
    """The tp axis of --grid (default: every rank is one tp shard)."""
    grid = Grid.parse(args.grid or f"tp={world.size}", world.size)
    if grid.pp != 1 or grid.dp != 1:
        raise ConfigError(f"--grid {args.grid}: tensor-parallel examples run pure tensor parallelism; "
                          f"use --grid tp={world.size}")
    return TPGroup(Topology.build(world, grid).tp_world)


def train_epochs(model, example, train, test, args, clip=None, on_row=None, on_step=None) -> list[dict]:
    """Epochs of (zero_grad, forward, loss, backward, clip, step) on the shared batches; rows per epoch."""
    loss_fn = example.loss()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = example.optimizer(params, args)
    sched = example.lr_scheduler(opt, args) if getattr(example, "lr_scheduler", None) else None
    rows, step = [], 0
    for epoch in range(args.epochs):
        batches = epoch_batches(len(train.y), args.batch_size, args.seed, epoch)
        batches = batches[:args.steps] if args.steps else batches
        tally, t0 = Tally(loss_fn, example.task), time.perf_counter()
        for idx in batches:
            x, y = train.x[idx], train.y[idx]
            opt.zero_grad(set_to_none=True)
            out = model(x)
            loss_fn(out, y).backward()
            if clip is not None and getattr(args, "clip_grad", 0):
                clip(model, args.clip_grad)
            opt.step()
            if sched:
                sched.step()
            tally.add(out, y)
            step += 1
            if on_step:
                on_step(step)
        seconds = time.perf_counter() - t0
        row = {"epoch": epoch + 1, **summarize(tally.vector(), example.task, "train"),
               **summarize(evaluate(model, loss_fn, example.task, test, args.batch_size), example.task, "test"),
               "samples_per_s": sum(len(b) for b in batches) / seconds, "seconds": seconds, "steps": step}
        rows.append(row)
        if on_row:
            on_row(row)
    return rows


@torch.no_grad()
def evaluate(model, loss_fn, task, split, batch_size) -> list[float]:
    model.eval()
    tally = Tally(loss_fn, task)
    for idx in epoch_batches(len(split.y), batch_size, 0, 0, shuffle=False):
        tally.add(model(split.x[idx]), split.y[idx])
    model.train()
    return tally.vector()


def run_tp_example(world, args, log, example, build, reference, after=None) -> dict:
    """`build(args, group)` -> the tensor-parallel model; `reference(args)` -> its single-device twin;
    `after(model, test)`, if given, runs on every rank once training is done (e.g. decoding)."""
    group = tp_group(world, args)
    if getattr(args, "float64", False):
        torch.set_default_dtype(torch.float64)
    # Tensor-parallel layers allocate only their shard; counter_init_ then gives each shard the
    # values of the single-device model's slice. (Building under torch.device("meta") works too, but
    # costs seconds of one-off torch._refs import per rank.)
    model = counter_init_(build(args, group), args.seed, group)
    train, test = example.data(args)
    for split in (train, test):
        if split.x.is_floating_point():
            split.x = split.x.to(torch.get_default_dtype())
    mine = sum(p.numel() for p in model.parameters())
    params, hosts = [int(v) for v in world.allgather_floats([mine])[:, 0]], world.hosts()
    log(f"mpipar {__version__} | {world.mpi_library} | {world.size} ranks | torch {torch.__version__}\n"
        f"example {example.name}: {example.summary}\n"
        f"grid tp={group.size} | batch {args.batch_size} | seed {args.seed} | {torch.get_default_dtype()}")
    log(f"data: {train.note}")
    log(f"{'rank':>4} {'tp':>3} {'params':>9}  host\n" + "\n".join(
        f"{r:>4} {r:>3} {human(params[r]):>9}  {hosts[r]}" for r in range(world.size)))
    per_step, check_at = {}, parity_step(args, len(train.y))

    def on_step(step):
        if step == 1:
            per_step.update(text=group.counter.describe(), bytes=group.counter.total_bytes())
        if step == check_at:   # every rank reaches this step: a safe place for a collective
            per_step["snapshot"] = gather_full_state_dict(model, group)

    metrics = MetricsFile(Path(args.out)) if world.rank == 0 else None
    on_row = (lambda row: (metrics.write(row), log(format_row(row)))) if metrics else None
    group.counter.reset()
    t0 = time.perf_counter()
    rows = train_epochs(model, example, train, test, args, lambda m, c: clip_grad_norm_tp(m, c, group),
                        on_row, on_step)
    elapsed = time.perf_counter() - t0
    log(f"tp traffic per training step: {per_step.get('text', 'none')}, "
        f"{human(per_step.get('bytes', 0))}B payload")
    sharded = tp_plan(model)
    total = sum(p.numel() * (group.size if n in sharded else 1) for n, p in model.named_parameters())
    full = gather_full_state_dict(model, group) if args.compare else None   # same decision on every rank
    if args.compare and world.rank == 0:
        compare(example, reference, (check_at, per_step.get("snapshot"), full), rows, train, test, args,
                group.size, log)
    world.barrier()
    if after is not None:
        after(model, test)
    last = rows[-1] if rows else {}
    log(f"summary: {example.name} on {world.size} ranks (tp={group.size}), {len(rows)} epochs in {elapsed:.1f} s: "
        f"test loss {last.get('test_loss', float('nan')):.4g}, "
        f"test accuracy {last.get('test_accuracy', float('nan')):.4g}, "
        f"{last.get('samples_per_s', 0):.0f} samples/s; model params {human(total)} in {group.size} shards")
    return {"example": example.name, "ranks": world.size, "epochs": len(rows), "seconds": elapsed,
            **{k: v for k, v in last.items() if k != "epoch"}}


def compare(example, reference, states, rows, train, test, args, tp, log) -> None:
    """Rank 0: the single-device twin on the same batches; overlay PNG and the parity verdict."""
    from .curves import plot_overlay
    check_at, tp_snapshot, tp_final = states
    ref, ref_snapshot = counter_init_(reference(args), args.seed), {}

    def on_step(step):
        if step == check_at:
            ref_snapshot.update({k: v.detach().clone() for k, v in ref.state_dict().items()})

    ref_rows = train_epochs(ref, example, train, test, args,
                            lambda m, c: torch.nn.utils.clip_grad_norm_(m.parameters(), c), on_step=on_step)
    label = f"mpipar tensor parallel tp={tp}"
    png = plot_overlay(rows, ref_rows, Path(args.out) / "learning_curves.png",
                       f"{example.name}: {label} vs single process (seed {args.seed})", label)
    gap = max(abs(a["train_loss"] - b["train_loss"]) for a, b in zip(rows, ref_rows))
    log(f"learning curves: {png} (largest train-loss gap to single process: {gap:.2e})")
    if tp_snapshot is not None:
        log(parity_line(tp_snapshot, ref_snapshot, check_at))
    if rows and rows[-1]["steps"] != check_at:
        rel, where = largest_relative_difference(tp_final, ref.state_dict())
        log(f"after all {rows[-1]['steps']} steps the largest relative parameter difference is {rel:.1e} "
            f"(in {where}); rounding differences of another summation order grow during fp32 training "
            f"(with --float64 they stay near 1e-14); the curves show whether they matter")
