"""Memory that every rank of a one-host World can read and write: an MPI-3 shared window.

The one-host all-reduce (data_parallel/shm.py) reduces straight out of its peers' buffers
instead of messaging them: no per-message copies, no hand-offs to wait for, one barrier per
piece. Each buffer synchronises on its own duplicate of the World's communicator, so its
barriers can never pair with another collective's when several are in flight (gradient buckets).

Also: which ranks of a World share a host, and the per-host and cross-host Worlds the
hierarchical all-reduce needs (host_layout)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from . import mpi
from .mpi import MPI
from .waits import BOARD
from .world import World


_LIVE: dict = {}   # buffers not freed yet, in creation order (the same on every rank)


def _free_live() -> None:
    """At exit, before MPI_Finalize: MPICH's libfabric netmod cannot close while a window is
    still open ("fabricclose failed: Device or resource busy")."""
    for buf in list(_LIVE.values()):
        buf.free()


mpi.at_finalize(_free_live)


class SharedBuffer:
    """`nbytes` per rank, mapped into every rank of `world` (which must live on one host).
    Creating and freeing are collective over `world`."""

    def __init__(self, world, nbytes: int):
        self.world, self.nbytes = world, int(nbytes)
        _LIVE[id(self)] = self
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
            _LIVE.pop(id(self), None)


def one_host(world) -> bool:
    """True when MPI can give every rank of `world` memory in common (MPI's own notion of a
    node: COMM_TYPE_SHARED, not host names). Collective the first time; cached."""
    cached = world.state.get("one_host")
    if cached is None:
        node = world.comm.Split_type(MPI.COMM_TYPE_SHARED)
        cached = world.state["one_host"] = node.Get_size() == world.size
        node.Free()
    return cached


# -------------------------------------------------------------------------------------------------
# Which ranks of a World share a host, and the communicators a hierarchical all-reduce needs.
#
# A host is what MPI calls a node (COMM_TYPE_SHARED: ranks that can map each other's memory), not a
# host name. Hosts are numbered by their lowest rank in the World. The hierarchical all-reduce
# (data_parallel/hier.py) cuts a vector into R = max(ranks per host) slices; on a host with L ranks,
# local rank l owns the slices j with j % L == l, and slice j crosses hosts on "rail" j: the World of
# the ranks owning slice j, one per host, in host order. With equal rank counts per host rail j is
# simply every host's local rank j, so every local rank drives the link at once, on its own slice.
# Collective over the World the first time; cached on it (like shared.one_host).
# -------------------------------------------------------------------------------------------------
@dataclass
class HostLayout:
    host_of: list[int]      # World rank -> host index
    local_of: list[int]     # World rank -> rank among its host's ranks
    sizes: list[int]        # ranks per host, by host index
    node: World             # this rank's host (a World of its host's ranks, local rank order)
    rails: dict             # slice index j -> rail World, for the slices this rank owns

    @property
    def hosts(self) -> int:
        return len(self.sizes)

    @property
    def slices(self) -> int:
        """R: slices per vector (the most ranks any host has)."""
        return max(self.sizes)

    def owned(self, rank: int) -> list[int]:
        """Slices owned by World rank `rank` (j % L == local rank on a host of L ranks)."""
        size = self.sizes[self.host_of[rank]]
        return [j for j in range(self.slices) if j % size == self.local_of[rank]]

    @cached_property
    def members(self) -> list[list[int]]:
        """World ranks of each host, in local-rank order (the node split keys on World rank)."""
        out = [[] for _ in self.sizes]
        for q, h in enumerate(self.host_of):
            out[h].append(q)
        return out

    def owner_local(self, host: int, j: int) -> int:
        """Local rank owning slice j on host `host`."""
        return j % self.sizes[host]

    def describe(self) -> str:
        return "+".join(str(s) for s in self.sizes)


def host_layout(world) -> HostLayout:
    """The rank -> host layout of `world`, with its node World and rail Worlds (collective and
    cached: every rank of `world` must ask, in the same order as its other collectives)."""
    cached = world.state.get("host_layout")
    if cached is not None:
        return cached
    node_comm = world.comm.Split_type(MPI.COMM_TYPE_SHARED, key=world.rank)
    node = World(node_comm, name=f"{world.name}/host", policy=world.policy)
    leader = MPI.Group.Translate_ranks(node_comm.Get_group(), [0], world.comm.Get_group())[0]
    both = world.allgather_floats([leader, node.rank]).astype(int)
    leaders = sorted(set(both[:, 0].tolist()))
    host_of = [leaders.index(int(v)) for v in both[:, 0]]
    local_of = [int(v) for v in both[:, 1]]
    sizes = [host_of.count(h) for h in range(len(leaders))]
    layout = HostLayout(host_of, local_of, sizes, node, {})
    mine = set(layout.owned(world.rank))
    # one Split per slice (every rank takes part in each, members by colour): rails may share a
    # rank (a host with fewer ranks than R), so they cannot come from a single Split
    for j in range(layout.slices):
        color = 0 if j in mine else MPI.UNDEFINED
        comm = world.comm.Split(color, host_of[world.rank])
        if j in mine:
            layout.rails[j] = World(comm, name=f"{world.name}/rail{j}", policy=world.policy)
    world.state["host_layout"] = layout
    return layout
