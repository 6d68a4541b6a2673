"""How a flat buffer is cut for the ring: n segments (one per rank) and k pieces per segment.

Every rank computes the same cuts from (numel, n, k) alone, so sender and receiver always agree
on a message's size without a header, and empty pieces (numel < n·k) are skipped on both sides.
"""
from __future__ import annotations

from dataclasses import dataclass


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
