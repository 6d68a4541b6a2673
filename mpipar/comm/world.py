"""World: one MPI communicator with its rank, size, host and buffer policy, and the native
collectives mpipar uses on it (metrics, broadcasts, tensor-parallel all-reduce and all-gather,
benchmark peers).

Sub-communicators (pp/dp/tp) are Worlds too, made by `split`, and remember how their ranks map
to COMM_WORLD ranks so every message names the rank a user sees in mpirun's output."""
from __future__ import annotations

import socket

import numpy as np
import torch

from . import messages, mpi
from .cuda import BufferPolicy, mpi_buffer, query_cuda_support
from .mpi import MPI
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

    def split(self, color: int | None, key: int, name: str) -> "World | None":
        """Collective: the ranks of each color in a World of their own (color None: in none)."""
        comm = self.comm.Split(MPI.UNDEFINED if color is None else color, key)
        return None if comm == MPI.COMM_NULL else World(comm, name=name, policy=self.policy)

    # -- point to point (see messages.py) ---------------------------------------------------
    isend = messages.isend
    send = messages.send
    irecv = messages.irecv
    recv = messages.recv
    isend_tuple = messages.isend_tuple
    irecv_tuple = messages.irecv_tuple
    isend_raw = messages.isend_raw
    irecv_raw = messages.irecv_raw

    # -- collectives (native MPI; our own ring lives in data_parallel/) -------------------
    def barrier(self) -> None:
        BOARD.wait(self.comm.Ibarrier(), f"BARRIER on {self.name}", -1)

    def allreduce_native(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place MPI_Allreduce of a contiguous CPU tensor (the benchmark peer; not bf16)."""
        mop = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}[op]
        BOARD.wait(self.comm.Iallreduce(MPI.IN_PLACE, t.numpy(), op=mop), f"ALLREDUCE on {self.name}", -1)
        return t

    def bcast_(self, t: torch.Tensor, root: int = 0) -> torch.Tensor:
        """In-place broadcast of a contiguous tensor's bytes from `root` (a device tensor through a
        host copy unless MPI is CUDA-aware)."""
        wire = self.policy.to_wire(t)
        self.policy.ready_for_mpi(wire)
        BOARD.wait(self.comm.Ibcast(mpi_buffer(wire), root=root), "BCAST from", self.world_rank_of(root))
        if wire is not t:
            t.copy_(wire)
        return t

    def allgather_floats(self, values) -> np.ndarray:
        """[size, k] float64: everyone's k numbers (metrics, timings, parameter counts)."""
        mine = np.asarray(values, dtype=np.float64).reshape(-1)
        out = np.zeros((self.size, mine.size), dtype=np.float64)
        BOARD.wait(self.comm.Iallgather(mine, out), f"ALLGATHER on {self.name}", -1)
        return out

    def alltoallv(self, sends: list[torch.Tensor]) -> list[torch.Tensor]:
        """Personalised exchange: `sends[p]` (1-D, contiguous, CPU, one dtype for all) goes to
        rank p; returns what each rank sent here, by rank. Counts travel first (MPI_Alltoall),
        then the data (MPI_Alltoallv)."""
        dtype = sends[0].dtype
        counts = np.array([len(t) for t in sends], dtype=np.int64)
        theirs = np.zeros(self.size, dtype=np.int64)
        BOARD.wait(self.comm.Ialltoall(counts, theirs), f"ALLTOALL counts on {self.name}", -1)
        out = torch.empty(int(theirs.sum()), dtype=dtype)
        send = torch.cat(sends) if sends else torch.empty(0, dtype=dtype)
        sdisp = np.concatenate([[0], np.cumsum(counts)[:-1]])
        rdisp = np.concatenate([[0], np.cumsum(theirs)[:-1]])
        BOARD.wait(self.comm.Ialltoallv([send.numpy(), (counts, sdisp)], [out.numpy(), (theirs, rdisp)]),
                   f"ALLTOALLV on {self.name}", -1)
        BOARD.sent(int(send.numel() * send.element_size()))
        return list(out.split(theirs.tolist()))

    def abort(self, code: int = 1) -> None:
        MPI.COMM_WORLD.Abort(code)


finalize = mpi.finalize


# -------------------------------------------------------------------------------------------------
# Out-of-place native collectives for tensor parallelism: the input stays untouched (autograd
# may still need it) and the result is a new tensor. Every wait goes through BOARD.
# -------------------------------------------------------------------------------------------------
REDUCIBLE = (torch.float32, torch.float64)


def _typed(t: torch.Tensor):
    """A typed view MPI can reduce: numpy on CPU, the tensor itself (CUDA array interface) on GPU."""
    return t.numpy() if t.device.type == "cpu" else t


def allreduce_sum(world, t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over every rank of `world`, as a new tensor (MPI_Iallreduce, out of place)."""
    if t.dtype not in REDUCIBLE:
        raise TypeError(f"allreduce_sum supports float32/float64 tensors, not {t.dtype}")
    src = world.policy.to_wire(t)
    world.policy.ready_for_mpi(src)
    out = torch.empty_like(src)
    BOARD.wait(world.comm.Iallreduce(_typed(src), _typed(out), op=MPI.SUM),
               f"ALLREDUCE on {world.name}", -1)
    return world.policy.from_wire(out, t.device)


def allgather(world, t: torch.Tensor) -> torch.Tensor:
    """Every rank's `t` stacked in rank order: shape [world.size, *t.shape] (raw bytes, any dtype)."""
    src = world.policy.to_wire(t)
    world.policy.ready_for_mpi(src)
    out = torch.empty((world.size, *src.shape), dtype=src.dtype, device=src.device)
    BOARD.wait(world.comm.Iallgather(mpi_buffer(src), mpi_buffer(out)),
               f"ALLGATHER on {world.name}", -1)
    return world.policy.from_wire(out, t.device)


# -------------------------------------------------------------------------------------------------
# Benchmark peers only: the blocking MPI_Allreduce (Open MPI's tuned component, often faster
# than the non-blocking libnbc path behind World.allreduce_native). Training never calls this.
# -------------------------------------------------------------------------------------------------
def allreduce_blocking(world, t: torch.Tensor) -> torch.Tensor:
    """In-place blocking MPI_Allreduce(SUM) of a contiguous CPU tensor (not bf16)."""
    world.comm.Allreduce(MPI.IN_PLACE, t.numpy(), op=MPI.SUM)
    return t


# -------------------------------------------------------------------------------------------------
# Is a message still waiting to be received? Asked when a protocol has ended, to prove that it
# left nothing in flight (ANY_SOURCE is fine here: we only look, we never receive).
# -------------------------------------------------------------------------------------------------
def pending_message(world) -> tuple[int, int] | None:
    """(world rank of the sender, tag) of a message that arrived and was never received, or None."""
    status = MPI.Status()
    if world.comm.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status):
        return world.world_rank_of(status.Get_source()), status.Get_tag()
    return None
