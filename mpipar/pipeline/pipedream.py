"""PipeDream-2BW (Narayanan et al. 2021): 1F1B that never flushes between steps, made sound by
double-buffered weights. Its semantics, precisely:

    Batches are numbered t = 0, 1, 2, ... over the whole run (epochs do not reset t). W(t) is a
    stage's weights after t optimizer updates, W(0) the initial weights. Every forward AND
    backward of every micro-batch of batch t, on every stage, uses W(max(t-1, 0)); the batch's
    gradient g(t) (the sum of its micro-batches' weighted-loss gradients, i.e. the whole-batch
    gradient) is then applied to the newest weights:
        W(t+1) = optimizer_step(W(t), g(t)),   g(t) = grad of loss(batch t) at W(max(t-1, 0)).
    That is a uniform delay of one step on all stages, as in the paper's W(t+1) = W(t) - lr *
    grad f(W(t-1)); train/reference.py (two_bw=True) is the same rule in one process.

Why it needs only two versions: each stage runs one continuous 1F1B stream over all
micro-batches of an epoch and updates its weights (action OPT t) right after the backward of
batch t's last micro-batch. With m >= p, that point comes before batch t+2's first forward on
every stage, so batch t+2 can use W(t+1); batch t+1's micro-batches are still in flight on
W(t). Each stage thus keeps the live weights (for the optimizer) plus snapshots of at most two
versions. The stream is cut into steps at the first forward of each batch, so step t holds
batch t's forwards, the backwards interleaved with them (the last p-1-s of batch t-1 among
them) and OPT t-1; the last step of an epoch drains the pipeline (the only flush, one per
epoch, so the bubble is (p-1)/(T*m+p-1) for T steps instead of 1F1B's (p-1)/(m+p-1)).
"""
from __future__ import annotations

from functools import lru_cache

import torch

from .actions import Action, backward_unit, forward_unit


@lru_cache(maxsize=64)
def _stream(p: int, m: int, s: int, steps: int) -> tuple[Action, ...]:
    """One epoch's 1F1B over steps*m micro-batches (global numbers), OPT t after batch t."""
    total = steps * m
    w = min(p - 1 - s, total)
    acts = [a for mb in range(w) for a in forward_unit(s, p, mb)]

    def backward(i):
        out = backward_unit(s, p, i)
        return out + [Action("OPT", i // m)] if (i + 1) % m == 0 else out

    for i in range(total - w):
        acts += forward_unit(s, p, i + w) + backward(i)
    for i in range(total - w, total):
        acts += backward(i)
    return tuple(acts)


def _cut(stream, m: int, t: int) -> int:
    """Index where step t begins: the forward unit of micro-batch t*m."""
    if t == 0:
        return 0
    return next((i for i, a in enumerate(stream) if a.op in ("RECV_F", "F") and a.mb == t * m), len(stream))


def pipedream_2bw(p: int, m: int, s: int, v: int = 1, step: int = 0, steps: int = 1) -> list[Action]:
    """Stage s's actions for step `step` of an epoch of `steps` steps, micro-batch numbers
    relative to the step's batch (negative: the previous batch's, still in flight); OPT's mb
    is the batch whose update it applies, relative too (-1 or 0)."""
    if not 0 <= step < steps:
        raise ValueError(f"step {step} is outside an epoch of {steps} steps")
    stream = _stream(p, m, s, steps)
    part = stream[_cut(stream, m, step):_cut(stream, m, step + 1) if step + 1 < steps else len(stream)]
    base = step * m
    return [Action(a.op, a.mb - step, a.chunk) if a.op == "OPT" else Action(a.op, a.mb - base, a.chunk)
            for a in part]


def pipedream_needs(p: int, m: int, v: int) -> str | None:
    if m < p:
        return (f"needs at least p={p} micro-batches per step (got {m}) so that two weight versions "
                f"suffice; use --microbatches {p} or more")
    return None


class WeightStash:
    """A stage's weight versions under 2BW: `params_for(t)` gives batch t's leaves (views of
    W(max(t-1, 0)), with their own .grad), `apply(t, step)` moves g(t) onto the live
    parameters, runs `step()` (the optimizer) and snapshots the new version."""

    def __init__(self, module: torch.nn.Module):
        self.live = {n: p for n, p in module.named_parameters() if p.requires_grad}
        self.versions: dict[int, dict[str, torch.Tensor]] = {}   # first snapshot at first use, so
        self.leaves: dict[int, dict[str, torch.Tensor]] = {}     # loaded/broadcast weights count

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.live.items()}

    def params_for(self, batch: int) -> dict[str, torch.Tensor]:
        if batch not in self.leaves:
            version = max(batch - 1, 0)
            if not self.versions:       # start (or resume): the current weights are that version
                self.versions[version] = self._snapshot()
            if version not in self.versions:
                raise RuntimeError(f"2BW: batch {batch} needs weight version {version}, which is gone "
                                   f"(kept: {sorted(self.versions)}); steps out of order?")
            self.leaves[batch] = {n: t.detach().requires_grad_() for n, t in self.versions[version].items()}
        return self.leaves[batch]

    def apply(self, batch: int, step) -> None:
        leaves = self.leaves.pop(batch, {})
        for n, p in self.live.items():
            g = leaves[n].grad if n in leaves else None
            p.grad = g if g is not None else torch.zeros_like(p)
        step()
        self.versions[batch + 1] = self._snapshot()
        for old in [k for k in self.versions if k < batch]:
            del self.versions[old]

    @property
    def held(self) -> int:
        return len(self.versions)
