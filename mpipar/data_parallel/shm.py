"""The collectives of one host through shared memory: the all-reduce (SharedPlan: each rank sums
its slice straight out of its peers' segments), reduce-scatter and all-gather. Across hosts
(hier.py) the same buffers hold each host's share while the links carry one vector per host."""
from __future__ import annotations

import numpy as np
import torch

from ..comm.shared import SharedBuffer
from .plan import UFUNC, Plan, accumulate_dtype, split_bounds


# -------------------------------------------------------------------------------------------------
# All-reduce on one host through shared memory (comm/shared.py): the algorithm `auto` picks
# when MPI says every rank of the World can share memory (see choice.choose_algorithm for sizes).
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
        self.combine = combiner(op, t.dtype == torch.bfloat16)
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


def combiner(op: str, torch_arrays: bool):
    """acc <- acc (op) other, in place, for numpy arrays or (bfloat16) torch tensors."""
    if not torch_arrays:
        ufunc = UFUNC[op]
        return lambda acc, other: ufunc(acc, other, out=acc)
    if op in ("sum", "avg"):
        return lambda acc, other: acc.add_(other)
    fn = torch.maximum if op == "max" else torch.minimum
    return lambda acc, other: fn(acc, other.to(acc.dtype), out=acc)


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
def half_offset(buffer: SharedBuffer, nbytes: int) -> int:
    if buffer.nbytes < 2 * nbytes:
        raise ValueError(f"shared buffer of {buffer.nbytes} bytes cannot hold two copies of {nbytes}")
    h = buffer.flip
    buffer.flip ^= 1             # the next call fills the other half: a slower rank may still read this one
    return h * (buffer.nbytes // 2)


def shared_reduce_scatter(world, t: torch.Tensor, op: str, buffer: SharedBuffer, bounds) -> torch.Tensor:
    """Segment `bounds[world.rank]` of flat `t` becomes its reduction (op) over every rank; returns it."""
    n, r, flat = world.size, world.rank, t.view(-1)
    numel = flat.numel()
    offset = half_offset(buffer, numel * t.element_size())
    parts = [buffer.view(j, offset, numel, t.dtype) for j in range(n)]
    parts[r].copy_(flat)
    world.board.shared(numel * t.element_size())
    buffer.wait_barrier(f"SHM reduce-scatter on {world.name}")
    a, b = bounds[r]
    mine = flat[a:b]
    acc_dtype = accumulate_dtype(t.dtype)
    acc = mine if acc_dtype == t.dtype else mine.to(acc_dtype)
    combine = combiner(op, True)
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
    offset = half_offset(buffer, numel * t.element_size())
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
