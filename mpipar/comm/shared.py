"""Memory that every rank of a one-host World can read and write: an MPI-3 shared window.

The one-host all-reduce (data_parallel/shm.py) reduces straight out of its peers' buffers
instead of messaging them: no per-message copies, no hand-offs to wait for, one barrier per
piece. Each buffer synchronises on its own duplicate of the World's communicator, so its
barriers can never pair with another collective's when several are in flight (gradient buckets).
"""
from __future__ import annotations

import torch
from .mpi import MPI

from .waits import BOARD


class SharedBuffer:
    """`nbytes` per rank, mapped into every rank of `world` (which must live on one host).
    Creating and freeing are collective over `world`."""

    def __init__(self, world, nbytes: int):
        self.world, self.nbytes = world, int(nbytes)
        self.comm = world.comm.Dup()
        self.win = MPI.Win.Allocate_shared(max(self.nbytes, 8), 1, comm=self.comm)
        self.win.Lock_all()   # one passive-target epoch for the buffer's life: Sync() orders memory
        self.segments = []
        for r in range(world.size):
            mem, _ = self.win.Shared_query(r)
            self.segments.append(torch.frombuffer(mem, dtype=torch.uint8, count=self.nbytes)
                                 if self.nbytes else torch.empty(0, dtype=torch.uint8))
        self.flip = 0          # which half a double-buffered user takes next (see shm.py)
        # The barrier: a zero-byte flag to and from every peer, as persistent requests (one
        # Startall, one wait, all peers at once: cheaper under oversubscription than
        # MPI_Ibarrier's rounds, each of which needs the progress engine to run on every rank).
        # Flags between a pair stay in order, so consecutive barriers cannot mix.
        self._flag = bytearray(1)
        peers = [p for p in range(world.size) if p != world.rank]
        self._sink = [bytearray(1) for _ in peers]
        self._barrier = ([self.comm.Send_init([self._flag, 0, MPI.BYTE], p, 1) for p in peers]
                         + [self.comm.Recv_init([b, 0, MPI.BYTE], p, 1) for b, p in zip(self._sink, peers)])

    def view(self, rank: int, offset: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """Rank `rank`'s bytes [offset, offset + numel * itemsize) as a tensor of `dtype`."""
        size = torch.empty(0, dtype=dtype).element_size()
        return self.segments[rank][offset:offset + numel * size].view(dtype)

    def ibarrier(self) -> list:
        """Publish this rank's stores, then start a barrier; returns its requests to wait for."""
        self.win.Sync()
        MPI.Prequest.Startall(self._barrier)
        return self._barrier

    def acquire(self) -> None:
        """After a barrier: see the other ranks' stores."""
        self.win.Sync()

    def wait_barrier(self, what: str) -> None:
        BOARD.waitall(self.ibarrier(), what, -1)
        self.acquire()

    def free(self) -> None:
        """Collective. The barrier first: no rank unmaps memory a peer may still be reading."""
        if self.win is not None:
            self.wait_barrier("SHM free")
            self.segments = []
            for req in self._barrier:
                req.Free()
            self.win.Unlock_all()
            self.win.Free()
            self.comm.Free()
            self.win = None


def one_host(world) -> bool:
    """True when MPI can give every rank of `world` memory in common (MPI's own notion of a
    node: COMM_TYPE_SHARED, not host names). Collective the first time; cached."""
    cached = world.state.get("one_host")
    if cached is None:
        node = world.comm.Split_type(MPI.COMM_TYPE_SHARED)
        cached = world.state["one_host"] = node.Get_size() == world.size
        node.Free()
    return cached
