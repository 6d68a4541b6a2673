"""Which device a rank trains on: `--device auto|cpu|cuda`. A rank takes GPU `local rank % GPUs on
its host`, the local rank coming from MPI's own notion of a host (COMM_TYPE_SHARED, shared.py),
not from launcher variables (OMPI_COMM_WORLD_LOCAL_RANK, MPI_LOCALRANKID, SLURM_LOCALID differ per
launcher).

How device tensors then reach MPI (CUDA-aware, or staged through pinned host buffers) is
staging.py's and cuda.py's.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from .shared import host_layout

CHOICES = ("auto", "cpu", "cuda")


def local_rank(world) -> tuple[int, int]:
    """(this rank's index among the ranks on its host, ranks on its host), from MPI's shared-memory
    split (collective over `world`; cached)."""
    layout = host_layout(world)
    return layout.local_of[world.rank], layout.sizes[layout.host_of[world.rank]]


def pick(choice: str, local: int, cuda=torch.cuda) -> torch.device:
    """The device for `--device choice` on a rank with local rank `local` (`cuda`: torch.cuda, or
    a stand-in with is_available() and device_count())."""
    if choice not in CHOICES:
        raise ConfigError(f"--device {choice}: choose one of {', '.join(CHOICES)}")
    available = bool(cuda.is_available()) and cuda.device_count() > 0
    if choice == "cpu" or (choice == "auto" and not available):
        return torch.device("cpu")
    if not available:
        raise ConfigError("--device cuda: this machine has no usable CUDA device (torch.cuda.is_available() is "
                          f"False, torch {torch.__version__}); use --device cpu or --device auto")
    return torch.device("cuda", local % cuda.device_count())


def choose(choice: str, world, cuda=torch.cuda) -> torch.device:
    """pick() for this rank of `world`, made the current CUDA device when it is one (collective)."""
    if choice not in CHOICES:
        raise ConfigError(f"--device {choice}: choose one of {', '.join(CHOICES)}")
    local, _ = local_rank(world) if choice != "cpu" else (0, 1)
    device = pick(choice, local, cuda)
    if device.type == "cuda":
        cuda.set_device(device)
    return device


def describe(device: torch.device, world, policy) -> str:
    """'cuda:0 (local rank 1 of 2 on this host); transfers: ...' for the banner."""
    if device.type != "cuda":
        return "cpu"
    local, on_host = local_rank(world)
    how = ("CUDA-aware MPI, device buffers" if policy.cuda_aware
           else "staged through pinned host buffers, copies on a side stream")
    return f"{device} (local rank {local} of {on_host} on this host); transfers: {how}"
