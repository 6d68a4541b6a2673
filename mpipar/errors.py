"""Errors users can act on: each one's message is a single line that says what to change."""


class MpiparError(Exception):
    """Base of every error mpipar raises on purpose (as opposed to a bug)."""


class ConfigError(MpiparError):
    """Bad command line, rank map, grid or example name; detected before training starts."""


class RankMapError(ConfigError):
    """The layer -> stage partition or the pp x dp x tp grid is invalid."""


class DataError(MpiparError):
    """A dataset is missing, incomplete or garbled."""


class ShapeError(MpiparError):
    """A tensor arrived with another shape or dtype than the receiver expected."""


class StallError(MpiparError):
    """A rank waited longer than --stall-timeout for a message."""
