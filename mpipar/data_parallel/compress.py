"""Gradient compression on the wire: the ring across hosts with every message cast to a 16-bit
type (bf16 or fp16) while sums are kept in float32.

Why: across hosts the link is the bottleneck (python -m mpipar.bench allreduce-hosts), so halving
the bytes on it nearly halves the all-reduce; within a host (shared memory) nothing travels, so
nothing is cast there. Horovod's fp16 compression casts the whole tensor before the all-reduce
and sums in 16 bits; here only the messages are 16-bit: every partial sum is accumulated in
float32, and the one rounding of each partial sum happens where it is put on the wire.

Bit-identical on every rank: the rank that finishes a segment (the last reduce-scatter step)
rounds it to the wire type and keeps that rounded value itself, so what it sends round the
all-gather is exactly what it holds; the others copy those bits. Sums (and averages, divided
once at the end by everyone alike) only: max/min need no compression.

Ring steps as in algorithms.RingPlan (at step g rank r sends segment r-g-1 to r+1 and receives
segment r-g-2 from r-1); each segment's pieces are small enough to go out eagerly.
"""
from __future__ import annotations

import numpy as np
import torch

from ..comm.messages import irecv_array, isend_array
from ..comm.tags import Kind, tag
from .algorithms import WIRE_MAX_PIECES, WIRE_PIECE_BYTES, piece_table
from .plan import Plan, RingLayout, pieces_for

WIRE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def wire_dtype(name: str | None) -> torch.dtype | None:
    """'bf16' | 'fp16' -> the torch dtype messages travel as; None or 'none' -> None."""
    if name in (None, "", "none"):
        return None
    if name not in WIRE_DTYPES:
        raise ValueError(f"unknown gradient compression {name!r}; use none, {', '.join(WIRE_DTYPES)}")
    return WIRE_DTYPES[name]


def compressible(t: torch.Tensor, op: str, wire: torch.dtype | None) -> bool:
    """Only float32 sums and averages are cast (16-bit tensors are already as small)."""
    return wire is not None and t.dtype == torch.float32 and op in ("sum", "avg")


class CastRingPlan(Plan):
    """In-place ring all-reduce (op sum or avg) of a float32 tensor whose messages are `wire`."""

    def __init__(self, world, t: torch.Tensor, op: str, wire: torch.dtype, piece_bytes: int | None = None):
        super().__init__(world, t)
        if not compressible(t, op, wire):
            raise ValueError(f"wire compression takes a float32 sum or avg, not {t.dtype} {op}")
        n, r, numel = world.size, world.rank, self.flat.numel()
        self.op, self.n = op, n
        k = pieces_for(numel, n, 2, piece_bytes or WIRE_PIECE_BYTES, WIRE_MAX_PIECES)
        pieces = piece_table(RingLayout(numel, n, k))
        self.left, self.right = (r - 1) % n, (r + 1) % n
        self.peer_left, self.peer_right = world.world_rank_of(self.left), world.world_rank_of(self.right)

        def wire_buffer():   # (torch view as the wire dtype, numpy bytes for MPI)
            raw = self.scratch(numel, np.uint16)
            return torch.from_numpy(raw).view(wire), raw
        (out, out_np), (land_rs, rs_np), (land_ag, ag_np) = wire_buffer(), wire_buffer(), wire_buffer()
        acc, rs_last, last = self.flat, n - 2, 2 * n - 3
        self.acc = acc
        self.first = [(a, b, out[a:b], acc[a:b], out_np[a:b]) for a, b in pieces[(r - 1) % n] if b > a]
        s0, s1 = RingLayout(numel, n).segment(r - 1)
        self.rest = [(a, b) for a, b in ((0, s0), (s1, numel)) if b > a]
        self.events = []     # in waiting order: (g, recv np, what to do, send np or None, label)
        for g in range(last + 1):
            for j, (a, b) in enumerate(pieces[(r - g - 2) % n]):
                if b == a:
                    continue
                if g <= rs_last:
                    # add the partial sum; pass it on rounded (the owner keeps its rounding)
                    act = ("add", acc[a:b], land_rs[a:b], out[a:b], g == rs_last)
                    recv, onward = rs_np[a:b], out_np[a:b]
                else:
                    act = ("copy", acc[a:b], land_ag[a:b], None, False)
                    recv, onward = ag_np[a:b], (ag_np[a:b] if g < last else None)
                self.events.append((g, recv, act, onward, f"RING{wire_name(wire)} step {g} piece {j} from"))
        self.prepare = None  # optional fill(a, b) of acc[a:b] before its first use (see RingPlan)

    def steps(self, seq: int):
        w, left, right = self.world, self.left, self.right
        tags = [tag(Kind.RING, seq, g % 256) for g in range(2 * self.n - 2)]
        recvs = [irecv_array(w, recv, left, tags[g]) for g, recv, _, _, _ in self.events]
        sends = []
        for a, b, out, acc, out_np in self.first:
            if self.prepare is not None:
                self.prepare(a, b)
            out.copy_(acc)
            sends.append(isend_array(w, out_np, right, tags[0]))
        if self.prepare is not None:
            for a, b in self.rest:
                self.prepare(a, b)
        for req, (g, _, (kind, acc, land, out, own), onward, label) in zip(recvs, self.events):
            yield [req], label, self.peer_left
            if kind == "add":
                acc.add_(land)
                out.copy_(acc)          # rounded once, here
                if own:
                    acc.copy_(out)      # the owner holds what everyone else will receive
            else:
                acc.copy_(land)
            if onward is not None:
                sends.append(isend_array(w, onward, right, tags[g + 1]))
        if sends:
            yield sends, "RING sends to", self.peer_right
        if self.op == "avg":
            self.acc.div_(self.n)


def wire_name(wire: torch.dtype) -> str:
    return "[" + next(k for k, v in WIRE_DTYPES.items() if v == wire) + "]"
