"""The training loop: epochs of deterministic batches (each dp rank its shard) through a
Pipeline, the optimizer stepping this rank's parameters, callbacks for everything optional
(checkpoints, loss scaling, gradient edits), one metrics row per epoch from the reporting rank.
`python -m mpipar.run` drives it; it is public, for a user who wants epochs, metrics and
checkpoints without writing the loop:

    trainer = mpipar.Trainer(pipe, optimizer, mpipar.TrainConfig(epochs=3, batch_size=64))
    rows = trainer.fit(train_dataset, test_dataset)
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..callbacks import Callback
from ..data_parallel.zero import ShardedOptimizer, gathered
from ..errors import ConfigError
from .amp import PipelineGradScaler
from .batches import size_of, sized_batches
from .clip import clip_global_norm
from .guard import NonFiniteError, StepGuard, all_finite, check_policy, finite_lr, step_gradients
from .metrics import MetricsFile, Tally, error_metric, format_row, summarize
from .observe import Dashboard, RankStats


@dataclass
class TrainConfig:
    epochs: int = 1
    batch_size: int = 64            # global batch (summed over data-parallel replicas)
    steps: int = 0                  # > 0: stop each epoch after this many batches
    seed: int = 0                   # batch order
    shuffle: bool = True            # False: batches in data order (streams)
    task: str = "classification"    # or "regression": what the metrics rows report
    clip_grad: float = 0.0          # > 0: clip by the global norm over all stages and shards
    out: str | None = None          # metrics.jsonl (and plots) here, on rank 0
    plot: bool = False              # dashboard.png at the end
    live: bool = False              # dashboard refreshed every epoch
    name: str = "model"             # how outputs name the run
    num_workers: int = 0            # DataLoader workers for a map-style Dataset
    inject_error: tuple[int, int] | None = None   # (rank, step): raise there (tests of the abort path)
    on_nonfinite: str = "stop"      # a non-finite loss or gradient: 'stop' the job, or 'skip' the step
    nonfinite_limit: int = 3        # 'skip': this many non-finite steps in a row stop the job
    progress_every: int | None = None   # a progress line every N steps (None: 10 per epoch of >= 500 steps; 0: none)
    tokens_per_sample: int = 0      # > 0: the progress line counts tokens/s too (a language model's context)

    def __post_init__(self):
        for name, least in (("epochs", 1), ("batch_size", 1), ("steps", 0), ("num_workers", 0),
                            ("progress_every", 0), ("tokens_per_sample", 0)):
            value = getattr(self, name)
            if name == "progress_every" and value is None:
                continue
            if not isinstance(value, int) or value < least:
                raise ConfigError(f"{name}={value!r}: must be an integer >= {least}")
        if not (math.isfinite(self.clip_grad) and self.clip_grad >= 0):
            raise ConfigError(f"clip_grad={self.clip_grad!r}: must be a finite number >= 0 (0: no clipping)")
        check_policy(self.on_nonfinite, self.nonfinite_limit)


class Trainer:
    def __init__(self, pipe, optimizer=None, config: TrainConfig | None = None, scheduler=None, log=print):
        self.pipe, self.config, self.log = pipe, config or TrainConfig(), log
        self.topo, self.loss_fn = pipe.topo, pipe.loss_fn
        self.module, self.stage, self.engine = pipe.module, pipe.stages[0], pipe.engine
        self.params = pipe.parameters()
        self.param_order = pipe.parameter_order()
        self.optimizer, self.scheduler = optimizer, scheduler
        if isinstance(optimizer, ShardedOptimizer):   # ZeRO: the pipeline's step tells it the passes
            pipe.sharded = optimizer
        self.callbacks: list[Callback] = []   # loss scaling, checkpoints, gradient edits (callbacks.py)
        self.step_count = self.epoch = 0
        self.step_seconds: list[float] = []
        finite_lr(optimizer)
        if pipe.streaming and self.config.on_nonfinite == "skip":
            raise ConfigError(f"on_nonfinite='skip' (--on-nonfinite skip): schedule {pipe.schedule.name} updates "
                              f"the weights inside its lists, before the step's verdict; use 'stop'")
        self.guard = StepGuard(self.topo.world, self.config.on_nonfinite, self.config.nonfinite_limit)
        self._grads_ok = True      # a streaming step's updates so far had finite gradients here

    # -- one step -------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor, y: torch.Tensor, tally: Tally | None = None,
                   position: tuple[int, int] = (0, 1), global_n: int | None = None) -> None:
        """One batch through the Pipeline's step (it splits, weights and runs the micro-batches);
        `position` = (step, steps) in the epoch (a streaming schedule spans them); `global_n`:
        samples in the global batch when x is this data-parallel rank's shard of it. A step the
        ranks find non-finite is skipped (its loss untallied) or stops training (guard.py)."""
        t0 = time.perf_counter()
        if self.config.inject_error and self.config.inject_error == (self.topo.world.rank, self.step_count):
            raise RuntimeError(f"injected error at step {self.step_count} (--inject-error)")
        passes = self.pipe.passes(len(x))
        before = tally.vector() if tally is not None else None
        bad_losses = tally.nonfinite if tally is not None else 0
        on_out = tally.add if tally is not None else None
        if self.pipe.streaming:     # 2BW updates mid-list (OPT): arm the callbacks right before each update
            self._grads_ok = True

            def update():
                for cb in self.callbacks:
                    cb.before_step(self, passes)
                self.apply_update(None)
            loss = self.pipe.step(x, y, global_n, on_output=on_out, position=position, batch=self.step_count,
                                  update=update)
            self.judge(self._loss_ok(tally, bad_losses, loss), self._grads_ok)   # stops; never skips
        else:
            if self.optimizer:
                self.optimizer.zero_grad(set_to_none=True)
            for cb in self.callbacks:
                cb.before_step(self, passes)
            loss = self.pipe.step(x, y, global_n, on_output=on_out, position=position, batch=self.step_count)
            if not self.apply_update(self._loss_ok(tally, bad_losses, loss)) and tally is not None:
                tally.load(before)     # a skipped step: its loss is not the epoch's
        self.step_count += 1
        self.step_seconds.append(time.perf_counter() - t0)

    @staticmethod
    def _loss_ok(tally: Tally | None, bad_before: int, loss: float | None) -> bool:
        """This rank's own loss of the step was finite (no loss on this stage: True)."""
        if tally is not None:
            return tally.nonfinite == bad_before
        return loss is None or math.isfinite(loss)

    def apply_update(self, loss_ok: bool | None = True) -> bool:
        """Gradients are in place (reduced over dp): after_backward callbacks, the ranks' verdict
        on the step (loss_ok: this rank's loss was finite; None: a streaming schedule's update
        in its list, judged at the end of the step), then clipping, optimizer and lr steps.
        Returns whether the update was applied (False: the step is skipped on every rank)."""
        scaler = PipelineGradScaler.of(self)
        scaler_skips = scaler.skipped if scaler else 0
        for cb in self.callbacks:
            cb.after_backward(self)
        handled = scaler is not None and scaler.skipped > scaler_skips   # the loss scaler's overflow rule
        grads_ok = handled or all_finite(step_gradients(self.optimizer, self.params))   # dropped this step already
        if handled and loss_ok is not None:
            loss_ok = True
        if loss_ok is None:       # streaming: keep a non-finite update out of this rank's weights
            self._grads_ok = self._grads_ok and grads_ok
            if not grads_ok:
                return False
        elif not self.judge(loss_ok, grads_ok):
            return False
        if isinstance(self.optimizer, ShardedOptimizer):   # ZeRO: reduces, clips and steps its shard
            self.optimizer.step(clip=self.config.clip_grad)
        else:
            if self.config.clip_grad:
                clip_global_norm(self.params, self.config.clip_grad, self.topo.pp_world, self.topo.tp_world,
                                 self.pipe.sharded_ids, self.param_order)
            if self.optimizer:
                self.optimizer.step()
        if self.scheduler:
            self.scheduler.step()
        if not all_finite(self.params):   # finite gradients, yet the update overflowed: nothing to save
            raise NonFiniteError(f"rank {self.topo.world.rank}: parameters are not finite after the update of step "
                                 f"{self.step_count + 1} (its loss and gradients were): the learning rate "
                                 f"(--lr) is too large")
        return True

    def judge(self, loss_ok: bool, grads_ok: bool) -> bool:
        """The ranks' verdict on this step (the one collective, guard.py): True to apply it;
        False to skip it; NonFiniteError when the policy stops. A signal is kept for fit."""
        return self.guard.judge(loss_ok, grads_ok, f"step {self.step_count + 1} (epoch {self.epoch + 1})", self.log)

    @torch.no_grad()
    def evaluate(self, data, batch_size: int) -> list[float]:
        self.module.eval()
        tally = Tally(self.loss_fn, self.config.task)
        for x, y, _ in sized_batches(data, batch_size, shuffle=False, num_workers=self.config.num_workers):
            x, y = self.pipe.place(x, y)
            self.pipe.forward_only(x, y, lambda mb, out: tally.add(out, y))
        self.module.train()
        return tally.vector()

    # -- epochs ---------------------------------------------------------------------------
    def fit(self, train, test) -> list[dict]:
        """The epochs. While they run, SIGTERM and SIGUSR1 only mark the job preempted: every rank
        finishes the step, the ranks agree on it (guard.py), the callbacks checkpoint, and every
        rank raises Preempted (exit PREEMPTED_EXIT). Only when this Trainer's world is the whole
        job: ranks outside it would not hear of the agreement."""
        self.guard.listen()
        try:
            return self._fit(train, test)
        finally:
            self.guard.close()

    def _fit(self, train, test) -> list[dict]:
        c, topo, world = self.config, self.topo, self.topo.world
        metrics = MetricsFile(Path(c.out)) if world.rank == 0 and c.out else None
        stats = RankStats(world)   # per-rank throughput, communication time and bytes -> rank 0
        hosts = world.hosts()      # collective: every rank calls it
        dash = (Dashboard(Path(c.out), hosts, f"{c.name}: grid pp={topo.grid.pp} dp={topo.grid.dp} "
                          f"tp={topo.grid.tp}", c.plot, c.live) if world.rank == 0 and c.out else None)
        cbs = self.callbacks   # a resumed checkpoint: its rows, epoch and batches are done already
        rows = [row for cb in cbs for row in cb.on_fit_start(self, metrics)]
        n = size_of(train)
        for epoch in range(max((cb.first_epoch(self) for cb in cbs), default=0), c.epochs):
            tally = Tally(self.loss_fn, c.task)
            shards = sized_batches(train, c.batch_size, c.seed, epoch, c.shuffle, topo.dp_rank, topo.grid.dp,
                                   c.steps, c.num_workers)
            count = -(-n // c.batch_size)
            count = min(count, c.steps) if c.steps else count
            self.step_seconds, self.epoch, self.guard.skipped = [], epoch, 0
            every = c.progress_every if c.progress_every is not None else (count // 10 if count >= 500 else 0)
            self._shown = tally.vector()   # what the last progress line had counted
            for cb in cbs:
                cb.on_epoch_start(self, epoch, tally)
            world.barrier()
            t0 = time.perf_counter()
            samples = local = 0
            for i, (x, y, global_n) in enumerate(shards):
                samples, local = samples + global_n, local + len(y)
                if any(cb.skip_batch(self, epoch, i) for cb in cbs):
                    continue
                self.train_step(x, y, tally, position=(i, count), global_n=global_n)
                for cb in cbs:
                    cb.after_step(self, epoch, i + 1, count, tally, rows)
                if every and (i + 1) % every == 0:
                    self.progress(epoch, i + 1, count, tally, time.perf_counter() - t0, samples)
                if self.guard.preempted is not None:
                    self.stop_preempted(epoch, i + 1, count, tally, rows)
            world.barrier()
            seconds = time.perf_counter() - t0
            vec = tally.vector() + self.evaluate(test, c.batch_size)
            sums = self.job_sums(vec)
            p50, p95, p99 = (np.percentile(np.array(self.step_seconds) * 1e3, [50, 95, 99])
                             if self.step_seconds else (float("nan"),) * 3)
            error = error_metric(self.loss_fn)
            row = {"epoch": epoch + 1, **summarize(sums[:4], c.task, "train", error),
                   **summarize(sums[4:], c.task, "test", error),
                   "samples_per_s": samples / seconds, "steps_per_s": count / seconds,
                   "step_ms_p50": p50, "step_ms_p95": p95, "step_ms_p99": p99, "seconds": seconds}
            if self.scheduler:
                row["lr"] = self.scheduler.get_last_lr()[0]
            if self.guard.skipped:
                row["skipped_steps"] = self.guard.skipped
            rows.append(row)
            mine = vec[0] / vec[2] if self.pipe.is_last and vec[2] else float("nan")
            gathered = world.allgather_floats(stats.snapshot(local, count, mine))
            if dash:
                dash.add(row, gathered)
            if metrics:
                metrics.write(row)
            if world.rank == 0:
                self.log(format_row(row))
            for cb in cbs:
                cb.after_epoch(self, epoch, rows)
        self.pipe.write_timeline(self.log)
        for png in (dash.finish() if dash else []):
            self.log(f"per-rank dashboard: {png} (ranks.jsonl beside it)")
        for cb in cbs:
            cb.on_fit_end(self)
        return rows

    def job_sums(self, vec: list[float]):
        """The job's tally sums from every rank's `vec` (collective): the reporting rank's, its
        first four (a training Tally's) summed over the data-parallel replicas, each of which
        tallied its own shard of the batches."""
        topo = self.topo
        every = topo.world.allgather_floats(vec)
        sums = every[topo.reporter]
        if topo.grid.dp > 1:
            sums[:4] = sum(every[topo.grid.rank_of(topo.grid.pp - 1, d, 0)][:4] for d in range(topo.grid.dp))
        return sums

    def progress(self, epoch: int, done: int, count: int, tally: Tally, seconds: float, samples: int) -> None:
        """Rank 0's progress line (collective: every rank calls it at the same steps): the step,
        the training loss since the last line, samples (and tokens) per second so far this epoch,
        and the time the remaining training steps will take at that pace (evaluation not counted)."""
        c = self.config
        now = tally.vector()
        loss, _, _, weight = self.job_sums([a - b for a, b in zip(now, self._shown)])
        self._shown = now
        if self.topo.world.rank != 0:
            return
        total = c.epochs * count
        left = seconds / done * (total - epoch * count - done)
        rate = (f"{samples * c.tokens_per_sample / seconds:,.0f} tokens/s" if c.tokens_per_sample
                else f"{samples / seconds:,.0f} samples/s")
        self.log(f"step {epoch * count + done}/{total}  train loss {loss / max(weight, 1):.4f}  {rate}  "
                 f"ETA {duration(left)}")

    def stop_preempted(self, epoch: int, done: int, count: int, tally: Tally, rows: list[dict]) -> None:
        """Every rank agreed on a signal at this step: the callbacks save (collective), rank 0 says
        so in one line, every rank raises Preempted."""
        saved = [w for cb in self.callbacks if (w := cb.on_preempt(self, epoch, done, count, tally, rows))]
        self.guard.stop_preempted(f"step {self.step_count} (epoch {epoch + 1}, batch {done} of {count})",
                                  saved[0] if saved else None,
                                  "none configured, or a schedule with weights in flight mid-epoch")

    def state_dict(self) -> dict:
        """This stage's parameters as the single-process model names them, copied (tp > 1:
        gathered, a collective over tp; ZeRO stage 3: gathered over dp, so every replica calls it)."""
        with self.gathered():
            return self.pipe.state_dict()

    def gathered(self, write_back: bool = False):
        """A context in which every parameter of this rank is whole: ZeRO stage 3 gathers them
        (collective over dp; `write_back`: what is written into them is kept), else nothing to do."""
        return gathered(self.optimizer, write_back)

    def full_param_count(self) -> int:
        """Parameters this rank would hold without tensor parallelism (shards counted whole)."""
        tp = self.topo.grid.tp
        return sum(p.numel() * (tp if id(p) in self.pipe.sharded_ids else 1) for p in self.module.parameters())


def duration(seconds: float) -> str:
    """'45s', '3m12s', '1h02m'."""
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def parse_inject(text: str | None):
    """'rank=2,step=3' -> (2, 3)."""
    if not text:
        return None
    kv = dict(p.split("=", 1) for p in text.split(","))
    return int(kv["rank"]), int(kv["step"])
