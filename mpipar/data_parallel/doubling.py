"""All-reduce by exchanging with partners at distance 1, 2, 4, ...: for sizes where the ring's
2(n-1) hand-offs cost more in latency than its bandwidth optimum saves.

doubling (small sizes): log2(n) rounds, each swapping the whole vector and adding.
halving (medium sizes, Rabenseifner): recursive halving reduce-scatter (each round swaps half of
what is left) then recursive doubling all-gather: 2·log2(n) rounds moving the ring's
2(n-1)/n·S bytes.

n not a power of two (p = largest power of two <= n, e = n - p): each even rank r < 2e first
hands its vector to r+1 and sits out; at the end it gets the result back. Every element's final
value is computed once (halving) or symmetrically (a+b on one side, b+a on the other: the same
bits, doubling), so all ranks end bit-identical, as data parallelism needs.
"""
from __future__ import annotations

import torch

from ..comm.arrays import irecv_array, isend_array
from ..comm.tags import Kind, tag
from .layout import split_bounds
from .ops import UFUNC, accumulate_dtype, numpy_dtype
from .plan import Plan, finisher

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
