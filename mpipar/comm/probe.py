"""Is a message still waiting to be received? Asked when a protocol has ended, to prove that it
left nothing in flight (ANY_SOURCE is fine here: we only look, we never receive)."""
from __future__ import annotations

from .mpi import MPI


def pending_message(world) -> tuple[int, int] | None:
    """(world rank of the sender, tag) of a message that arrived and was never received, or None."""
    status = MPI.Status()
    if world.comm.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status):
        return world.world_rank_of(status.Get_source()), status.Get_tag()
    return None
