"""The collectives of a World that spans hosts with several ranks on a host: reduce on each host
through shared memory, cross the links with one vector per host cut into slices that every local
rank carries at once (its "rail"), then share the result on the host. HierPlan is the all-reduce;
hier_reduce_scatter and hier_all_gather are what ZeRO steps on across hosts."""
from __future__ import annotations

import torch

from ..comm.shared import HostLayout, SharedBuffer
from .algorithms import DoublingPlan, HalvingPlan, RingPlan
from .choice import choose_algorithm
from .compress import CastRingPlan, compressible
from .plan import Plan, accumulate_dtype, split_bounds
from .shm import half_offset, combiner


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
#   1. every rank copies the slices other local ranks own into its own segment of a host-shared
#      buffer (its own slices stay where they are: no rank but itself reads them); barrier;
#   2. for each slice j it owns, a rank sums slice j over its host's segments and its own vector
#      (in place in that vector; 16-bit types into a float32 accumulator) -- the intra-host
#      reduce-scatter; under the ring it is done piece by piece as the ring first needs each
#      piece, so the link starts after one piece, not a slice;
#   3. per owned slice, in slice order, the accumulator is all-reduced over rail j (one rank per
#      host) by the flat algorithm `choose_algorithm` picks for that slice's size and H ranks
#      across hosts (doubling when small, else the pipelined ring),
#      always as a sum (avg divides once at the end, 16-bit types round once at the end);
#   4. the finished slice (already in the owner's vector) is copied into its segment; barrier;
#      every rank copies the other slices out of their owners' segments -- the intra-host
#      all-gather. Per rank, (2L-1)/L of the vector is copied where copying it all in and out
#      and every slice back took 2 + 1/L (64 MiB on 2 hosts x 2: 584-597 ms against 604-609).
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
        in_place = acc_dtype == t.dtype
        bounds = [split_bounds(numel, lay.slices, j) for j in range(lay.slices)]
        inner_op = "sum" if op == "avg" else op
        self.slices = []   # owned, non-empty: (j, (a, b), acc, plan or None)
        for j in lay.owned(world.rank):
            a, b = bounds[j]
            if b == a:
                continue
            acc = self.flat[a:b] if in_place else torch.empty(b - a, dtype=acc_dtype)
            rail = lay.rails[j]
            plan = None
            if rail.size > 1:
                plan = inner_plan(rail, acc, inner_op, choose((b - a) * acc.element_size(), rail.size,
                                                             across=True),
                                  wire if compressible(t, op, wire) else None)
            self.slices.append((j, (a, b), acc, plan))
        self.in_place, self.shares = in_place, node.size > 1
        me = node.rank
        others = [((a, b), lay.owner_local(host, j)) for j, (a, b) in enumerate(bounds)
                  if b > a and lay.owner_local(host, j) != me]      # slices another local rank owns
        half = self.buffer.nbytes // 2
        self.halves = []
        for h in (0, 1):
            segs = [self.buffer.view(k, h * half, numel, t.dtype) for k in range(node.size)]
            ins = [(segs[me][a:b], self.flat[a:b]) for (a, b), _ in others]
            outs = [(self.flat[a:b], segs[k][a:b]) for (a, b), k in others]
            self.halves.append((segs, ins, outs))
        self.shared_bytes = sum(b - a for (a, b), _ in others) * esize
        self.combine = combiner(op, torch_arrays=True)
        where = f"{node.name} of {lay.describe()} ranks per host"
        self.labels = (f"HIER copy-in on {where}", f"HIER gather on {where}")

    def steps(self, seq: int):
        buf = self.buffer
        segs, ins, outs = self.halves[buf.flip]
        buf.flip ^= 1
        mine = segs[self.layout.node.rank]
        self.world.board.shared(self.shared_bytes)
        for dst, src in ins:                               # the slices other ranks reduce
            dst.copy_(src)
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
            if not self.in_place:
                self.flat[a:b].copy_(acc)                  # 16-bit: rounded here, once
            if self.shares:
                mine[a:b].copy_(self.flat[a:b])            # for the host's other ranks
        yield buf.ibarrier(), self.labels[1], -1          # every slice is final
        buf.acquire()
        for dst, src in outs:                              # intra-host all-gather
            dst.copy_(src)

    def _filler(self, segs, start: int, acc: torch.Tensor):
        """fill(a, b): acc[a:b] = the host's reduction of elements start+a .. start+b. This rank's
        own elements are read from its vector (they were not copied in); in place, acc is that
        vector, which holds them already, and the other ranks' are combined into it."""
        combine, me, flat = self.combine, self.layout.node.rank, self.flat
        sources = [flat if k == me else seg for k, seg in enumerate(segs)]
        if self.in_place:
            sources.pop(me)
        else:
            first = sources.pop(0)

        def fill(a: int, b: int) -> None:
            if not self.in_place:
                acc[a:b].copy_(first[start + a:start + b])
            for src in sources:
                combine(acc[a:b], src[start + a:start + b])
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
# Reduce-scatter and all-gather across hosts (what ZeRO steps on when its replicas span hosts),
# for hosts of equal rank counts L. Rank r ends with segment r (`bounds`, the ring's layout).
# Rail l (local rank l of every host, in host order) carries the segments of the local-rank-l
# ranks, one per host: a vector of H blocks of m elements (m: the longest segment, blocks padded),
# block i for host i's rank l. Reduce-scatter: every rank puts its vector in the host's shared
# buffer; rank l sums each of its rail's segments over the host (the intra-host reduce-scatter)
# into its block, the rail's ring reduce-scatter leaves block i summed over hosts on host i.
# All-gather: each rank's segment goes into its block, the rail's ring all-gathers the blocks,
# rank l writes them into its part of the shared buffer, and every rank copies every segment out.
# Each host's link carries (H-1)/H of the vector each way, the least either collective can move;
# a flat ring over n ranks moves (n-1)/n per rank, L of them per link.
# -------------------------------------------------------------------------------------------------
def _rail_blocks(layout: HostLayout, bounds):
    """(rail, per host i: the segment (a, b) of host i's rank with this local rank, m)."""
    local = layout.node.rank
    segs = [bounds[ranks[local]] for ranks in layout.members]
    return layout.rails[local], segs, max(b - a for a, b in bounds)


def equal_hosts(layout: HostLayout) -> bool:
    """Hierarchical reduce-scatter and all-gather need the same rank count on every host."""
    return len(set(layout.sizes)) == 1


def hier_reduce_scatter(world, t: torch.Tensor, op: str, layout: HostLayout, buffer: SharedBuffer,
                        bounds, seq: int) -> torch.Tensor:
    """Segment `bounds[world.rank]` of flat `t` becomes its reduction (op) over every rank; returns it."""
    flat, node = t.view(-1), layout.node
    numel, esize = flat.numel(), t.element_size()
    offset = half_offset(buffer, numel * esize)
    parts = [buffer.view(k, offset, numel, t.dtype) for k in range(node.size)]
    parts[node.rank].copy_(flat)
    world.board.shared(numel * esize)
    buffer.wait_barrier(f"HIER reduce-scatter copy-in on {node.name}")
    rail, segs, m = _rail_blocks(layout, bounds)
    acc = torch.zeros(len(segs) * m, dtype=accumulate_dtype(t.dtype))
    combine = combiner(op, torch_arrays=True)
    for i, (a, b) in enumerate(segs):                  # the host's sum of each of the rail's segments
        block = acc[i * m:i * m + b - a]
        block.copy_(parts[0][a:b])
        for part in parts[1:]:
            combine(block, part[a:b])
    if rail.size > 1:
        RingPlan(rail, acc, "sum" if op == "avg" else op, 0, rail.size - 2, across=True).run_once(seq)
    a, b = bounds[world.rank]
    here = layout.host_of[world.rank]
    mine = acc[here * m:here * m + b - a]
    if op == "avg":
        mine.div_(world.size)
    flat[a:b].copy_(mine)                              # 16-bit: rounded here, once
    return flat[a:b]


def hier_all_gather(world, t: torch.Tensor, layout: HostLayout, buffer: SharedBuffer, bounds,
                    seq: int) -> torch.Tensor:
    """Every rank's segment `bounds[rank]` of flat `t`, on every rank; returns `t`."""
    flat, node = t.view(-1), layout.node
    numel, esize = flat.numel(), t.element_size()
    offset = half_offset(buffer, numel * esize)
    rail, segs, m = _rail_blocks(layout, bounds)
    blocks = torch.zeros(len(segs) * m, dtype=t.dtype)
    here = layout.host_of[world.rank]
    a, b = bounds[world.rank]
    blocks[here * m:here * m + b - a].copy_(flat[a:b])
    if rail.size > 1:
        RingPlan(rail, blocks, "sum", rail.size - 1, 2 * rail.size - 3, across=True).run_once(seq)
    mine = buffer.view(node.rank, offset, numel, t.dtype)
    for i, (a, b) in enumerate(segs):                  # the rail's segments into this rank's part
        mine[a:b].copy_(blocks[i * m:i * m + b - a])
    world.board.shared(numel * esize // node.size)
    buffer.wait_barrier(f"HIER all-gather on {node.name}")
    for q in range(world.size):                        # every segment from the part of the
        if q == world.rank:                            # local rank whose rail carried it
            continue
        a, b = bounds[q]
        flat[a:b].copy_(buffer.view(layout.local_of[q], offset, numel, t.dtype)[a:b])
    return t
