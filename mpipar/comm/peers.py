"""Benchmark peers only: the blocking MPI_Allreduce (Open MPI's tuned component, often faster
than the non-blocking libnbc path behind World.allreduce_native). Training never calls this."""
from __future__ import annotations

import torch
from .mpi import MPI


def allreduce_blocking(world, t: torch.Tensor) -> torch.Tensor:
    """In-place blocking MPI_Allreduce(SUM) of a contiguous CPU tensor (not bf16)."""
    world.comm.Allreduce(MPI.IN_PLACE, t.numpy(), op=MPI.SUM)
    return t
