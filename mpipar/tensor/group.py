"""The tensor-parallel group a layer talks to: the tp sub-World plus a counter of every
communication round, so tests can assert "one all-reduce per forward" and benchmarks can
report bytes and messages per step.

Symbols: p = tp size, n = payload bytes of one call.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from ..comm.world import allgather, allreduce_sum
from ..errors import ConfigError


@dataclass
class CommCounter:
    """Calls and payload bytes per (op, phase); phase: 'forward', 'backward', 'clip' or 'state'."""
    calls: Counter = field(default_factory=Counter)
    bytes: Counter = field(default_factory=Counter)
    wire: Counter = field(default_factory=Counter)   # bytes each rank sends under a ring algorithm

    def add(self, op: str, phase: str, nbytes: int, size: int) -> None:
        self.calls[op, phase] += 1
        self.bytes[op, phase] += nbytes
        self.wire[op, phase] += ring_bytes(op, nbytes, size)

    def count(self, op: str | None = None, phase: str | None = None) -> int:
        return sum(v for (o, p), v in self.calls.items() if op in (None, o) and phase in (None, p))

    def total_bytes(self, wire: bool = False) -> int:
        return sum((self.wire if wire else self.bytes).values())

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()
        self.wire.clear()

    def describe(self) -> str:
        return ", ".join(f"{o} {p}: {v}" for (o, p), v in sorted(self.calls.items())) or "no communication"


def ring_bytes(op: str, nbytes: int, size: int) -> int:
    """Bytes one rank sends: all-reduce of n costs 2(p-1)/p*n, all-gather of n per rank (p-1)*n."""
    if size <= 1:
        return 0
    return 2 * (size - 1) * nbytes // size if op == "allreduce" else (size - 1) * nbytes


class TPGroup:
    """rank/size of the tp axis and its two collectives. With size 1 nothing is communicated."""

    def __init__(self, world=None, counter: CommCounter | None = None, rank: int = 0, size: int = 1):
        self.world = world
        self.rank = world.rank if world is not None else rank
        self.size = world.size if world is not None else size
        self.counter = counter if counter is not None else CommCounter()
        if not 0 <= self.rank < self.size:
            raise ConfigError(f"tp rank {self.rank} is outside 0..{self.size - 1}")

    @classmethod
    def offline(cls, rank: int, size: int) -> "TPGroup":
        """A group that can build and shard layers but not communicate (tests, planning)."""
        return cls(None, rank=rank, size=size)

    def all_reduce(self, t: torch.Tensor, phase: str) -> torch.Tensor:
        if self.size == 1:
            return t
        self._need_world("all-reduce")
        self.counter.add("allreduce", phase, t.numel() * t.element_size(), self.size)
        return allreduce_sum(self.world, t.contiguous())

    def all_gather(self, t: torch.Tensor, phase: str) -> torch.Tensor:
        """Every rank's `t` stacked in rank order: [p, *t.shape]."""
        if self.size == 1:
            return t.unsqueeze(0)
        self._need_world("all-gather")
        self.counter.add("allgather", phase, t.numel() * t.element_size(), self.size)
        return allgather(self.world, t.contiguous())

    def all_gather_last(self, t: torch.Tensor, phase: str) -> torch.Tensor:
        """Concatenate every rank's `t` along the last dimension (rank order)."""
        if self.size == 1:
            return t
        stacked = self.all_gather(t, phase)   # [p, ..., n]
        return stacked.movedim(0, -2).reshape(*t.shape[:-1], self.size * t.shape[-1])

    def local_slice_last(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous part of the last dimension (no communication)."""
        n = divisible(t.shape[-1], self.size, "the last dimension of the input")
        return t.narrow(-1, self.rank * n, n).contiguous()

    def _need_world(self, what: str) -> None:
        if self.world is None:
            raise RuntimeError(f"this TPGroup is offline (no World); it cannot {what}")


def divisible(n: int, size: int, what: str) -> int:
    """n // size, or a one-line ConfigError saying what to change."""
    if size < 1 or n % size:
        raise ConfigError(f"{what} is {n}, not divisible by the tensor-parallel size tp={size}; "
                          f"choose a multiple of {size} or another tp")
    return n // size
