"""Checkpoints in a training loop: `Checkpoint` for your own loop, `attach_checkpoint` for the
Trainer. Both use mpipar.checkpoint's protocol: each rank writes its shard atomically, rank 0
writes the manifest (sizes, sha256) once every shard is on disk, resume picks the newest
checkpoint whose shards verify, and loading never executes pickle.

`Checkpoint` also guards a user's loop as the Trainer's loop is guarded (guard.py, the same
StepGuard): a step whose loss or gradients are not finite on any rank is stopped (or skipped)
by every rank before its update, and SIGTERM/SIGUSR1 make every rank save the same step and
exit PREEMPTED_EXIT.

    ckpt = mpipar.Checkpoint("ckpt", pipe, opt, topo, every=50)
    step = ckpt.resume()               # 0, or the step it resumed from (weights, optimizer, RNG)
    while step < total:
        opt.zero_grad(); loss = pipe.step(x, y)
        if ckpt.finite(loss):          # every rank: finite loss and gradients (else stop, or skip)
            opt.step()
        step += 1
        ckpt.step(step)                # writes when `every` steps have passed; preempted: now, exit 75
    ckpt.close()                       # the last one committed (collective)
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import DEFAULT_KEEP, fault, store
from ..checkpoint.checkpointer import Checkpointer
from ..checkpoint.restart import layer_of
from ..data_parallel.wrapper import LIVE as LIVE_DATA_PARALLEL
from ..rankmap import RankMap
from .guard import NonFiniteError, StepGuard, all_finite, finite_lr, step_gradients


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
    states; a replica (dp > 0) saves only its RNG. `on_nonfinite`, `nonfinite_limit`: what
    finite() does with a non-finite step ('stop', or 'skip' until that many in a row). From
    here to close(), SIGTERM and SIGUSR1 are only noted (step() acts on them)."""

    def __init__(self, root, model, optimizer=None, topo=None, *, every: int = 100, keep: int = DEFAULT_KEEP,
                 scheduler=None, background: bool = False, log=None, restart_from_scratch: bool = False,
                 on_nonfinite: str = "stop", nonfinite_limit: int = 3):
        self.pipe = model if hasattr(model, "rankmap") else None
        self.module = model.module if self.pipe is not None else model
        self.topo = topo or (self.pipe.topo if self.pipe is not None else None)
        if self.topo is None:
            from ..topology import init
            self.topo = init()
        if self.pipe is None and self.topo.grid.pp > 1:   # each stage would save (and load) its stale copy
            from ..errors import ConfigError
            raise ConfigError(f"mpipar.Checkpoint was given a {type(model).__name__}, not the Pipeline, while the "
                              f"grid has pp={self.topo.grid.pp} (resume would load another stage's stale weights): "
                              f"give Checkpoint the Pipeline: mpipar.Checkpoint(dir, pipe, opt)")
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
        finite_lr(optimizer)
        self.params = self.pipe.parameters() if self.pipe is not None else list(self.module.parameters())
        self.guard = StepGuard(self.topo.world, on_nonfinite, nonfinite_limit, owner="mpipar.Checkpoint")
        self.say, self.judged = say, False     # judged: finite() ran for the step under way
        self.guard.listen()

    def resume(self) -> int:
        """Load the newest verified checkpoint (the same on every rank; collective) into the
        model, optimizer, scheduler and RNGs; returns its step, or 0 when there is none."""
        man = self._ck.resume(self)
        return man.step if man is not None else 0

    def finite(self, loss=None) -> bool:
        """Call after backward, before opt.step() (collective: every rank, every step; `loss`:
        this rank's, None where it has none, e.g. a pipeline's first stages). True when every
        rank's loss and gradients are finite: apply the step. False when some are not and
        on_nonfinite='skip': skip opt.step() (and the scheduler's) on every rank. A NonFiniteError
        on every rank when the policy stops. A DataParallel's gradients are synced here first,
        as the optimizer would (so every replica judges the same gradients)."""
        for dp in list(LIVE_DATA_PARALLEL):
            if dp.buckets.unreduced and any(id(p) in dp.params for p in self.params):
                dp.finish()
        loss_ok = loss is None or bool(torch.as_tensor(loss).detach().isfinite().all())
        grads = step_gradients(self.optimizer, self.params) if self.optimizer is not None else \
            [p.grad for p in self.params]
        self.judged = True
        return self.guard.judge(loss_ok, all_finite(grads), f"step {self.step_count + 1}", self.say)

    def step(self, step: int) -> bool:
        """Call after optimizer step number `step` (collective): writes a checkpoint when due
        (returns whether it did). After SIGTERM or SIGUSR1 on any rank, every rank writes this
        step's checkpoint and exits PREEMPTED_EXIT (Preempted, a SystemExit). Parameters that
        the update made non-finite stop every rank, unsaved (without finite() this step, the
        ranks agree on that here, and on the signal)."""
        self.step_count = step
        params_ok = all_finite(self.params)
        if not self.judged:
            v = self.guard.agree(True, params_ok)
            if v.nonfinite:
                raise NonFiniteError(self._not_finite(step, v.grad_rank))
        elif not params_ok:   # finite gradients, yet the update overflowed (this rank alone may know)
            raise NonFiniteError(self._not_finite(step, self.topo.world.rank))
        self.judged = False
        if self.guard.preempted is not None:
            if self._ck.interval.last != step:
                self._write(step)
            self.close()
            self.guard.stop_preempted(f"step {step}", str(store.step_dir(self._ck.root, step)))
        if not self._ck.interval.due(step):
            return False
        self._write(step)
        return True

    def _not_finite(self, step: int, rank: int) -> str:
        return (f"step {step}: parameters are not finite after the update (first on rank {rank}); nothing "
                f"non-finite was checkpointed; lower the learning rate or clip gradients, and call "
                f"ckpt.finite(loss) before opt.step() to stop (or skip) such a step before its update")

    def save(self, step: int) -> None:
        """Write a checkpoint of step `step` now (collective); refused if this rank's parameters
        are not finite."""
        if not all_finite(self.params):
            raise NonFiniteError(self._not_finite(step, self.topo.world.rank))
        self._write(step)

    def _write(self, step: int) -> None:
        self.step_count = step
        self._ck.save(self, 0, step, [0.0, 0.0, 0.0], [])

    def close(self) -> None:
        """Commit a checkpoint still being written (collective); SIGTERM and SIGUSR1 act as they
        did before the Checkpoint."""
        self._ck.commit()
        self.guard.close()
