"""The one training loop for sequential models split by the rank map: each rank builds only
its layers, runs the pipeline schedule per global batch, steps its own optimizer; the
reporting rank's sums reach rank 0 once per epoch."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..pipeline.plan import StagePlan
from .callbacks import Callback
from .clip import clip_global_norm
from .observe import Dashboard, RankStats
from .metrics import MetricsFile, Tally, format_row, summarize
from .sampler import epoch_batches, split_microbatches


class PipelineTrainer:
    def __init__(self, topo, rankmap, example, specs, args, log=print):
        self.topo, self.example, self.args, self.log = topo, example, args, log
        self.loss_fn = example.loss()
        self.pipe = StagePlan(topo, rankmap, specs, args, self.loss_fn)   # chunks, stages, engine, schedule
        self.module, self.stage, self.engine = self.pipe.module, self.pipe.stages[0], self.pipe.engine
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        from ..tensor.sharding import tp_plan
        plan = tp_plan(self.module)
        self.sharded_ids = {id(p) for n, p in self.module.named_parameters() if n in plan}
        self.optimizer = example.optimizer(self.params, args) if self.params else None
        self.scheduler = (example.lr_scheduler(self.optimizer, args)
                          if self.optimizer and example.lr_scheduler else None)
        self.schedule = self.pipe.schedule
        self.callbacks: list[Callback] = []   # data parallel, loss scaling, checkpoints (callbacks.py)
        self.step_count = 0
        self.step_seconds: list[float] = []
        self.inject = parse_inject(getattr(args, "inject_error", None))

    # -- one step -------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor, y: torch.Tensor, tally: Tally | None = None,
                   position: tuple[int, int] = (0, 1), global_n: int | None = None) -> None:
        """One batch; `position` = (step, steps) in the epoch (a streaming schedule spans them);
        `global_n`: samples in the global batch when x is this data-parallel rank's shard of it."""
        t0 = time.perf_counter()
        m = self.args.microbatches
        xs, ys = split_microbatches(x, m), split_microbatches(y, m)
        weights = [len(c) / (global_n or len(y)) for c in ys]   # mean over the global batch
        if self.inject and self.inject == (self.topo.world.rank, self.step_count):
            raise RuntimeError(f"injected error at step {self.step_count} (--inject-error)")
        if self.optimizer and not self.pipe.streaming:
            self.optimizer.zero_grad(set_to_none=True)
        on_out = (lambda mb, out: tally.add(out, ys[mb])) if tally is not None else None
        if self.pipe.streaming:     # 2BW updates mid-list (OPT): arm the callbacks right before each update
            def update():
                for cb in self.callbacks:
                    cb.before_step(self, len(xs))
                self.apply_update()
            self.pipe.train(xs, ys, weights, on_out, *position, batch=self.step_count, update=update)
        else:
            for cb in self.callbacks:
                cb.before_step(self, len(xs))
            self.pipe.train(xs, ys, weights, on_out, *position, batch=self.step_count, update=None)
            self.apply_update()
        self.step_count += 1
        self.step_seconds.append(time.perf_counter() - t0)

    def apply_update(self) -> None:
        """Gradients are in place: after_backward callbacks (data-parallel sync first), clipping,
        optimizer and lr steps."""
        for cb in self.callbacks:
            cb.after_backward(self)
        if getattr(self.args, "clip_grad", 0):
            clip_global_norm(self.params, self.args.clip_grad, self.topo.pp_world, self.topo.tp_world,
                             self.sharded_ids)
        if self.optimizer:
            self.optimizer.step()
        if self.scheduler:
            self.scheduler.step()

    @torch.no_grad()
    def evaluate(self, split, batch_size: int) -> list[float]:
        self.module.eval()
        tally = Tally(self.loss_fn, self.example.task)
        for idx in epoch_batches(len(split.y), batch_size, 0, 0, shuffle=False):
            x, y = split.x[idx], split.y[idx]
            self.pipe.forward_only(x, y, lambda mb, out: tally.add(out, y))
        self.module.train()
        return tally.vector()

    # -- epochs ---------------------------------------------------------------------------
    def fit(self, train, test) -> list[dict]:
        args, topo, world = self.args, self.topo, self.topo.world
        metrics = MetricsFile(Path(args.out)) if world.rank == 0 else None
        stats = RankStats(world)   # per-rank throughput, communication time and bytes -> rank 0
        hosts = world.hosts()      # collective: every rank calls it
        dash = (Dashboard(Path(args.out), hosts, f"{self.example.name}: grid pp={topo.grid.pp} "
                          f"dp={topo.grid.dp} tp={topo.grid.tp}", getattr(args, "plot", False),
                          getattr(args, "live", False)) if world.rank == 0 else None)
        cbs = self.callbacks   # a resumed checkpoint: its rows, epoch and batches are done already
        rows = [row for cb in cbs for row in cb.on_fit_start(self, metrics)]
        for epoch in range(max((cb.first_epoch(self) for cb in cbs), default=0), args.epochs):
            tally = Tally(self.loss_fn, self.example.task)
            batches = epoch_batches(len(train.y), args.batch_size, args.seed, epoch, self.example.shuffle,
                                    dp_rank=topo.dp_rank, dp_size=topo.grid.dp)
            if args.steps:
                batches = batches[:args.steps]
            self.step_seconds = []
            for cb in cbs:
                cb.on_epoch_start(self, epoch, tally)
            world.barrier()
            t0 = time.perf_counter()
            for i, idx in enumerate(batches):
                if any(cb.skip_batch(self, epoch, i) for cb in cbs):
                    continue
                self.train_step(train.x[idx], train.y[idx], tally, position=(i, len(batches)),
                                global_n=min(args.batch_size, len(train.y) - i * args.batch_size))
                for cb in cbs:
                    cb.after_step(self, epoch, i + 1, len(batches), tally, rows)
            world.barrier()
            seconds = time.perf_counter() - t0
            samples = sum(min(args.batch_size, len(train.y) - i * args.batch_size) for i in range(len(batches)))
            vec = tally.vector() + self.evaluate(test, args.batch_size)
            every = world.allgather_floats(vec)
            sums = every[topo.reporter]
            if topo.grid.dp > 1:   # each data-parallel replica tallied its own shard of the batches
                sums[:3] = sum(every[topo.grid.rank_of(topo.grid.pp - 1, d, 0)][:3] for d in range(topo.grid.dp))
            p50, p95, p99 = np.percentile(np.array(self.step_seconds) * 1e3, [50, 95, 99])
            row = {"epoch": epoch + 1, **summarize(sums[:3], self.example.task, "train"),
                   **summarize(sums[3:], self.example.task, "test"),
                   "samples_per_s": samples / seconds, "steps_per_s": len(batches) / seconds,
                   "step_ms_p50": p50, "step_ms_p95": p95, "step_ms_p99": p99, "seconds": seconds}
            if self.scheduler:
                row["lr"] = self.scheduler.get_last_lr()[0]
            rows.append(row)
            gathered = world.allgather_floats(stats.snapshot(sum(len(b) for b in batches), len(batches)))
            if dash:
                dash.add(row, gathered)
            if metrics:
                metrics.write(row)
                self.log(format_row(row))
            for cb in cbs:
                cb.after_epoch(self, epoch, rows)
        self.pipe.write_timeline(world, args.microbatches, self.log)
        for png in (dash.finish() if dash else []):
            self.log(f"per-rank dashboard: {png} (ranks.jsonl beside it)")
        for cb in cbs:
            cb.on_fit_end(self)
        return rows

    def state_dict(self) -> dict:
        """This stage's parameters as the single-process model names them; with tp > 1 the
        shards are gathered (a collective over tp: every tp rank calls it)."""
        if self.pipe.tp_group is not None:
            from ..tensor.sharding import gather_full_state_dict
            return gather_full_state_dict(self.module, self.pipe.tp_group)
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def full_param_count(self) -> int:
        """Parameters this rank would hold without tensor parallelism (shards counted whole)."""
        tp = self.topo.grid.tp
        return sum(p.numel() * (tp if id(p) in self.sharded_ids else 1) for p in self.module.parameters())


def parse_inject(text: str | None):
    """'rank=2,step=3' -> (2, 3)."""
    if not text:
        return None
    kv = dict(p.split("=", 1) for p in text.split(","))
    return int(kv["rank"]), int(kv["step"])
