"""The one training loop for sequential models split by the rank map: each rank builds only
its layers, runs the pipeline schedule per global batch, steps its own optimizer; the
reporting rank's sums reach rank 0 once per epoch."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..model import build_stage
from ..pipeline import schedules
from ..pipeline.engine import Engine
from ..pipeline.stage import Stage
from .clip import clip_global_norm
from .metrics import MetricsFile, Tally, format_row, summarize
from .sampler import epoch_batches, split_microbatches


class PipelineTrainer:
    def __init__(self, topo, rankmap, example, specs, args, log=print):
        self.topo, self.example, self.args, self.log = topo, example, args, log
        self.loss_fn = example.loss()
        self.module = build_stage(specs, rankmap.stages[topo.pp_rank], args.seed)
        self.stage = Stage(self.module, topo.pp_rank, topo.grid.pp, topo.pp_world, self.loss_fn)
        self.engine = Engine(self.stage)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = example.optimizer(self.params, args) if self.params else None
        self.scheduler = (example.lr_scheduler(self.optimizer, args)
                          if self.optimizer and example.lr_scheduler else None)
        self.schedule = schedules.get(getattr(args, "schedule", "gpipe"))
        self.after_backward = []   # hooks (e.g. data-parallel gradient sync) before the optimizer step
        self.step_count = 0
        self.step_seconds: list[float] = []
        self.inject = parse_inject(getattr(args, "inject_error", None))

    # -- one step -------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor, y: torch.Tensor, tally: Tally | None = None) -> None:
        t0 = time.perf_counter()
        m = self.args.microbatches
        xs, ys = split_microbatches(x, m), split_microbatches(y, m)
        weights = [len(c) / len(y) for c in ys]
        if self.inject and self.inject == (self.topo.world.rank, self.step_count):
            raise RuntimeError(f"injected error at step {self.step_count} (--inject-error)")
        if self.optimizer:
            self.optimizer.zero_grad(set_to_none=True)
        on_out = (lambda mb, out: tally.add(out, ys[mb])) if tally is not None else None
        acts = self.schedule(self.topo.grid.pp, len(xs), self.topo.pp_rank)
        self.engine.run(acts, xs, ys, weights, on_out)
        for hook in self.after_backward:
            hook(self)
        if getattr(self.args, "clip_grad", 0):
            clip_global_norm(self.params, self.args.clip_grad, self.topo.pp_world)
        if self.optimizer:
            self.optimizer.step()
        if self.scheduler:
            self.scheduler.step()
        self.step_count += 1
        self.step_seconds.append(time.perf_counter() - t0)

    @torch.no_grad()
    def evaluate(self, split, batch_size: int) -> list[float]:
        self.module.eval()
        tally = Tally(self.loss_fn, self.example.task)
        for idx in epoch_batches(len(split.y), batch_size, 0, 0, shuffle=False):
            x, y = split.x[idx], split.y[idx]
            acts = schedules.forward_only(self.topo.grid.pp, 1, self.topo.pp_rank)
            self.engine.run(acts, [x], [y], [1.0], lambda mb, out: tally.add(out, y))
        self.module.train()
        return tally.vector()

    # -- epochs ---------------------------------------------------------------------------
    def fit(self, train, test) -> list[dict]:
        args, topo, world = self.args, self.topo, self.topo.world
        metrics = MetricsFile(Path(args.out)) if world.rank == 0 else None
        rows = []
        for epoch in range(args.epochs):
            tally = Tally(self.loss_fn, self.example.task)
            batches = epoch_batches(len(train.y), args.batch_size, args.seed, epoch)
            if args.steps:
                batches = batches[:args.steps]
            self.step_seconds = []
            world.barrier()
            t0 = time.perf_counter()
            for idx in batches:
                self.train_step(train.x[idx], train.y[idx], tally)
            world.barrier()
            seconds = time.perf_counter() - t0
            samples = sum(len(b) for b in batches)
            vec = tally.vector() + self.evaluate(test, args.batch_size)
            sums = world.allgather_floats(vec)[topo.reporter]
            p50, p95, p99 = np.percentile(np.array(self.step_seconds) * 1e3, [50, 95, 99])
            row = {"epoch": epoch + 1, **summarize(sums[:3], self.example.task, "train"),
                   **summarize(sums[3:], self.example.task, "test"),
                   "samples_per_s": samples / seconds, "steps_per_s": len(batches) / seconds,
                   "step_ms_p50": p50, "step_ms_p95": p95, "step_ms_p99": p99, "seconds": seconds}
            if self.scheduler:
                row["lr"] = self.scheduler.get_last_lr()[0]
            rows.append(row)
            if metrics:
                metrics.write(row)
                self.log(format_row(row))
        return rows

    def state_dict(self) -> dict:
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}


def parse_inject(text: str | None):
    """'rank=2,step=3' -> (2, 3)."""
    if not text:
        return None
    kv = dict(p.split("=", 1) for p in text.split(","))
    return int(kv["rank"]), int(kv["step"])
