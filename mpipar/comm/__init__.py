"""comm: the only package that calls mpi4py. Everything else talks to a World.

Imports go down this list (a module imports only modules above it):

    mpi.py       the one import of mpi4py.MPI; MPI starts with the first World, not at import
    tags.py      message tags (kind, micro-batch, chunk) and how a tag reads in a stall report
    staging.py   device tensors staged through pinned host buffers, and the CUDA calls that needs
    cuda.py      CUDA-aware MPI detection and the buffer policy
    waits.py     the one waiting path (who waits for what from whom) and traffic counts
    messages.py  fixed-format headers, tensor and array sends and receives
    world.py     World: a communicator, its ranks and hosts, native collectives on it
    failure.py   one-line aborts and the stall watchdog
    shared.py    shared-memory windows and which ranks share a host
    devices.py   which GPU a rank takes (from the ranks that share its host)
    ulfm.py      surviving a dead rank where the MPI library has ULFM
"""
from .tags import Kind, tag
from .world import World

__all__ = ["World", "Kind", "tag"]
