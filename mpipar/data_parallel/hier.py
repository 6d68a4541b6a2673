"""Hierarchical all-reduce for a World spanning hosts: reduce within each host through shared
memory, all-reduce across hosts on disjoint slices at once, gather within each host.

Why: a flat ring or halving-doubling treats every rank as its own host, so on H hosts of L ranks
each host's link carries every local rank's traffic, 2(n-1)/n·S per rank. Reducing on the host
first leaves one vector per host to cross the links, 2(H-1)/H·S per host, the least any
all-reduce can move; and cutting it into L slices lets every local rank drive the link at once.

Steps (comm/hosts.py numbers the slices and builds the rails):
  1. every rank copies its vector into its own segment of a host-shared buffer; barrier;
  2. for each slice j it owns, a rank sums slice j over its host's segments (16-bit types into a
     float32 accumulator) -- the intra-host reduce-scatter;
  3. per owned slice, in slice order, the accumulator is all-reduced over rail j (one rank per
     host) by the flat algorithm `choose_algorithm` picks for that slice's size and H ranks
     across hosts (doubling when small, else the pipelined ring),
     always as a sum (avg divides once at the end, 16-bit types round once at the end);
  4. the finished slice goes back into the owner's segment; barrier; every rank copies every
     slice out of its owner's segment -- the intra-host all-gather.
Each element is computed by one rank per rail and copied bit for bit, so every rank ends with
the same bits. Hosts with unequal rank counts (2+1+1): R = the most ranks on any host; on a host
of L ranks local rank l owns slices l, l+L, ..., so a lone rank carries all R rails of its host,
one after another (slice order everywhere: no rank can wait on a rail another rank has not
reached). The buffer holds two copies and runs alternate between them (as shm.py does), so a
fast rank may fill one while a slow one still copies out of the other.
"""
from __future__ import annotations

import torch

from ..comm.hosts import HostLayout
from ..comm.shared import SharedBuffer
from .doubling import DoublingPlan, HalvingPlan
from .layout import split_bounds
from .ops import accumulate_dtype
from .plan import Plan
from .ringplan import RingPlan


def inner_plan(rail, acc: torch.Tensor, op: str, algorithm: str) -> Plan:
    """The flat all-reduce of one slice across hosts (rail: one rank per host)."""
    if algorithm == "ring":
        return RingPlan(rail, acc, op, 0, 2 * rail.size - 3)
    return (HalvingPlan if algorithm == "halving" else DoublingPlan)(rail, acc, op)


class HierPlan(Plan):
    def __init__(self, world, t: torch.Tensor, op: str, layout: HostLayout,
                 buffer: SharedBuffer | None = None, choose=None):
        super().__init__(world, t)
        from .ring import choose_algorithm   # ring.py imports this module
        choose = choose or choose_algorithm
        numel, esize, n = self.flat.numel(), t.element_size(), world.size
        node, lay = layout.node, layout
        host = lay.host_of[world.rank]
        self.op, self.n, self.layout = op, n, lay
        self.own = buffer is None
        self.buffer = buffer if buffer is not None else SharedBuffer(node, 2 * numel * esize)
        if self.buffer.nbytes < 2 * numel * esize:
            raise ValueError(f"shared buffer of {self.buffer.nbytes} bytes cannot hold two copies of "
                             f"{numel * esize}")
        acc_dtype = accumulate_dtype(t.dtype)
        bounds = [split_bounds(numel, lay.slices, j) for j in range(lay.slices)]
        inner_op = "sum" if op == "avg" else op
        self.slices = []   # owned, non-empty: (j, (a, b), acc, plan or None)
        for j in lay.owned(world.rank):
            a, b = bounds[j]
            if b == a:
                continue
            acc = torch.empty(b - a, dtype=acc_dtype)
            rail = lay.rails[j]
            plan = None
            if rail.size > 1:
                plan = inner_plan(rail, acc, inner_op, choose((b - a) * acc.element_size(), rail.size,
                                                             across=True))
            self.slices.append((j, (a, b), acc, plan))
        half = self.buffer.nbytes // 2
        self.halves = []
        for h in (0, 1):
            segs = [self.buffer.view(k, h * half, numel, t.dtype) for k in range(node.size)]
            outs = [(self.flat[a:b], segs[lay.owner_local(host, j)][a:b])
                    for j, (a, b) in enumerate(bounds) if b > a]
            self.halves.append((segs, outs))
        self.combine = _combiner(op)
        where = f"{node.name} ({lay.describe()} ranks per host)"
        self.labels = (f"HIER copy-in on {where}", f"HIER gather on {where}")

    def steps(self, seq: int):
        buf = self.buffer
        segs, outs = self.halves[buf.flip]
        buf.flip ^= 1
        mine = segs[self.layout.node.rank]
        mine.copy_(self.flat)
        yield buf.ibarrier(), self.labels[0], -1          # every vector is on the host
        buf.acquire()
        for _, (a, b), acc, _ in self.slices:              # intra-host reduce-scatter
            acc.copy_(segs[0][a:b])
            for k in range(1, len(segs)):
                self.combine(acc, segs[k][a:b])
        for _, (a, b), acc, plan in self.slices:           # across hosts, rail by rail
            if plan is not None:
                yield from plan.steps(seq)
            if self.op == "avg":
                acc.div_(self.n)
            mine[a:b].copy_(acc)                           # 16-bit: rounded here, once
        yield buf.ibarrier(), self.labels[1], -1          # every slice is final
        buf.acquire()
        for dst, src in outs:                              # intra-host all-gather
            dst.copy_(src)

    def close(self) -> None:
        for _, _, _, plan in self.slices:
            if plan is not None:
                plan.close()
        if self.own and self.buffer is not None:
            self.buffer.free()
        self.buffer, self.slices, self.halves = None, [], []
        super().close()


def _combiner(op: str):
    """acc <- acc (op) other in place (other may be 16-bit: promoted, no rounding of acc)."""
    if op in ("sum", "avg"):
        return lambda acc, other: acc.add_(other)
    fn = torch.maximum if op == "max" else torch.minimum
    return lambda acc, other: fn(acc, other.to(acc.dtype), out=acc)
