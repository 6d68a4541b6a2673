"""World: one MPI communicator with its rank, size, host and buffer policy.

Sub-communicators (pp/dp/tp) are Worlds too, made by `split`, and remember how their ranks map
to COMM_WORLD ranks so every message names the rank a user sees in mpirun's output.
"""
from __future__ import annotations

import socket

import numpy as np
import torch
from .mpi import MPI

from . import mpi, p2p
from .cuda import BufferPolicy, query_cuda_support
from .waits import BOARD

HOST_BYTES = 64


class World:
    def __init__(self, comm=None, name: str = "world", policy: BufferPolicy | None = None):
        if comm is None:
            mpi.start()
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.name = name
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.host = socket.gethostname()
        self.world_rank = MPI.COMM_WORLD.Get_rank()
        self.cuda_support = query_cuda_support(MPI) if policy is None else int(policy.cuda_aware)
        self.policy = policy or BufferPolicy(self.cuda_support == 1)
        group, wgroup = self.comm.Get_group(), MPI.COMM_WORLD.Get_group()
        self._to_world = MPI.Group.Translate_ranks(group, list(range(self.size)), wgroup)
        self.board = BOARD
        # what other layers keep per communicator (ring tag sequence, shared-memory arena,
        # host layout), declared here so that nothing is attached to a World from outside
        self.state: dict = {}

    @classmethod
    def alone(cls) -> "World":
        """This process by itself (MPI_COMM_SELF): a single-process reference inside a job."""
        mpi.start()
        return cls(MPI.COMM_SELF, name="self")

    # -- identity -------------------------------------------------------------------------
    def world_rank_of(self, rank: int) -> int:
        return self._to_world[rank] if 0 <= rank < self.size else rank

    @property
    def mpi_library(self) -> str:
        return MPI.Get_library_version().splitlines()[0].split(",")[0].strip()

    def hosts(self) -> list[str]:
        """Every rank's host name, in rank order (fixed-size bytes, no pickle)."""
        mine = np.zeros(HOST_BYTES, dtype=np.uint8)
        b = self.host.encode()[:HOST_BYTES]
        mine[:len(b)] = np.frombuffer(b, dtype=np.uint8)
        allh = np.zeros((self.size, HOST_BYTES), dtype=np.uint8)
        self.comm.Allgather(mine, allh)
        return [bytes(r).rstrip(b"\0").decode(errors="replace") for r in allh]

    def split(self, color: int, key: int, name: str) -> "World":
        return World(self.comm.Split(color, key), name=name, policy=self.policy)

    # -- point to point (see p2p.py) ------------------------------------------------------
    isend = p2p.isend
    send = p2p.send
    irecv = p2p.irecv
    recv = p2p.recv
    isend_raw = p2p.isend_raw
    irecv_raw = p2p.irecv_raw

    # -- collectives (native MPI; our own ring lives in data_parallel/) -------------------
    def barrier(self) -> None:
        BOARD.wait(self.comm.Ibarrier(), f"BARRIER on {self.name}", -1)

    def allreduce_native(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place MPI_Allreduce of a contiguous CPU tensor (the benchmark peer; not bf16)."""
        mop = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}[op]
        BOARD.wait(self.comm.Iallreduce(MPI.IN_PLACE, t.numpy(), op=mop), f"ALLREDUCE on {self.name}", -1)
        return t

    def bcast_(self, t: torch.Tensor, root: int = 0) -> torch.Tensor:
        """In-place broadcast of a contiguous tensor's bytes from `root`."""
        from .cuda import mpi_buffer
        BOARD.wait(self.comm.Ibcast(mpi_buffer(t), root=root), f"BCAST from", self.world_rank_of(root))
        return t

    def allgather_floats(self, values) -> np.ndarray:
        """[size, k] float64: everyone's k numbers (metrics, timings, parameter counts)."""
        mine = np.asarray(values, dtype=np.float64).reshape(-1)
        out = np.zeros((self.size, mine.size), dtype=np.float64)
        BOARD.wait(self.comm.Iallgather(mine, out), f"ALLGATHER on {self.name}", -1)
        return out

    def abort(self, code: int = 1) -> None:
        MPI.COMM_WORLD.Abort(code)


finalize = mpi.finalize
