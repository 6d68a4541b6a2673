"""A collective prepared once for one buffer, then run as often as needed.

Everything that does not change from call to call (numpy views of every piece, partners,
scratch buffers, wait labels) is computed when the plan is made, so a run does little more
than post messages, wait and add: under oversubscription every microsecond a rank spends in
Python between messages delays all its peers. Each run still creates fresh requests with the
run's own tag sequence number, so the wire protocol never depends on what a rank has cached.
Gradient buckets keep one plan per bucket; the functional API makes and closes one per call.
"""
from __future__ import annotations

import numpy as np
import torch

from ..comm.waits import BOARD
from .handle import Handle
from .ops import finish_into
from .scratch import POOL


class Plan:
    def __init__(self, world, t: torch.Tensor):
        if not t.is_contiguous():
            raise ValueError("in-place collectives need a contiguous tensor; call .contiguous() first "
                             "and reduce that")
        self.world, self.tensor, self.flat = world, t, t.view(-1)
        self._raws: list[np.ndarray] = []

    def scratch(self, numel: int, dtype) -> np.ndarray:
        arr, raw = POOL.take(numel, dtype)
        self._raws.append(raw)
        return arr

    def steps(self, seq: int):
        """Generator yielding (requests, label, peer) to wait for; subclasses implement it."""
        return iter(())

    def start(self, seq: int) -> Handle:
        return Handle(self.steps(seq), self.tensor)

    def run(self, seq: int) -> torch.Tensor:
        for reqs, what, peer in self.steps(seq):
            BOARD.waitall(reqs, what, peer)
        return self.tensor

    def close(self) -> None:
        """Give the scratch buffers back; the plan must not run again."""
        for raw in self._raws:
            POOL.give(raw)
        self._raws = []


def finisher(op: str, n: int, out: torch.Tensor, acc: np.ndarray, same: bool):
    """A callable writing acc's final value into out (avg: /n; rounding to out's dtype), or None
    when there is nothing to do (a sum reduced in place)."""
    if same and (op != "avg" or n == 1):
        return None
    return lambda: finish_into(op, n, out, acc, same)


class StagedPlan(Plan):
    """Runs `inner` on a host copy of a device tensor (the reductions run on numpy)."""

    def __init__(self, world, t: torch.Tensor, make_inner):
        super().__init__(world, t)
        self.host = t.detach().to("cpu")
        self.inner = make_inner(self.host)

    def steps(self, seq: int):
        self.host.copy_(self.tensor)
        yield from self.inner.steps(seq)
        self.tensor.copy_(self.host)

    def close(self) -> None:
        self.inner.close()
