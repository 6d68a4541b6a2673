"""A collective in flight, written as a generator that yields what it must wait for next.

The algorithms (ring, recursive doubling) read as straight-line code; this driver runs them
either to the end (`wait`, every block through BOARD so the stall watchdog sees it) or only as
far as messages have already arrived (`progress`, never blocks), which is how a bucket's
all-reduce moves on while backward is still running (progress.py's thread, or autograd hooks).
"""
from __future__ import annotations

from typing import Generator

import torch

from ..comm.progress import all_done
from ..comm.waits import BOARD

# What an algorithm yields: (requests, label, world rank of the peer or -1).
Wait = tuple[list, str, int]


class Handle:
    def __init__(self, steps: Generator[Wait, None, None] | None, result: torch.Tensor):
        self.steps, self.result = steps, result
        self.pending: Wait | None = None
        self._advance()

    def _advance(self) -> None:
        if self.steps is None:
            return
        try:
            self.pending = next(self.steps)
        except StopIteration:
            self.steps, self.pending = None, None

    @property
    def done(self) -> bool:
        return self.steps is None

    def progress(self) -> bool:
        """Advance past every wait whose messages have already arrived; True when finished."""
        while self.pending is not None and all_done(self.pending[0]):
            self._advance()
        return self.done

    def wait(self) -> torch.Tensor:
        """Run to completion; returns the (in-place) result."""
        while self.pending is not None:
            reqs, what, peer = self.pending
            BOARD.waitall(reqs, what, peer)
            self._advance()
        return self.result


def finished(result: torch.Tensor) -> Handle:
    """A handle for work that needed no messages (one rank, empty tensor)."""
    return Handle(None, result)
