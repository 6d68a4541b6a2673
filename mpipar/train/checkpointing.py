"""Checkpoints in a training loop: `Checkpoint` for your own loop, `attach_checkpoint` for the
Trainer. Both use mpipar.checkpoint's protocol: each rank writes its shard atomically, rank 0
writes the manifest (sizes, sha256) once every shard is on disk, resume picks the newest
checkpoint whose shards verify, and loading never executes pickle.

    ckpt = mpipar.Checkpoint("ckpt", pipe, opt, topo, every=50)
    step = ckpt.resume()               # 0, or the step it resumed from (weights, optimizer, RNG)
    while step < total:
        ...; opt.step(); step += 1
        ckpt.step(step)                # writes when `every` steps have passed
    ckpt.close()                       # the last one committed (collective)
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import DEFAULT_KEEP, fault
from ..checkpoint.checkpointer import Checkpointer
from ..checkpoint.restart import layer_of
from ..rankmap import RankMap


@dataclass
class CheckpointConfig:
    root: str | None = None          # directory of step-N/ folders; None: no checkpoints
    every: int | None = None         # steps between checkpoints (None: auto, ~2% of step time)
    keep: int = DEFAULT_KEEP         # complete checkpoints kept
    background: bool = False         # copy the state, write it in a background thread
    inject_fault: str | None = None  # 'rank=R,step=S' | 'random=SEED[,count=K][,phase=write]' (tests)
    faults_dir: str | None = None    # where fired faults are remembered (default root/faults)
    restart_from_scratch: bool = False   # every checkpoint rejected (quarantined): step 0, not a stop


def total_steps(n_train: int, batch_size: int, epochs: int, steps: int = 0) -> int:
    per_epoch = math.ceil(n_train / batch_size)
    return (min(per_epoch, steps) if steps else per_epoch) * epochs


def attach_checkpoint(trainer, rankmap, n_train: int, cfg: CheckpointConfig, run: dict, log=print):
    """Give the trainer a Checkpointer callback (resuming now if the directory holds a usable
    checkpoint) when there is a root or a fault to inject; returns it, or None."""
    spec = fault.parse(cfg.inject_fault)
    if not cfg.root and not spec:
        return None
    topo, world, c = trainer.topo, trainer.topo.world, trainer.config
    plan = None
    if spec:
        faults = fault.resolve(spec, world.size, total_steps(n_train, c.batch_size, c.epochs, c.steps))
        plan = fault.FaultPlan(faults, Path(cfg.faults_dir or Path(cfg.root) / "faults"), world.rank)
        log(f"fault injection: {len(faults)} fault(s) planned "
            f"({', '.join(f'rank {f.rank} at step {f.step} ({f.phase})' for f in faults)}); "
            f"{plan.fired()} already fired")
    run = {**run, "attempt": int(os.environ.get("MPIPAR_ATTEMPT", "0"))}
    ck = Checkpointer(cfg.root, topo, rankmap, cfg.every, cfg.keep, cfg.background, plan, log, run, epochs=c.epochs,
                      restart_from_scratch=cfg.restart_from_scratch)
    if cfg.root:
        from ..comm import ulfm
        log(f"checkpoint: {cfg.root}, {ck.interval.describe()}, keep {cfg.keep}, "
            f"{'async' if cfg.background else 'sync'} writes; a dead rank means a relaunch (--supervise); "
            f"{ulfm.status()}")
    ck.resume(trainer)
    trainer.callbacks.append(ck)
    return ck


class Checkpoint:
    """Checkpoint/resume for a user's loop. `model` is a Pipeline (its rank map names the
    layers) or any nn.Module held whole by this rank (replicated over dp); `topo` defaults to
    the Pipeline's. Each rank saves its model and optimizer (and scheduler) state and its RNG
    states; a replica (dp > 0) saves only its RNG."""

    def __init__(self, root, model, optimizer=None, topo=None, *, every: int = 100, keep: int = DEFAULT_KEEP,
                 scheduler=None, background: bool = False, log=None, restart_from_scratch: bool = False):
        self.pipe = model if hasattr(model, "rankmap") else None
        self.module = model.module if self.pipe is not None else model
        self.topo = topo or (self.pipe.topo if self.pipe is not None else None)
        if self.topo is None:
            from ..topology import init
            self.topo = init()
        self.optimizer, self.scheduler, self.step_count = optimizer, scheduler, 0
        if self.pipe is not None:
            rankmap = self.pipe.rankmap
        else:
            layers = list(dict.fromkeys(layer_of(k) for k in self.module.state_dict()))
            rankmap = RankMap(self.topo.grid, [layers] * self.topo.grid.pp)
        say = log if log is not None else (print if self.topo.world.rank == 0 else (lambda *a, **k: None))
        self._ck = Checkpointer(root, self.topo, rankmap, every, keep, background, None, say,
                                {"every": every}, epochs=None,     # a loop of steps: no epochs to speak of
                                restart_from_scratch=restart_from_scratch)

    def resume(self) -> int:
        """Load the newest verified checkpoint (the same on every rank; collective) into the
        model, optimizer, scheduler and RNGs; returns its step, or 0 when there is none."""
        man = self._ck.resume(self)
        return man.step if man is not None else 0

    def step(self, step: int) -> bool:
        """Call after optimizer step number `step` (collective); writes a checkpoint when due."""
        if not self._ck.interval.due(step):
            self.step_count = step
            return False
        self.save(step)
        return True

    def save(self, step: int) -> None:
        """Write a checkpoint of step `step` now (collective)."""
        self.step_count = step
        self._ck.save(self, 0, step, [0.0, 0.0, 0.0], [])

    def close(self) -> None:
        """Commit a checkpoint still being written (collective)."""
        self._ck.commit()
