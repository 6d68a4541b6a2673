"""The message-passing all-reduces: the pipelined ring (reduce-scatter + all-gather, 2(n-1)/n·S
bytes per rank), recursive doubling and halving-doubling (Rabenseifner) for latency-bound sizes."""
from __future__ import annotations

from functools import lru_cache
import torch

from ..comm.messages import irecv_array, isend_array
from ..comm.tags import Kind, tag
from .plan import UFUNC, Plan, RingLayout, accumulate_dtype, finisher, numpy_dtype, pieces_for, split_bounds


# -------------------------------------------------------------------------------------------------
# The pipelined ring: reduce-scatter (steps 0..n-2) then all-gather (steps n-1..2n-3).
#
# At step g rank r sends segment r-g-1 to r+1 and receives segment r-g-2 from r-1 (plan.py), so
# the segment received at step g is the one passed on at step g+1, after step n-2 rank r owns the
# reduced segment r, and each rank sends 2(n-1)/n·S bytes, the bandwidth optimum. Each segment is
# cut into k pieces that stream through both phases: piece j moves on to step g+1 as soon as it
# was reduced at step g, which keeps the add cache-hot and both neighbours busy.
#
# Every receive is posted before the first send: reduce-scatter pieces land in a scratch buffer
# at their own offsets (so none waits for a free slot), all-gather pieces straight in the tensor.
# Symbols: n ranks, r this rank, g step, j piece, S bytes, e bytes per element.
# -------------------------------------------------------------------------------------------------
PIECE_BYTES = 4 * 2 ** 20   # pieces only pay when the working set leaves the 32 MiB L3; each
                            # piece is one more hand-off, which costs most on busy cores
# Across hosts a piece must go out eagerly. A message above the transport's eager limit (Open MPI's
# TCP: 64 KiB with its header) waits for a rendezvous handshake, and that handshake queues behind
# whatever fills the reverse direction of the link: on a 1 Gbit/s link with a 50 ms queue a 2-rank
# ring of 16 MiB took 189 ms in 1 MiB pieces, 197 ms in 64 KiB ones, and 140 ms in 32 KiB ones
# (the link's limit is 134 ms; medians of 5 on the emulated hosts of `python -m mpipar.bench
# allreduce-hosts`). Small eager pieces keep the link streaming whatever the phase of the ring.
WIRE_PIECE_BYTES = 32 * 1024
WIRE_MAX_PIECES = 4096


@lru_cache(maxsize=64)
def piece_table(lay: RingLayout) -> tuple:
    """[segment][piece] -> (start, stop), computed once per layout."""
    return tuple(tuple(lay.piece(s, j) for j in range(lay.k)) for s in range(lay.n))


class RingPlan(Plan):
    """Ring steps first..last on a flat tensor: all-reduce 0..2n-3, reduce-scatter 0..n-2,
    all-gather n-1..2n-3. Half-precision inputs are accumulated in a float32 copy.
    across=True (the ring spans hosts): pieces small enough to go out eagerly."""

    def __init__(self, world, t: torch.Tensor, op: str, first: int, last: int, piece_bytes: int | None = None,
                 across: bool = False):
        super().__init__(world, t)
        flat, n, r = self.flat, world.size, world.rank
        e, numel = flat.element_size(), flat.numel()
        self.op, self.first, self.last, self.ufunc = op, first, last, UFUNC[op]
        if across:   # the ranks span hosts: eager pieces (see WIRE_PIECE_BYTES)
            k = pieces_for(numel, n, e, piece_bytes or WIRE_PIECE_BYTES, WIRE_MAX_PIECES)
        else:
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
        self.first_ranges = pieces[(r - first - 1) % n]
        s0, s1 = RingLayout(numel, n).segment(r - first - 1)
        self.rest = [(a, b) for a, b in ((0, s0), (s1, numel)) if b > a]
        self.prepare = None  # optional fill(a, b) of acc[a:b] just before its first use, so a
                             # caller's own reduction (the hierarchical one) overlaps the link
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
        if self.prepare is None:
            sends = [isend_array(w, buf, right, tags[self.first]) for buf in self.first_sends if buf is not None]
        else:            # each first piece leaves as soon as it is filled; the rest is filled after
            sends = []
            for (a, b), buf in zip(self.first_ranges, self.first_sends):
                if buf is not None:
                    self.prepare(a, b)
                    sends.append(isend_array(w, buf, right, tags[self.first]))
            for a, b in self.rest:
                self.prepare(a, b)
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


# -------------------------------------------------------------------------------------------------
# All-reduce by exchanging with partners at distance 1, 2, 4, ...: for sizes where the ring's
# 2(n-1) hand-offs cost more in latency than its bandwidth optimum saves.
#
# doubling (small sizes): log2(n) rounds, each swapping the whole vector and adding.
# halving (medium sizes, Rabenseifner): recursive halving reduce-scatter (each round swaps half of
# what is left) then recursive doubling all-gather: 2·log2(n) rounds moving the ring's
# 2(n-1)/n·S bytes.
#
# n not a power of two (p = largest power of two <= n, e = n - p): each even rank r < 2e first
# hands its vector to r+1 and sits out; at the end it gets the result back. Every element's final
# value is computed once (halving) or symmetrically (a+b on one side, b+a on the other: the same
# bits, doubling), so all ranks end bit-identical, as data parallelism needs.
# -------------------------------------------------------------------------------------------------
FOLD, RETURN, GATHER = 254, 255, 64   # tag chunks: fold-in, hand-back, all-gather rounds (64+)


class _Exchanges(Plan):
    """What both algorithms share: the working vector, the fold of extra ranks, partners."""

    def __init__(self, world, t: torch.Tensor, op: str):
        super().__init__(world, t)
        flat, n, r = self.flat, world.size, world.rank
        self.op, self.ufunc = op, UFUNC[op]
        self.p = 1 << (n.bit_length() - 1)
        self.extra = n - self.p
        acc = accumulate_dtype(flat.dtype)
        self.copy_in = acc != flat.dtype
        self.work = self.scratch(flat.numel(), numpy_dtype(acc)) if self.copy_in else flat.numpy()
        self.other = self.scratch(flat.numel(), numpy_dtype(acc))
        self.fb = flat.view(torch.uint8).numpy()
        sitter = r < 2 * self.extra
        self.role = ("sit" if r % 2 == 0 else "fold") if sitter else "plain"
        self.index = None if self.role == "sit" else (r // 2 if sitter else r - self.extra)

    def rank_of(self, index: int) -> int:
        return index * 2 + 1 if index < self.extra else index + self.extra

    def fold_in(self, seq: int):
        """Sitters hand their vector over; their partners add it in."""
        w, r = self.world, self.world.rank
        if self.copy_in:
            torch.from_numpy(self.work).copy_(self.flat)
        if self.role == "sit":
            yield [isend_array(w, self.work, r + 1, tag(Kind.RING, seq, FOLD))], "RING fold to", w.world_rank_of(r + 1)
        elif self.role == "fold":
            yield [irecv_array(w, self.other, r - 1, tag(Kind.RING, seq, FOLD))], "RING fold from", w.world_rank_of(r - 1)
            self.ufunc(self.work, self.other, out=self.work)

    def fold_out(self, seq: int):
        """Sitters get the finished vector (raw bytes) back."""
        w, r = self.world, self.world.rank
        if self.role == "sit":
            yield [irecv_array(w, self.fb, r + 1, tag(Kind.RING, seq, RETURN))], "RING result from", w.world_rank_of(r + 1)
        elif self.role == "fold":
            yield [isend_array(w, self.fb, r - 1, tag(Kind.RING, seq, RETURN))], "RING result to", w.world_rank_of(r - 1)


class DoublingPlan(_Exchanges):
    def __init__(self, world, t: torch.Tensor, op: str):
        super().__init__(world, t, op)
        self.partners = []
        if self.index is not None:
            bit = 1
            while bit < self.p:
                partner = self.rank_of(self.index ^ bit)
                self.partners.append((partner, world.world_rank_of(partner), f"RING doubling round {len(self.partners)} with"))
                bit <<= 1
        self.finish = finisher(op, world.size, self.flat, self.work, not self.copy_in)

    def steps(self, seq: int):
        w, work, other, ufunc = self.world, self.work, self.other, self.ufunc
        yield from self.fold_in(seq)
        if self.index is not None:
            for round_, (partner, peer, label) in enumerate(self.partners):
                t = tag(Kind.RING, seq, round_)
                yield [irecv_array(w, other, partner, t), isend_array(w, work, partner, t)], label, peer
                ufunc(work, other, out=work)
            if self.finish is not None:
                self.finish()
        yield from self.fold_out(seq)


class HalvingPlan(_Exchanges):
    def __init__(self, world, t: torch.Tensor, op: str):
        super().__init__(world, t, op)
        numel, e, p = self.flat.numel(), self.flat.element_size(), self.p
        blocks = [split_bounds(numel, p, i) for i in range(p)]
        work, other, fb = self.work, self.other, self.fb

        def span(lo, hi):   # elements of blocks lo..hi-1
            return blocks[lo][0], blocks[hi - 1][1]
        self.halving, self.gathering, self.finish = [], [], None
        if self.index is None:
            return
        lo, hi, d = 0, p, p >> 1
        while d:                                   # reduce-scatter: keep half, send half
            partner, mid = self.rank_of(self.index ^ d), (lo + hi) // 2
            keep, give = ((mid, hi), (lo, mid)) if self.index & d else ((lo, mid), (mid, hi))
            (ka, kb), (ga, gb) = span(*keep), span(*give)
            self.halving.append((partner, world.world_rank_of(partner), other[:kb - ka], work[ga:gb],
                                 work[ka:kb], f"RING halving round {len(self.halving)} with"))
            (lo, hi), d = keep, d >> 1
        a, b = span(lo, hi)
        self.finish = finisher(op, world.size, self.flat[a:b], work[a:b], not self.copy_in)
        d = 1
        while d < p:                               # all-gather: swap what each has, doubling
            partner, width = self.rank_of(self.index ^ d), hi - lo
            plo, phi = (lo - width, lo) if self.index & d else (hi, hi + width)
            (ma, mb), (pa, pb) = span(lo, hi), span(plo, phi)
            self.gathering.append((partner, world.world_rank_of(partner), fb[pa * e:pb * e], fb[ma * e:mb * e],
                                   f"RING gather round {len(self.gathering)} with"))
            lo, hi, d = min(lo, plo), max(hi, phi), d << 1

    def steps(self, seq: int):
        w, ufunc = self.world, self.ufunc
        yield from self.fold_in(seq)
        if self.index is not None:
            for round_, (partner, peer, land, give, keep, label) in enumerate(self.halving):
                t = tag(Kind.RING, seq, round_)
                yield [irecv_array(w, land, partner, t), isend_array(w, give, partner, t)], label, peer
                ufunc(keep, land, out=keep)
            if self.finish is not None:
                self.finish()
            for round_, (partner, peer, land, mine, label) in enumerate(self.gathering):
                t = tag(Kind.RING, seq, GATHER + round_)
                yield [irecv_array(w, land, partner, t), isend_array(w, mine, partner, t)], label, peer
        yield from self.fold_out(seq)
