"""What every all-reduce plan is made of: the reduction ops and their dtypes, how a vector is cut
into per-rank segments and pieces, reusable numpy scratch, the Handle a started reduction
returns, and Plan, the base class (a generator of steps that waits only through BOARD)."""
from __future__ import annotations

import numpy as np
import torch
from dataclasses import dataclass
from typing import Generator

from ..comm.waits import BOARD, all_done


# -------------------------------------------------------------------------------------------------
# Reduction operators and accumulation dtypes shared by every all-reduce algorithm.
#
# The hot loops work on numpy views of CPU tensors (slicing and adding a numpy array costs a
# fraction of the torch call overhead, which dominates at the piece sizes a pipelined ring uses).
# Half-precision inputs (bfloat16, float16) are accumulated in float32 and rounded once at the
# end, so the result is round(sum) rather than a chain of per-hop roundings (Open MPI 5's native
# Allreduce returns inf for bfloat16, MPICH rejects it).
# -------------------------------------------------------------------------------------------------
OPS = ("sum", "avg", "max", "min")
LOW_PRECISION = (torch.bfloat16, torch.float16)
UFUNC = {"sum": np.add, "avg": np.add, "max": np.maximum, "min": np.minimum}


def check_op(op: str, dtype: torch.dtype) -> None:
    if op not in OPS:
        raise ValueError(f"unknown reduction {op!r}; use one of {', '.join(OPS)}")
    if dtype == torch.bool or dtype.is_complex:
        raise TypeError(f"cannot all-reduce a {dtype} tensor; use a real floating-point or integer dtype")
    if op == "avg" and not dtype.is_floating_point:
        raise TypeError(f"op='avg' needs a floating-point tensor, got {dtype}; use op='sum'")


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in LOW_PRECISION else dtype


_NUMPY: dict = {}


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    if dtype not in _NUMPY:
        _NUMPY[dtype] = torch.empty(0, dtype=dtype).numpy().dtype
    return _NUMPY[dtype]


def reduce_into(op: str, acc: np.ndarray, other: np.ndarray) -> None:
    """acc <- acc (op) other, in place (sum and avg both add; avg divides once at the end)."""
    UFUNC[op](acc, other, out=acc)


def finish_into(op: str, n: int, out: torch.Tensor, acc: np.ndarray, same: bool) -> None:
    """out <- the final value of acc: divided by n for avg, rounded to out's dtype. `same`: acc
    is out's own memory (no accumulation dtype), so this works in place."""
    if same:
        if op == "avg" and n > 1:
            np.divide(acc, n, out=acc)
        return
    src = torch.from_numpy(acc)
    out.copy_(src / n if op == "avg" and n > 1 else src)


# -------------------------------------------------------------------------------------------------
# How a flat buffer is cut for the ring: n segments (one per rank) and k pieces per segment.
#
# Every rank computes the same cuts from (numel, n, k) alone, so sender and receiver always agree
# on a message's size without a header, and empty pieces (numel < n·k) are skipped on both sides.
# -------------------------------------------------------------------------------------------------
def split_bounds(total: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of part `index` when `total` items are cut into `parts` runs whose sizes
    differ by at most one, the longer runs first (torch.tensor_split's rule)."""
    base, extra = divmod(total, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def pieces_for(numel: int, n: int, elem_bytes: int, piece_bytes: int, max_pieces: int = 64) -> int:
    """Pieces per segment so one piece holds about `piece_bytes` (at least 1, at most max_pieces)."""
    longest = -(-numel // n) if n else 0
    per_piece = max(1, piece_bytes // max(1, elem_bytes))
    return max(1, min(max_pieces, -(-longest // per_piece)))


@dataclass(frozen=True)
class RingLayout:
    numel: int
    n: int        # ranks in the ring
    k: int = 1    # pieces per segment

    def segment(self, seg: int) -> tuple[int, int]:
        return split_bounds(self.numel, self.n, seg % self.n)

    def piece(self, seg: int, j: int) -> tuple[int, int]:
        """[start, stop) in the flat buffer of piece j of segment `seg`."""
        s0, s1 = self.segment(seg)
        p0, p1 = split_bounds(s1 - s0, self.k, j)
        return s0 + p0, s0 + p1

    # -- which segment a rank sends and receives at ring step g ---------------------------
    # Steps 0..n-2 are the reduce-scatter, n-1..2n-3 the all-gather; in both phases rank r
    # sends segment r-g-1 to r+1 and receives segment r-g-2 from r-1, so the segment received
    # at step g is exactly the one sent on at step g+1, and after step n-2 rank r owns segment r.
    def send_segment(self, rank: int, g: int) -> int:
        return (rank - g - 1) % self.n

    def recv_segment(self, rank: int, g: int) -> int:
        return (rank - g - 2) % self.n

    def bytes_sent(self, rank: int, elem_bytes: int, first: int, last: int) -> int:
        """Bytes rank `rank` sends over steps first..last (for the 2(n-1)/n·S check)."""
        total = 0
        for g in range(first, last + 1):
            s0, s1 = self.segment(self.send_segment(rank, g))
            total += (s1 - s0) * elem_bytes
        return total


# -------------------------------------------------------------------------------------------------
# Reusable receive buffers for the all-reduce algorithms.
#
# A fresh 32 MiB array per call costs more than the copy it receives (mmap, then one page fault
# per 4 KiB on first touch), so buffers are taken from and given back to a small pool. Collectives
# in flight at the same time (gradient buckets) each hold their own buffer.
# -------------------------------------------------------------------------------------------------
KEEP = 8   # free buffers kept


class ScratchPool:
    def __init__(self):
        self.free: list[np.ndarray] = []

    def take(self, numel: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        """(array of `numel` elements of `dtype`, raw buffer to give back)."""
        nbytes = numel * np.dtype(dtype).itemsize
        best = None
        for i, b in enumerate(self.free):
            if b.nbytes >= nbytes and (best is None or b.nbytes < self.free[best].nbytes):
                best = i
        raw = self.free.pop(best) if best is not None else np.empty(max(nbytes, 64), dtype=np.uint8)
        return raw[:nbytes].view(dtype), raw

    def give(self, raw: np.ndarray | None) -> None:
        if raw is None:
            return
        self.free.append(raw)
        if len(self.free) > KEEP:
            self.free.pop(min(range(len(self.free)), key=lambda i: self.free[i].nbytes))

    def clear(self) -> None:
        self.free.clear()


POOL = ScratchPool()


# -------------------------------------------------------------------------------------------------
# A collective in flight, written as a generator that yields what it must wait for next.
#
# The algorithms (ring, recursive doubling) read as straight-line code; this driver runs them
# either to the end (`wait`, every block through BOARD so the stall watchdog sees it) or only as
# far as messages have already arrived (`progress`, never blocks), which is how a bucket's
# all-reduce moves on while backward is still running (buckets.py's ProgressThread, or autograd hooks).
# -------------------------------------------------------------------------------------------------
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


# -------------------------------------------------------------------------------------------------
# A collective prepared once for one buffer, then run as often as needed.
#
# Everything that does not change from call to call (numpy views of every piece, partners,
# scratch buffers, wait labels) is computed when the plan is made, so a run does little more
# than post messages, wait and add: under oversubscription every microsecond a rank spends in
# Python between messages delays all its peers. Each run still creates fresh requests with the
# run's own tag sequence number, so the wire protocol never depends on what a rank has cached.
# Gradient buckets keep one plan per bucket; the functional API makes and closes one per call.
# -------------------------------------------------------------------------------------------------
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

    def run_once(self, seq: int) -> torch.Tensor:
        """run, then close (the functional calls: a plan made for one call)."""
        try:
            return self.run(seq)
        finally:
            self.close()

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
