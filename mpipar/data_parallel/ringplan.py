"""The pipelined ring: reduce-scatter (steps 0..n-2) then all-gather (steps n-1..2n-3).

At step g rank r sends segment r-g-1 to r+1 and receives segment r-g-2 from r-1 (layout.py), so
the segment received at step g is the one passed on at step g+1, after step n-2 rank r owns the
reduced segment r, and each rank sends 2(n-1)/n·S bytes, the bandwidth optimum. Each segment is
cut into k pieces that stream through both phases: piece j moves on to step g+1 as soon as it
was reduced at step g, which keeps the add cache-hot and both neighbours busy.

Every receive is posted before the first send: reduce-scatter pieces land in a scratch buffer
at their own offsets (so none waits for a free slot), all-gather pieces straight in the tensor.
Symbols: n ranks, r this rank, g step, j piece, S bytes, e bytes per element.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from ..comm.arrays import irecv_array, isend_array
from ..comm.tags import Kind, tag
from .layout import RingLayout, pieces_for
from .ops import UFUNC, accumulate_dtype, numpy_dtype
from .plan import Plan, finisher

PIECE_BYTES = 4 * 2 ** 20   # pieces only pay when the working set leaves the 32 MiB L3; each
                            # piece is one more hand-off, which costs most on busy cores


@lru_cache(maxsize=64)
def piece_table(lay: RingLayout) -> tuple:
    """[segment][piece] -> (start, stop), computed once per layout."""
    return tuple(tuple(lay.piece(s, j) for j in range(lay.k)) for s in range(lay.n))


class RingPlan(Plan):
    """Ring steps first..last on a flat tensor: all-reduce 0..2n-3, reduce-scatter 0..n-2,
    all-gather n-1..2n-3. Half-precision inputs are accumulated in a float32 copy."""

    def __init__(self, world, t: torch.Tensor, op: str, first: int, last: int, piece_bytes: int | None = None):
        super().__init__(world, t)
        flat, n, r = self.flat, world.size, world.rank
        e, numel = flat.element_size(), flat.numel()
        self.op, self.first, self.last, self.ufunc = op, first, last, UFUNC[op]
        k = pieces_for(numel, n, e, piece_bytes or PIECE_BYTES)
        pieces, rs_last = piece_table(RingLayout(numel, n, k)), n - 2
        self.left, self.right = (r - 1) % n, (r + 1) % n
        self.peer_left, self.peer_right = world.world_rank_of(self.left), world.world_rank_of(self.right)
        fb = flat.view(torch.uint8).numpy()
        acc = tmp = None
        self.copy_in = False
        if first <= rs_last:
            acc_dtype = accumulate_dtype(flat.dtype)
            self.copy_in = acc_dtype != flat.dtype
            acc = self.scratch(numel, numpy_dtype(acc_dtype)) if self.copy_in else flat.numpy()
            tmp = self.scratch(numel, numpy_dtype(acc_dtype))
        self.acc = acc

        def wire(g, a, b):   # what travels at step g for elements a..b
            return (acc[a:b] if g <= rs_last else fb[a * e:b * e]) if b > a else None

        self.first_sends = [wire(first, *pieces[(r - first - 1) % n][j]) for j in range(k)]
        self.events = []     # in waiting order: (g, recv buffer, reduce pair, finish, send buffer)
        for g in range(first, last + 1):
            for j in range(k):
                a, b = pieces[(r - g - 2) % n][j]
                land = (tmp[a:b] if g <= rs_last else fb[a * e:b * e]) if b > a else None
                red = (acc[a:b], tmp[a:b]) if g <= rs_last and b > a else None
                fin = finisher(op, n, flat[a:b], acc[a:b], not self.copy_in) if g == rs_last and b > a else None
                onward = wire(g + 1, a, b) if g < last else None
                self.events.append((g, land, red, fin, onward, f"RING step {g} piece {j} from"))

    def steps(self, seq: int):
        w, left, right = self.world, self.left, self.right
        tags = [tag(Kind.RING, seq, g % 256) for g in range(self.last + 1)]
        if self.copy_in:
            torch.from_numpy(self.acc).copy_(self.flat)
        # All receives are posted now. Where an all-gather piece lands in a region we still send
        # from or reduce into (same dtype), what arrives is that region's final value, which
        # exists only after our send was received and our reduction passed on round the ring.
        recvs = [irecv_array(w, land, left, tags[g]) if land is not None else None
                 for g, land, _, _, _, _ in self.events]
        sends = [isend_array(w, buf, right, tags[self.first]) for buf in self.first_sends if buf is not None]
        ufunc = self.ufunc
        for req, (g, _, red, fin, onward, label) in zip(recvs, self.events):
            if req is not None:
                yield [req], label, self.peer_left
            if red is not None:
                ufunc(red[0], red[1], out=red[0])
            if fin is not None:
                fin()
            if onward is not None:
                sends.append(isend_array(w, onward, right, tags[g + 1]))
        if sends:
            yield sends, "RING sends to", self.peer_right
