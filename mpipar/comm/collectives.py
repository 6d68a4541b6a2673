"""Out-of-place native collectives for tensor parallelism: the input stays untouched (autograd
may still need it) and the result is a new tensor. Every wait goes through BOARD."""
from __future__ import annotations

import torch
from .mpi import MPI

from .cuda import mpi_buffer
from .waits import BOARD

REDUCIBLE = (torch.float32, torch.float64)


def _typed(t: torch.Tensor):
    """A typed view MPI can reduce: numpy on CPU, the tensor itself (CUDA array interface) on GPU."""
    return t.numpy() if t.device.type == "cpu" else t


def allreduce_sum(world, t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over every rank of `world`, as a new tensor (MPI_Iallreduce, out of place)."""
    if t.dtype not in REDUCIBLE:
        raise TypeError(f"allreduce_sum supports float32/float64 tensors, not {t.dtype}")
    src = world.policy.to_wire(t)
    out = torch.empty_like(src)
    BOARD.wait(world.comm.Iallreduce(_typed(src), _typed(out), op=MPI.SUM),
               f"ALLREDUCE on {world.name}", -1)
    return world.policy.from_wire(out, t.device)


def allgather(world, t: torch.Tensor) -> torch.Tensor:
    """Every rank's `t` stacked in rank order: shape [world.size, *t.shape] (raw bytes, any dtype)."""
    src = world.policy.to_wire(t)
    out = torch.empty((world.size, *src.shape), dtype=src.dtype, device=src.device)
    BOARD.wait(world.comm.Iallgather(mpi_buffer(src), mpi_buffer(out)),
               f"ALLGATHER on {world.name}", -1)
    return world.policy.from_wire(out, t.device)
