"""The flow of a tensor-parallel example: build the model sharded over the tp axis (each rank
materialises only its shard), train it with the Trainer, then train the single-device twin on
the same batches (rank 0 alone, with --compare), overlay the learning curves and say whether the
parameters still agree. Both models go through the one Trainer (`fit`)."""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from ..callbacks import Callback
from ..comm import World
from ..errors import ConfigError
from ..rankmap import Grid, human
from ..tensor.group import TPGroup
from ..tensor.init import counter_init_
from ..tensor.sharding import gather_full_state_dict, tp_plan
from ..topology import Topology
from ..version import __version__


def tp_topology(world, args) -> Topology:
    """The grid of --grid (default: every rank is one tp shard); pure tensor parallelism."""
    grid = Grid.parse(args.grid or f"tp={world.size}", world.size)
    if grid.pp != 1 or grid.dp != 1:
        raise ConfigError(f"--grid {args.grid}: tensor-parallel examples run pure tensor parallelism; "
                          f"use --grid tp={world.size}")
    return Topology.build(world, grid)


def fit(model, topo, example, args, train, test, log, callbacks=(), out=None):
    """Train `model` (held whole by each rank of topo's tp axis: a tensor-parallel model, or
    its single-device twin on a 1-rank topology) with the Trainer: one pipeline stage, the
    example's loss, optimizer and schedule, clipping by the global norm over tp shards."""
    from ..model import LayerSpec
    from ..pipeline.pipe import Pipeline
    from ..train.trainer import TrainConfig, Trainer
    pipe = Pipeline([LayerSpec("model", build=lambda: model)], topo, loss_fn=example.loss(), seed=args.seed,
                    device=getattr(args, "device_", "cpu"))
    params = pipe.parameters()
    opt = example.optimizer(params, args)
    sched = example.lr_scheduler(opt, args) if getattr(example, "lr_scheduler", None) else None
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, steps=args.steps, seed=args.seed,
                      shuffle=example.shuffle, task=example.task, clip_grad=getattr(args, "clip_grad", 0.0),
                      out=out, name=example.name, on_nonfinite=args.on_nonfinite, nonfinite_limit=args.nonfinite_limit)
    trainer = Trainer(pipe, opt, cfg, sched, log)
    trainer.callbacks.extend(callbacks)
    rows = trainer.fit(train, test)
    return trainer, rows


class AtStep(Callback):
    """Runs `fn()` once the trainer has taken `step` optimizer steps (on every rank alike)."""

    def __init__(self, step: int, fn):
        self.step, self.fn = step, fn

    def after_step(self, trainer, epoch, step_in_epoch, n_batches, tally, rows) -> None:
        if trainer.step_count == self.step:
            self.fn()


def run_tp_example(world, args, log, example, build, reference, after=None) -> dict:
    """`build(args, group)` -> the tensor-parallel model; `reference(args)` -> its single-device twin;
    `after(model, test)`, if given, runs on every rank once training is done (e.g. decoding)."""
    topo = tp_topology(world, args)
    group = TPGroup(topo.tp_world)
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
    first = AtStep(1, lambda: per_step.update(text=group.counter.describe(), bytes=group.counter.total_bytes()))
    # every rank reaches this step: a safe place for a collective
    snap = AtStep(check_at, lambda: per_step.update(snapshot=gather_full_state_dict(model, group)))
    group.counter.reset()
    t0 = time.perf_counter()
    trainer, rows = fit(model, topo, example, args, train, test, log, [first, snap], out=args.out)
    steps = trainer.step_count
    elapsed = time.perf_counter() - t0
    log(f"tp traffic per training step: {per_step.get('text', 'none')}, "
        f"{human(per_step.get('bytes', 0))}B payload")
    sharded = tp_plan(model)
    total = sum(p.numel() * (group.size if n in sharded else 1) for n, p in model.named_parameters())
    full = gather_full_state_dict(model, group) if args.compare else None   # same decision on every rank
    if args.compare and world.rank == 0:
        compare(example, reference, (check_at, per_step.get("snapshot"), full, steps), rows, train, test, args,
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
    from ..train.curves import plot_overlay
    check_at, tp_snapshot, tp_final, steps = states
    ref, ref_snapshot = counter_init_(reference(args), args.seed), {}
    snap = AtStep(check_at, lambda: ref_snapshot.update({k: v.detach().clone() for k, v in ref.state_dict().items()}))
    alone = Topology.build(World.alone(), Grid(1))
    _, ref_rows = fit(ref, alone, example, args, train, test, lambda *a, **k: None, [snap])
    label = f"mpipar tensor parallel tp={tp}"
    png = plot_overlay(rows, ref_rows, Path(args.out) / "learning_curves.png",
                       f"{example.name}: {label} vs single process (seed {args.seed})", label)
    gap = max(abs(a["train_loss"] - b["train_loss"]) for a, b in zip(rows, ref_rows))
    log(f"learning curves: {png} (largest train-loss gap to single process: {gap:.2e})")
    if tp_snapshot is not None:
        log(parity_line(tp_snapshot, ref_snapshot, check_at))
    if rows and steps != check_at:
        rel, where = largest_relative_difference(tp_final, ref.state_dict())
        log(f"after all {steps} steps the largest relative parameter difference is {rel:.1e} "
            f"(in {where}); rounding differences of another summation order grow during fp32 training "
            f"(with --float64 they stay near 1e-14); the curves show whether they matter")


def parity_step(args, n_train: int) -> int:
    """The step at which both runs are compared: --parity-steps, or the last step if fewer."""
    per_epoch = math.ceil(n_train / args.batch_size)
    per_epoch = min(per_epoch, args.steps) if args.steps else per_epoch
    return max(1, min(getattr(args, "parity_steps", 20), per_epoch * args.epochs))


def largest_relative_difference(full: dict, ref: dict) -> tuple[float, str]:
    """max over tensors of max|a - b| / max|b| (floating-point entries only)."""
    best, where = 0.0, "-"
    for k, v in ref.items():
        if not v.is_floating_point() or not v.numel():
            continue
        rel = float((full[k].double() - v.double()).abs().max() / v.double().abs().max().clamp_min(1e-12))
        if rel > best:
            best, where = rel, k
    return best, where


def parity_line(full: dict, ref: dict, steps: int) -> str:
    """One log line: equal (torch.testing.assert_close, fp32 defaults) or not, and the worst entry."""
    rel, where = largest_relative_difference(full, ref)
    try:
        for k, v in ref.items():
            torch.testing.assert_close(full[k], v, msg=k)
        verdict = "equal single-process training (assert_close)"
    except AssertionError as e:
        verdict = f"DIFFER from single-process training ({str(e).splitlines()[0]})"
    return (f"parity after {steps} steps: tensor-parallel parameters {verdict}; "
            f"largest relative difference {rel:.1e} in {where}")


def add_parity_args(p) -> None:
    """Flags of the tensor-parallel examples' comparison with single-process training."""
    p.add_argument("--no-compare", dest="compare", action="store_false", help="skip single-process training")
    p.add_argument("--parity-steps", type=int, default=20, help="compare parameters after this many steps")
    p.add_argument("--float64", action="store_true", help="train in float64 (parity holds for the whole run)")
