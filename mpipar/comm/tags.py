"""Message tags: the one place they are derived, so no two call sites can collide, and how a tag
reads in a stall report. Below both messages.py (which sends with them) and waits.py (whose
stall reports name them).

A tag packs (kind, chunk, microbatch): kind in 7 bits, chunk in 8, microbatch in 16.
Micro-batch numbers wrap at 65536; MPI keeps messages with equal tags between one pair of
ranks in order, so wrapping is safe while fewer than 65536 are in flight."""
from __future__ import annotations

from enum import IntEnum


class Kind(IntEnum):
    ACT = 1        # activation, stage i -> i+1
    GRAD = 2       # gradient w.r.t. an activation, stage i+1 -> i
    RING = 3       # ring all-reduce / all-gather chunks
    METRIC = 4     # metrics gathered to rank 0
    PARAM = 5      # parameters (broadcast, parameter server pulls)
    PUSH = 6       # gradient pushes to a parameter server
    CTRL = 7       # control messages (shutdown, staleness tokens)
    TEST = 8       # tests and benchmarks


def tag(kind: Kind, microbatch: int = 0, chunk: int = 0) -> int:
    if not 0 <= chunk < 256:
        raise ValueError(f"chunk {chunk} out of range 0..255")
    return (int(kind) << 24) | (chunk << 16) | (microbatch & 0xFFFF)


def untag(t: int) -> tuple[Kind, int, int]:
    """(kind, microbatch mod 65536, chunk): used by stall reports."""
    return Kind(t >> 24), t & 0xFFFF, (t >> 16) & 0xFF


def label(t: int) -> str:
    """'ACT mb=7 chunk=0' — how a tag reads in a stall report."""
    try:
        kind, mb, chunk = untag(t)
    except ValueError:
        return f"tag {t}"
    return f"{kind.name} mb={mb}" + (f" chunk={chunk}" if chunk else "")
