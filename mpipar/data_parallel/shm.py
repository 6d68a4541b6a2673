"""The all-reduces through shared memory: on one host (SharedPlan: each rank sums its slice straight
out of its peers' segments), and across hosts with several ranks on a host (HierPlan: reduce on
the host, all-reduce slices across hosts by every local rank at once, gather on the host)."""
from __future__ import annotations

import numpy as np
import torch

from ..comm.shared import HostLayout, SharedBuffer
from .algorithms import DoublingPlan, HalvingPlan, RingPlan
from .compress import CastRingPlan, compressible
from .plan import UFUNC, Plan, accumulate_dtype, split_bounds


# -------------------------------------------------------------------------------------------------
# All-reduce on one host through shared memory (comm/shared.py): the algorithm `auto` picks
# when MPI says every rank of the World can share memory (see ring.choose_algorithm for sizes).
#
# Each rank copies its vector into its own segment of a shared buffer; rank r then reduces the
# r-th 1/n slice out of all n segments (16-bit types accumulate in float32 and round once) and
# every rank copies the finished slices back. Nothing is sent: each byte is written once into
# shared memory, read once to reduce and once to copy out, where the ring moves 2(n-1)/n of the
# vector through MPI's own copies and waits 2(n-1) times for a peer to be scheduled.
#
# The vector is cut into pieces (cache-sized) and the phases overlap: while reducing piece i a
# rank already copies in piece i+1, so a run costs one barrier per piece plus one. The buffer
# holds two copies of the vector and runs alternate between them, so the next run may start
# filling one while a slower rank still copies out of the other.
# -------------------------------------------------------------------------------------------------
PIECE_BYTES = 4 * 2 ** 20   # per piece over all ranks' slices: the n segments' pieces stay in cache


def _cuts(total: int, parts: int) -> list[int]:
    """Boundaries of `parts` near-equal runs of `total` items: [0, ..., total]."""
    return [split_bounds(total, parts, i)[0] for i in range(parts)] + [total]


class SharedPlan(Plan):
    def __init__(self, world, t: torch.Tensor, op: str, buffer: SharedBuffer | None = None,
                 piece_bytes: int | None = None):
        super().__init__(world, t)
        n, r, numel, esize = world.size, world.rank, self.flat.numel(), t.element_size()
        self.op, self.n = op, n
        self.own = buffer is None
        self.buffer = buffer if buffer is not None else SharedBuffer(world, 2 * numel * esize)
        if self.buffer.nbytes < 2 * numel * esize:
            raise ValueError(f"shared buffer of {self.buffer.nbytes} bytes cannot hold two copies of "
                             f"{numel * esize}")
        k = max(1, min(numel // n, -(-numel * esize // (piece_bytes or PIECE_BYTES))))
        bounds = _cuts(numel, k)
        # Every view a run touches is made now (a run then only copies and adds: under
        # oversubscription each microsecond of Python on one rank delays all of them). numpy
        # views where numpy has the dtype (its calls cost less than torch's), torch for bfloat16.
        arr = (lambda x: x) if t.dtype == torch.bfloat16 else (lambda x: x.numpy())
        acc_dtype = accumulate_dtype(t.dtype)
        flat = arr(self.flat)
        # the halves sit at fixed offsets of the buffer, whatever this vector's size, so plans
        # of different sizes sharing one buffer (the blocking API's arena) never overlap a
        # half that a slower rank may still be reading
        half = self.buffer.nbytes // 2
        self.runs = []
        for h in (0, 1):
            segs = [arr(self.buffer.view(j, h * half, numel, t.dtype)) for j in range(n)]
            pieces = []
            for a, b in zip(bounds, bounds[1:]):
                cut = [a + c for c in _cuts(b - a, n)]
                lo, hi = cut[r], cut[r + 1]
                own = segs[r][lo:hi]
                acc = own if acc_dtype == t.dtype else arr(torch.empty(hi - lo, dtype=acc_dtype))
                pieces.append(((segs[r][a:b], flat[a:b]),                                  # copy in
                               (own, acc, [segs[(r + i) % n][lo:hi] for i in range(1, n)]),  # reduce
                               [(flat[cut[j]:cut[j + 1]], segs[j][cut[j]:cut[j + 1]]) for j in range(n)]))
            self.runs.append(pieces)
        self.copy = (lambda dst, src: dst.copy_(src)) if t.dtype == torch.bfloat16 else np.copyto
        self.combine = _combiner(op, t.dtype == torch.bfloat16)
        self.labels = [f"SHM all-reduce piece {i} on {world.name}" for i in range(k)]

    def steps(self, seq: int):
        buf, copy = self.buffer, self.copy
        pieces = self.runs[buf.flip]
        buf.flip ^= 1
        self.world.board.shared(self.flat.numel() * self.flat.element_size())
        copy(*pieces[0][0])
        yield buf.ibarrier(), self.labels[0], -1        # piece 0 is in every segment
        buf.acquire()
        for i, (_, reduce, outs) in enumerate(pieces):
            self._reduce(*reduce)
            if i + 1 < len(pieces):
                copy(*pieces[i + 1][0])
            # one barrier: every slice of piece i is reduced AND piece i+1 is in every segment
            yield buf.ibarrier(), self.labels[i], -1
            buf.acquire()
            for dst, src in outs:
                copy(dst, src)
        # (the next run fills the other half, so no closing barrier is needed)

    def _reduce(self, own, acc, others) -> None:
        """This rank's slice of the piece, reduced over every segment into its own segment."""
        if acc is not own:
            self.copy(acc, own)
        for other in others:
            self.combine(acc, other)
        if self.op == "avg":
            self.copy(acc, acc / self.n) if isinstance(acc, torch.Tensor) else np.divide(acc, self.n, out=acc)
        if acc is not own:
            self.copy(own, acc)

    def close(self) -> None:
        if self.own and self.buffer is not None:
            self.buffer.free()
        self.buffer, self.runs = None, []
        super().close()


def _combiner(op: str, torch_arrays: bool):
    """acc <- acc (op) other, in place, for numpy arrays or (bfloat16) torch tensors."""
    if not torch_arrays:
        ufunc = UFUNC[op]
        return lambda acc, other: ufunc(acc, other, out=acc)
    if op in ("sum", "avg"):
        return lambda acc, other: acc.add_(other)
    fn = torch.maximum if op == "max" else torch.minimum
    return lambda acc, other: fn(acc, other.to(acc.dtype), out=acc)


# -------------------------------------------------------------------------------------------------
# Hierarchical all-reduce for a World spanning hosts: reduce within each host through shared
# memory, all-reduce across hosts on disjoint slices at once, gather within each host.
#
# Why: a flat ring or halving-doubling treats every rank as its own host, so on H hosts of L ranks
# each host's link carries every local rank's traffic, 2(n-1)/n·S per rank. Reducing on the host
# first leaves one vector per host to cross the links, 2(H-1)/H·S per host, the least any
# all-reduce can move; and cutting it into L slices lets every local rank drive the link at once.
#
# Steps (comm/shared.py numbers the slices and builds the rails):
#   1. every rank copies its vector into its own segment of a host-shared buffer; barrier;
#   2. for each slice j it owns, a rank sums slice j over its host's segments (16-bit types into a
#      float32 accumulator) -- the intra-host reduce-scatter; under the ring it is done piece by
#      piece as the ring first needs each piece, so the link starts after one piece, not a slice;
#   3. per owned slice, in slice order, the accumulator is all-reduced over rail j (one rank per
#      host) by the flat algorithm `choose_algorithm` picks for that slice's size and H ranks
#      across hosts (doubling when small, else the pipelined ring),
#      always as a sum (avg divides once at the end, 16-bit types round once at the end);
#   4. the finished slice goes back into the owner's segment; barrier; every rank copies every
#      slice out of its owner's segment -- the intra-host all-gather.
# Each element is computed by one rank per rail and copied bit for bit, so every rank ends with
# the same bits. Hosts with unequal rank counts (2+1+1): R = the most ranks on any host; on a host
# of L ranks local rank l owns slices l, l+L, ..., so a lone rank carries all R rails of its host,
# one after another (slice order everywhere: no rank can wait on a rail another rank has not
# reached). The buffer holds two copies and runs alternate between them (as shm.py does), so a
# fast rank may fill one while a slow one still copies out of the other.
# -------------------------------------------------------------------------------------------------
def inner_plan(rail, acc: torch.Tensor, op: str, algorithm: str, wire: torch.dtype | None = None) -> Plan:
    """The flat all-reduce of one slice across hosts (rail: one rank per host); `wire`: the
    16-bit type its messages travel as (compress.py; the ring at every size)."""
    if wire is not None:
        return CastRingPlan(rail, acc, op, wire)
    if algorithm == "ring":
        return RingPlan(rail, acc, op, 0, 2 * rail.size - 3, across=True)
    return (HalvingPlan if algorithm == "halving" else DoublingPlan)(rail, acc, op)


class HierPlan(Plan):
    def __init__(self, world, t: torch.Tensor, op: str, layout: HostLayout,
                 buffer: SharedBuffer | None = None, choose=None, wire: torch.dtype | None = None):
        super().__init__(world, t)
        from .reduce import choose_algorithm   # reduce.py imports this module
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
                                                             across=True),
                                  wire if compressible(t, op, wire) else None)
            self.slices.append((j, (a, b), acc, plan))
        half = self.buffer.nbytes // 2
        self.halves = []
        for h in (0, 1):
            segs = [self.buffer.view(k, h * half, numel, t.dtype) for k in range(node.size)]
            outs = [(self.flat[a:b], segs[lay.owner_local(host, j)][a:b])
                    for j, (a, b) in enumerate(bounds) if b > a]
            self.halves.append((segs, outs))
        self.combine = _combiner(op, torch_arrays=True)
        where = f"{node.name} of {lay.describe()} ranks per host"
        self.labels = (f"HIER copy-in on {where}", f"HIER gather on {where}")

    def steps(self, seq: int):
        buf = self.buffer
        segs, outs = self.halves[buf.flip]
        buf.flip ^= 1
        mine = segs[self.layout.node.rank]
        self.world.board.shared(self.flat.numel() * self.flat.element_size())
        mine.copy_(self.flat)
        yield buf.ibarrier(), self.labels[0], -1          # every vector is on the host
        buf.acquire()
        for _, (a, b), acc, plan in self.slices:           # across hosts, rail by rail
            fill = self._filler(segs, a, acc)                 # intra-host reduce-scatter: a
            if hasattr(plan, "prepare"):                     # ring fills piece by piece as it
                plan.prepare = fill                          # first needs each, overlapping
            else:                                            # the link
                fill(0, b - a)
            if plan is not None:
                yield from plan.steps(seq)
            if self.op == "avg":
                acc.div_(self.n)
            mine[a:b].copy_(acc)                           # 16-bit: rounded here, once
        yield buf.ibarrier(), self.labels[1], -1          # every slice is final
        buf.acquire()
        for dst, src in outs:                              # intra-host all-gather
            dst.copy_(src)

    def _filler(self, segs, start: int, acc: torch.Tensor):
        """fill(a, b): acc[a:b] = the host's sum of elements start+a .. start+b."""
        combine = self.combine

        def fill(a: int, b: int) -> None:
            acc[a:b].copy_(segs[0][start + a:start + b])
            for seg in segs[1:]:
                combine(acc[a:b], seg[start + a:start + b])
        return fill

    def close(self) -> None:
        for _, _, _, plan in self.slices:
            if plan is not None:
                plan.close()
        if self.own and self.buffer is not None:
            self.buffer.free()
        self.buffer, self.slices, self.halves = None, [], []
        super().close()


# -------------------------------------------------------------------------------------------------
# Reduce-scatter and all-gather on one host through shared memory (what ZeRO steps on): the same
# double-buffered window as SharedPlan, the segments of `segment_of` (the ring's layout, so either
# algorithm leaves the same segment on the same rank).
#   reduce-scatter: every rank copies its vector into its own part of the window; barrier; rank r
#     sums segment r over every part, straight into its own vector's segment r.
#   all-gather: every rank copies its segment r into its part; barrier; every rank copies every
#     segment out. Each byte is written once into shared memory and read once per reader: no
#     messages, one barrier each (the ring: n-1 hand-offs, each waiting for a peer).
# -------------------------------------------------------------------------------------------------
def _half(buffer: SharedBuffer, nbytes: int) -> int:
    if buffer.nbytes < 2 * nbytes:
        raise ValueError(f"shared buffer of {buffer.nbytes} bytes cannot hold two copies of {nbytes}")
    h = buffer.flip
    buffer.flip ^= 1             # the next call fills the other half: a slower rank may still read this one
    return h * (buffer.nbytes // 2)


def shared_reduce_scatter(world, t: torch.Tensor, op: str, buffer: SharedBuffer, bounds) -> torch.Tensor:
    """Segment `bounds[world.rank]` of flat `t` becomes its reduction (op) over every rank; returns it."""
    n, r, flat = world.size, world.rank, t.view(-1)
    numel = flat.numel()
    offset = _half(buffer, numel * t.element_size())
    parts = [buffer.view(j, offset, numel, t.dtype) for j in range(n)]
    parts[r].copy_(flat)
    world.board.shared(numel * t.element_size())
    buffer.wait_barrier(f"SHM reduce-scatter on {world.name}")
    a, b = bounds[r]
    mine = flat[a:b]
    acc_dtype = accumulate_dtype(t.dtype)
    acc = mine if acc_dtype == t.dtype else mine.to(acc_dtype)
    combine = _combiner(op, True)
    for i in range(1, n):
        combine(acc, parts[(r + i) % n][a:b])
    if op == "avg":
        acc.div_(n)
    if acc is not mine:
        mine.copy_(acc)
    return mine


def shared_all_gather(world, t: torch.Tensor, buffer: SharedBuffer, bounds) -> torch.Tensor:
    """Every rank's segment `bounds[rank]` of flat `t`, on every rank; returns `t`."""
    return shared_all_gather_start(world, t, buffer, bounds)()


def shared_all_gather_start(world, t: torch.Tensor, buffer: SharedBuffer, bounds):
    """shared_all_gather in two halves: this rank's segment goes into shared memory and the
    barrier starts now; the returned function waits for the peers and copies their segments in
    (returns `t`). Compute in between overlaps the peers' arrival. One start in flight per buffer."""
    n, r, flat = world.size, world.rank, t.view(-1)
    numel = flat.numel()
    offset = _half(buffer, numel * t.element_size())
    a, b = bounds[r]
    buffer.view(r, offset, b - a, t.dtype).copy_(flat[a:b])
    world.board.shared((b - a) * t.element_size())
    requests = buffer.ibarrier()

    def finish() -> torch.Tensor:
        world.board.waitall(requests, f"SHM all-gather on {world.name}")
        buffer.acquire()
        for j in range(n):
            if j != r:
                lo, hi = bounds[j]
                flat[lo:hi].copy_(buffer.view(j, offset, hi - lo, t.dtype))
        return t
    return finish
