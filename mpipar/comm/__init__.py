"""comm: the only package that calls mpi4py. Everything else talks to a World.

    mpi.py       the one import of mpi4py.MPI; MPI starts with the first World, not at import
    world.py     World: a communicator, its ranks and hosts, native collectives on it
    messages.py  tags, fixed-format headers, tensor and array sends and receives
    waits.py     the one waiting path (who waits for what from whom) and traffic counts
    failure.py   one-line aborts and the stall watchdog
    shared.py    shared-memory windows and which ranks share a host
    cuda.py      CUDA-aware MPI detection and the buffer policy
    devices.py   which GPU a rank takes, and staging device tensors through pinned host buffers
    ulfm.py      surviving a dead rank where the MPI library has ULFM
"""
from .messages import Kind, tag
from .world import World

__all__ = ["World", "Kind", "tag"]
