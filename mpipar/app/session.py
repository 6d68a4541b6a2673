"""One run of one example on this rank: grid, rank map, banner, training, summary."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..model import check_unique, layer_seed
from ..rankmap import Grid, RankMap, human
from ..topology import Topology, share_cores
from ..train.trainer import TrainConfig, Trainer, parse_inject
from ..version import __version__


def banner(world, hosts, example, args, grid, device=None) -> str:
    cuda = "yes" if world.cuda_support else "no"
    placed = f"\ndevice: {device}" if device is not None else ""
    return (f"mpipar {__version__} | {world.mpi_library} | {world.size} ranks on {len(set(hosts))} host(s) | "
            f"torch {torch.__version__} | CUDA-aware MPI: {cuda} ({world.policy.describe()}){placed}\n"
            f"example {example.name}: {example.summary}\n"
            f"grid pp={grid.pp} dp={grid.dp} tp={grid.tp} | schedule {args.schedule}, "
            f"{args.microbatches} micro-batch(es) | global batch {args.batch_size} | seed {args.seed}")


def partition(world, specs, args, grid, train, log=None):
    """The rank map's stages from the command line, and for --balance time (the default) what
    the balance table needs: (stages, (costs, in-flight micro-batches per stage) or None).
    The ranks profile the layers on a micro-batch of the real shape (cached, see profile.py)."""
    from ..pipeline.balance import inflight_per_stage, partition as cut, shared_costs, stage_memory
    from ..pipeline.pipe import virtual_stages
    from ..rankmap import Balance
    n = virtual_stages(args.schedule, grid.pp, args.balance)
    if args.balance.kind != "time" or n == 1 or train is None:
        return cut(specs, args.balance, n, world), None
    cut(specs, Balance("layers"), n)          # enough layers for the stages? (said before profiling)
    mb = max(1, min(args.batch_size, len(train)) // (grid.dp * args.microbatches))
    costs = shared_costs(specs, train.x[:mb].to(getattr(args, "device_", "cpu")), world, args.seed, log)
    inflight = inflight_per_stage(args.schedule, grid.pp, args.microbatches, n // grid.pp)
    limit = args.stage_memory_mb * 2 ** 20 if args.stage_memory_mb else None
    stages = cut(specs, args.balance, n, costs=costs, memory=stage_memory(costs, inflight), limit=limit,
                 chunks=n // grid.pp)
    return stages, (costs, inflight)


def train_config(example, args) -> TrainConfig:
    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, steps=args.steps, seed=args.seed,
                       shuffle=example.shuffle, task=example.task, clip_grad=args.clip_grad, out=args.out,
                       plot=args.plot, live=args.live, name=example.name, inject_error=parse_inject(args.inject_error),
                       on_nonfinite=args.on_nonfinite, nonfinite_limit=args.nonfinite_limit)


def build_model(example, args, group=None) -> nn.Module:
    """An example's nn.Module (Example.model) from the seed a first LayerSpec gets: the same on every
    rank and in the single-process reference; `group` (tp > 1): this rank's shard of it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(layer_seed(args.seed, 0))
        return example.model(args, group).to(getattr(args, "device_", "cpu"))


def build_trainer(topo, rankmap, example, specs, args, log=print):
    """The Pipeline and Trainer an example asks for, from the command line's flags. An example's
    nn.Module is built whole on every rank, and Pipeline traces it and cuts it before the example's
    split (--balance time, the default) or by --balance (params, layers, sizes: of the traced units)."""
    from ..pipeline.pipe import DataParallelOptions, Pipeline, virtual_stages
    model, cut = specs, {"rankmap": rankmap}
    if example.model is not None:
        from ..tensor.group import TPGroup
        model = build_model(example, args, TPGroup(topo.tp_world) if topo.grid.tp > 1 else None)
        cut = ({"split": example.split(args, virtual_stages(args.schedule, topo.grid.pp))}
               if args.balance.kind == "time" else {"balance": args.balance})
    pipe = Pipeline(model, topo, loss_fn=example.loss(), schedule=args.schedule, microbatches=args.microbatches,
                    recompute=args.recompute, seed=args.seed, **cut,
                    timeline=args.timeline, device=getattr(args, "device_", "cpu"),
                    data_parallel=DataParallelOptions(args.bucket_mb, args.allreduce, args.dp_check_every,
                                                        args.grad_compress, args.zero))
    params = pipe.trainable()         # a stage without any steps no optimizer (not parameters()' placeholder)
    optimizer = example.optimizer(params, args) if params else None
    stepped = optimizer       # what an lr scheduler adjusts (under --zero 1: the shard's optimizer)
    if pipe.zero and optimizer is not None:
        from ..data_parallel.zero import ShardedOptimizer
        optimizer = ShardedOptimizer.like(optimizer, params, topo, pipe.zero, units=pipe.units())
        stepped = optimizer.inner
    scheduler = example.lr_scheduler(stepped, args) if optimizer and example.lr_scheduler else None
    return Trainer(pipe, optimizer, train_config(example, args), scheduler, log)


def log_model_state(trainer, world, log) -> None:
    """Per rank: the model state it held at the end (parameters + gradients + optimizer state,
    measured from its tensors) and, for fp32 Adam, what the ZeRO paper's formula says for its
    stage (collective: every rank calls it)."""
    from ..data_parallel.memory import formula_bytes, model_state_bytes
    from ..data_parallel.zero import ShardedOptimizer
    opt = trainer.optimizer
    inner = opt.inner if isinstance(opt, ShardedOptimizer) else opt
    params = list(trainer.module.parameters())
    psi = sum(p.numel() for p in params if p.requires_grad)
    adam = (type(inner) in (torch.optim.Adam, torch.optim.AdamW) and all(p.dtype == torch.float32 for p in params)
            and not getattr(inner, "defaults", {}).get("amsgrad"))
    stage = getattr(trainer.pipe, "zero", 0)
    held = model_state_bytes(params, opt)
    got = world.allgather_floats([held, formula_bytes(stage, psi, trainer.topo.dp_world.size) if adam else 0.0])
    text = f"model state per rank (parameters + gradients + optimizer state): {got[:, 0].max() / 2**20:.2f} MiB at most"
    if adam and got[:, 1].min() > 0:
        ratio = got[:, 0] / got[:, 1]
        text += (f"; {'ZeRO stage ' + str(stage) if stage else 'replicated'} formula for fp32 Adam: "
                 f"{got[:, 1].max() / 2**20:.2f} MiB, measured/formula {ratio.min():.3f}..{ratio.max():.3f}")
    log(text)


def compare(example, specs, train, test, args, rows, grid, log) -> None:
    """Train the same model single-process (rank 0) and overlay the learning curves. PipeDream-2BW
    (one-step-delayed weights) is compared with its own delayed-weight reference, which it
    should match, and with synchronous training, which shows what the delay costs."""
    from ..train.curves import plot_overlay
    sync = reference_rows(example, specs, train, test, args)
    refs = {"single process": sync}
    if args.schedule.streaming:      # pipedream, also when asked for as 2bw
        refs = {"single process, 2BW's one-step-delayed weights": reference_rows(example, specs, train, test, args,
                                                                               two_bw=True),
                "single process, synchronous": sync}
    label = f"mpipar pp={grid.pp} dp={grid.dp} tp={grid.tp}, {args.schedule}"
    png = plot_overlay(rows, refs, Path(args.out) / "learning_curves.png",
                       f"{example.name}: {label} vs single process (seed {args.seed})", label)
    gaps = "; ".join(f"to {name}: {max(abs(a['train_loss'] - b['train_loss']) for a, b in zip(rows, ref)):.2e}"
                     for name, ref in refs.items())
    log(f"learning curves: {png} (largest train-loss gap {gaps})")
    metric = next((k for k in rows[-1] if k.startswith("test_") and k != "test_loss"), "test_loss")
    if len(refs) > 1:
        log(f"final {metric}: {rows[-1][metric]:.4g} here; " +
            ", ".join(f"{ref[-1][metric]:.4g} {name}" for name, ref in refs.items()))


def reference_model(example, specs, train, args, on_epoch=None, two_bw: bool = False):
    """The example trained single-process (train/reference.py) with the flags' settings."""
    from ..model import build_full
    from ..train.reference import train_reference
    device = getattr(args, "device_", "cpu")
    model = build_model(example, args) if example.model else build_full(specs, args.seed, device)
    opt = example.optimizer([p for p in model.parameters() if p.requires_grad], args)
    sched = example.lr_scheduler(opt, args) if example.lr_scheduler and not two_bw else None
    return train_reference(model, example.loss(), opt, train, train_config(example, args), sched, on_epoch, two_bw)


def reference_rows(example, specs, train, test, args, two_bw: bool = False) -> list[dict]:
    """Per-epoch rows (same keys as the parallel run's) of single-process training (two_bw:
    with PipeDream-2BW's one-step-delayed weights)."""
    from ..train.metrics import error_metric, summarize
    from ..train.reference import evaluate
    rows, error = [], error_metric(example.loss())

    def record(model, epoch, tally):
        rows.append({"epoch": epoch + 1, **summarize(tally.vector(), example.task, "train", error),
                     **summarize(evaluate(model, example.loss(), example.task, test, args.batch_size),
                                 example.task, "test", error)})

    reference_model(example, specs, train, args, on_epoch=record, two_bw=two_bw)
    return rows


def run_facts(example, args) -> dict:
    """What a checkpoint's manifest records about the run (for people, and resume warnings)."""
    return {"example": example.name, "seed": args.seed, "batch_size": args.batch_size, "epochs": args.epochs,
            "steps": args.steps, "microbatches": args.microbatches, "schedule": args.schedule.name}


def run_example(world, example, args) -> dict:
    log = print if world.rank == 0 and args.log_level != "quiet" else (lambda *a, **k: None)
    hosts = world.hosts()
    share_cores(world, hosts, args.wait)
    from ..comm import devices
    args.device_ = devices.choose(args.device, world)   # before any data is read: a bad choice fails fast
    if example.main is not None and args.device_.type != "cpu" and not example.gpu:
        raise ConfigError(f"--device {args.device}: {example.name} runs its own loop, on CPU only so far")
    if example.main is not None:
        return example.main(args, world, log)
    grid = Grid.parse(args.grid, world.size)
    specs = example.layers(args) if example.model is None else None   # a module: Pipeline cuts it (build_trainer)
    if specs is not None:
        check_unique(specs)
        if grid.tp > 1 and not any(s.tp for s in specs):
            raise ConfigError(f"--grid {args.grid}: example {example.name} has no tensor-parallel layers, "
                              f"so tp must be 1 (examples with them: mlp, tp-mlp, tp-transformer)")
        if args.balance.kind != "time":   # validate the map before loading any data
            partition(world, specs, args, grid, None)
    train, test = example.data(args)
    per_replica = min(args.batch_size, len(train)) // grid.dp
    if args.microbatches > max(per_replica, 1):
        raise ConfigError(f"--microbatches {args.microbatches}: a batch holds {per_replica} sample(s) per "
                          f"data-parallel replica here ({example.name}: {len(train)} training sample(s), "
                          f"--batch-size {args.batch_size}, dp={grid.dp}), so at most {max(per_replica, 1)} "
                          f"micro-batch(es)")
    stages, balance = partition(world, specs, args, grid, train, log) if specs is not None else (None, None)
    topo = Topology.build(world, grid)

    trainer = build_trainer(topo, RankMap(grid, stages) if specs is not None else None, example, specs, args, log)
    rankmap = trainer.pipe.rankmap
    if example.on_trainer:
        example.on_trainer(trainer, args)
    mine = sum(p.numel() for p in trainer.module.parameters())
    counts = world.allgather_floats([mine, trainer.full_param_count()])
    params, full = [int(v) for v in counts[:, 0]], [int(v) for v in counts[:, 1]]
    log(banner(world, hosts, example, args, grid, devices.describe(args.device_, world, world.policy)))
    log(f"data: {train.note}")
    log(rankmap.table(hosts, params))
    if trainer.pipe.dp is not None:
        log(f"data parallel: {trainer.pipe.dp.describe()}")
    if trainer.pipe.zero and trainer.optimizer is not None:
        log(f"data parallel: {trainer.optimizer.describe()}")
    predicted = None
    if balance is not None:
        from ..pipeline.balance import balance_table
        text, predicted, _ = balance_table(stages, balance[0], args.schedule, grid.pp, args.microbatches,
                                        len(stages) // grid.pp, balance[1])
        log(text)
    from ..train.checkpointing import CheckpointConfig, attach_checkpoint   # --checkpoint-dir, --inject-fault
    attach_checkpoint(trainer, rankmap, len(train), CheckpointConfig(
        args.checkpoint_dir, args.checkpoint_every, CheckpointConfig.keep if args.keep is None else args.keep,
        args.async_checkpoint,
        args.inject_fault, str(Path(args.checkpoint_dir or args.out) / "faults"), args.restart_from_scratch),
        run_facts(example, args), log)

    t0 = time.perf_counter()
    rows = trainer.fit(train, test)
    elapsed = time.perf_counter() - t0
    if predicted is not None and trainer.step_seconds:
        measured = statistics.median(trainer.step_seconds)
        log(f"step time: measured {measured * 1e3:.1f} ms (median) against {predicted * 1e3:.1f} ms of "
            f"compute predicted from the profile (the prediction leaves out messages and the optimizer)")
    if args.save_params:   # every rank: its stage's parameters (tp > 1: gathered, a collective over tp)
        state = trainer.state_dict()
        out = Path(args.save_params)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(state, out / f"rank{world.rank}.pt")   # every replica and shard, to check each
        if topo.dp_rank == 0 and topo.tp_rank == 0:
            torch.save(state, out / f"stage{topo.pp_rank}.pt")
    if args.compare and world.rank == 0:
        compare(example, specs, train, test, args, rows, grid, log)
    world.barrier()
    extra = example.after_fit(trainer, train, test, args, log) if example.after_fit else None
    log_model_state(trainer, world, log)
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
