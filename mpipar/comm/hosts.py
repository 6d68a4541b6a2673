"""Which ranks of a World share a host, and the communicators a hierarchical all-reduce needs.

A host is what MPI calls a node (COMM_TYPE_SHARED: ranks that can map each other's memory), not a
host name. Hosts are numbered by their lowest rank in the World. The hierarchical all-reduce
(data_parallel/hier.py) cuts a vector into R = max(ranks per host) slices; on a host with L ranks,
local rank l owns the slices j with j % L == l, and slice j crosses hosts on "rail" j: the World of
the ranks owning slice j, one per host, in host order. With equal rank counts per host rail j is
simply every host's local rank j, so every local rank drives the link at once, on its own slice.
Collective over the World the first time; cached on it (like shared.one_host).
"""
from __future__ import annotations

from dataclasses import dataclass

from .mpi import MPI
from .world import World


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
