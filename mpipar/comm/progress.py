"""Non-blocking completion checks, so an all-reduce started during backward can move on between
autograd hooks without ever blocking (blocking waits still go through BOARD)."""
from __future__ import annotations

from .mpi import MPI


def all_done(requests) -> bool:
    """True when every request has completed (completed requests are released); never blocks."""
    return bool(MPI.Request.Testall(requests)) if requests else True
