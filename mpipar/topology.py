"""The grid made real: this rank's coordinates and its pp/dp/tp sub-communicators (Comm.Split),
and `init`, which starts everything a rank needs before it trains."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .comm import World
from .rankmap import Grid


@dataclass
class Topology:
    world: World
    grid: Grid
    pp_rank: int
    dp_rank: int
    tp_rank: int
    pp_world: World   # same (dp, tp): the stages of one pipeline
    dp_world: World   # same (pp, tp): the replicas of one stage
    tp_world: World   # same (pp, dp): the shards of one layer

    @classmethod
    def build(cls, world: World, grid: Grid) -> "Topology":
        pp, dp, tp = grid.coords(world.rank)
        return cls(world, grid, pp, dp, tp,
                   pp_world=world.split(dp * grid.tp + tp, pp, "pp"),
                   dp_world=world.split(pp * grid.tp + tp, dp, "dp"),
                   tp_world=world.split(pp * grid.dp + dp, tp, "tp"))

    @property
    def rank(self) -> int:
        return self.world.rank

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.grid.pp - 1

    @property
    def reporter(self) -> int:
        """The world rank whose numbers are the job's: last stage, first replica, first shard."""
        return self.grid.rank_of(self.grid.pp - 1, 0, 0)


def threads_per_rank(hosts: list[str], host: str) -> int:
    """Share this host's cores among the ranks on it (oversubscription otherwise thrashes)."""
    return max(1, (os.cpu_count() or 1) // max(1, hosts.count(host)))


def share_cores(world: World, hosts: list[str], wait: str = "auto") -> None:
    """Torch threads = this host's cores / its ranks; `wait`: how ranks wait for messages
    (poll: test + sleep, freeing the core; spin: in MPI; auto: poll when oversubscribed)."""
    torch.set_num_threads(threads_per_rank(hosts, world.host))
    if wait not in ("auto", "spin", "poll"):
        from .errors import ConfigError
        raise ConfigError(f"wait={wait!r}: auto, spin or poll")
    if wait == "poll" or (wait == "auto" and hosts.count(world.host) > (os.cpu_count() or 1)):
        world.board.use_polling(2e-4)   # oversubscribed: sleep between tests instead of spinning in MPI_Wait


def init(grid: Grid | str | None = None, *, stall_timeout: float = 120.0, wait: str = "auto",
         world: World | None = None, debug: bool = False) -> Topology:
    """Start MPI (unless running), make any rank's uncaught exception end the whole job with one
    line naming the rank and the caller's file:line where it started (`debug`: the traceback
    too), start the stall watchdog (`stall_timeout` s; 0: off), share the host's cores among its
    ranks, and split the ranks into the grid: 'pp=2,dp=2,tp=1', 'dp' (every rank a replica), a
    Grid, or None (every rank a pipeline stage)."""
    from .comm import failure
    world = world or World()
    failure.install(world.host, debug=debug)
    if stall_timeout:
        failure.start_watchdog(stall_timeout, world.host)
    share_cores(world, world.hosts(), wait)
    g = grid if isinstance(grid, Grid) else Grid.parse(grid, world.size)
    if g.size != world.size:
        from .errors import RankMapError
        raise RankMapError.ranks(f"grid pp={g.pp} dp={g.dp} tp={g.tp} needs {g.size} ranks", g.size, world.size)
    return Topology.build(world, g)
