"""Errors users can act on: each one's message is a single line that says what to change."""
import shlex
import sys


class MpiparError(Exception):
    """Base of every error mpipar raises on purpose (as opposed to a bug)."""


class ConfigError(MpiparError):
    """Bad command line, rank map, grid or example name; detected before training starts."""


class RankMapError(ConfigError):
    """The layer -> stage partition or the pp x dp x tp grid is invalid."""

    @classmethod
    def ranks(cls, needs: str, ranks: int, have: int) -> "RankMapError":
        """`needs` (what needs `ranks` ranks) in a job of `have`. A job of one rank was most likely
        started with plain `python`: then the fix is the mpirun line that starts it right."""
        fix = (f"launch it with `mpirun -np {ranks} {shlex.join(sys.orig_argv)}`" if have == 1
               else "change -np or the grid")
        return cls(f"{needs}, but the job has {have}; {fix}")


class DataError(MpiparError):
    """A dataset is missing, incomplete or garbled."""


class ShapeError(MpiparError):
    """A tensor arrived with another shape or dtype than the receiver expected."""


class StallError(MpiparError):
    """A rank waited longer than --stall-timeout for a message."""
