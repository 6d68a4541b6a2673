"""checkpoint: per-rank shards with a manifest, atomic and verified, restart from the newest good
one on any grid, fault injection, a relaunching supervisor and (with ULFM) surviving a dead rank.

Nothing here imports mpi4py at import time: the supervisor process must not start MPI.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

DEFAULT_KEEP = 3


def total_steps(n_train: int, args) -> int:
    per_epoch = math.ceil(n_train / args.batch_size)
    if getattr(args, "steps", 0):
        per_epoch = min(per_epoch, args.steps)
    return per_epoch * args.epochs


def attach(trainer, rankmap, n_train: int, args, log=print):
    """Give the trainer a Checkpointer callback (resuming now if the directory holds a usable
    checkpoint) when --checkpoint-dir or --inject-fault is set; returns it, or None."""
    from . import fault
    from .checkpointer import Checkpointer
    root = getattr(args, "checkpoint_dir", None)
    spec = fault.parse(getattr(args, "inject_fault", None))
    if not root and not spec:
        return None
    topo, world = trainer.topo, trainer.topo.world
    plan = None
    if spec:
        faults = fault.resolve(spec, world.size, total_steps(n_train, args))
        plan = fault.FaultPlan(faults, Path(root or args.out) / "faults", world.rank)
        log(f"fault injection: {len(faults)} fault(s) planned "
            f"({', '.join(f'rank {f.rank} at step {f.step} ({f.phase})' for f in faults)}); "
            f"{plan.fired()} already fired")
    every = getattr(args, "checkpoint_every", None)   # None: auto (interval.py)
    keep = getattr(args, "keep", None) or DEFAULT_KEEP
    background = bool(getattr(args, "async_checkpoint", False))
    run = {"example": getattr(trainer.example, "name", "?"), "seed": args.seed, "batch_size": args.batch_size,
           "epochs": args.epochs, "steps": getattr(args, "steps", 0), "microbatches": args.microbatches,
           "schedule": getattr(args, "schedule", "gpipe"), "attempt": int(os.environ.get("MPIPAR_ATTEMPT", "0"))}
    ck = Checkpointer(root, topo, rankmap, every, keep, background, plan, log, run)
    if root:
        from ..comm import ulfm
        log(f"checkpoint: {root}, {ck.interval.describe()}, keep {keep}, {'async' if background else 'sync'} writes; "
            f"a dead rank means a relaunch (--supervise); {ulfm.status()}")
    ck.resume(trainer)
    trainer.callbacks.append(ck)
    return ck
