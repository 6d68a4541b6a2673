"""comm: the only package that calls mpi4py. Everything else talks to a World."""
from .tags import Kind, tag
from .world import World

__all__ = ["World", "Kind", "tag"]
