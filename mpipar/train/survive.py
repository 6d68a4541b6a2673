"""Data-parallel training that survives a dead rank without a relaunch (ULFM).

Every rank holds the whole model. Each step the global batch is split over the live ranks,
each computes its part of the mean loss's gradient, an allreduce sums them, and the ranks
agree (MPI_Comm_agree) that the step went through before anyone applies it. When a rank has
died, the agreement fails everywhere: the survivors shrink the communicator, split the same
batch over n-1 ranks (the dead rank's samples are re-assigned) and redo the step. The result
is the single-process training up to float summation order.
"""
from __future__ import annotations

import time

import torch

from ..comm import ulfm
from .batches import epoch_batches
from .guard import PREEMPTED_EXIT  # noqa: F401  (a preempted job's exit code: the supervisor reads it here)


def flat_grads(params) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def set_grads(params, flat: torch.Tensor) -> None:
    i = 0
    for p in params:
        n = p.numel()
        p.grad = flat[i:i + n].view_as(p).clone()
        i += n


class SurvivingDataParallel:
    def __init__(self, world, model, optimizer, loss_fn, cfg, faults=(), fault_plan=None, log=print):
        """`model` whole on every rank, its `optimizer`, `loss_fn` (a batch mean); `cfg` a
        TrainConfig (epochs, batch_size, steps, seed, shuffle)."""
        self.world = ulfm.resilient(world, "dp")
        self.cfg, self.log = cfg, log
        self.model = model
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.faults, self.plan = list(faults), fault_plan
        self.step_count = 0
        self.lost: list[int] = []       # COMM_WORLD ranks that died, in order
        self.redone = 0                 # steps repeated after a failure
        self.me = world.rank            # COMM_WORLD rank (for fault injection and messages)

    def say(self, text: str) -> None:
        if self.world.rank == 0:   # rank 0 of the *current* world: it may not be world rank 0
            self.log(text, flush=True)

    def _attempt(self, x: torch.Tensor, y: torch.Tensor) -> tuple[bool, float]:
        """(all gradients summed, this rank's weighted loss) over the live ranks."""
        mine = torch.arange(len(x)).tensor_split(self.world.size)[self.world.rank]
        self.optimizer.zero_grad(set_to_none=True)
        loss = torch.zeros(())
        if len(mine):
            loss = self.loss_fn(self.model(x[mine]), y[mine]) * (len(mine) / len(x))
            loss.backward()
        flat = torch.cat([flat_grads(self.params), loss.detach().reshape(1)])
        try:
            with ulfm.failures():
                self.world.allreduce_native(flat)
        except ulfm.ProcessFailed:
            return False, 0.0
        set_grads(self.params, flat[:-1])
        return True, float(flat[-1])

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        for i, f in enumerate(self.faults):
            if f.rank == self.me and f.step == self.step_count and self.plan is not None:
                self.plan.die(i, f, self.step_count)
        while True:
            ok, loss = self._attempt(x, y)
            if ulfm.agree(self.world, ok):
                self.optimizer.step()
                self.step_count += 1
                return loss
            dead = ulfm.failed_world_ranks(self.world)
            before = self.world.size
            self.world = ulfm.shrink(self.world)
            self.lost += [r for r in dead if r not in self.lost]
            self.redone += 1
            self.say(f"ulfm: rank(s) {', '.join(map(str, dead)) or '?'} died during step {self.step_count}; "
                     f"shrank {before} -> {self.world.size} ranks, redoing the step with the dead rank's "
                     f"samples re-assigned")

    def fit(self, train) -> list[dict]:
        c, rows = self.cfg, []
        for epoch in range(c.epochs):
            batches = epoch_batches(len(train.y), c.batch_size, c.seed, epoch, c.shuffle)
            if c.steps:
                batches = batches[:c.steps]
            t0, total = time.perf_counter(), 0.0
            for idx in batches:
                total += self.step(train.x[idx], train.y[idx]) * len(idx)
            seconds = time.perf_counter() - t0
            n = sum(len(b) for b in batches)
            row = {"epoch": epoch + 1, "train_loss": total / n, "ranks": self.world.size,
                   "samples_per_s": n / seconds, "seconds": seconds}
            rows.append(row)
            self.say(f"epoch {epoch + 1}  train loss {row['train_loss']:.4g}  ranks {self.world.size}  "
                     f"samples/s {row['samples_per_s']:.0f}")
        return rows
