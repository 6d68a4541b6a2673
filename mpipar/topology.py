"""The grid made real: this rank's coordinates and its pp/dp/tp sub-communicators (Comm.Split)."""
from __future__ import annotations

from dataclasses import dataclass

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
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.grid.pp - 1

    @property
    def reporter(self) -> int:
        """The world rank whose numbers are the job's: last stage, first replica, first shard."""
        return self.grid.rank_of(self.grid.pp - 1, 0, 0)
