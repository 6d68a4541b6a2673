"""CUDA-aware MPI detection and the buffer policy that follows from it.

mpi4py 4.1 has no query for CUDA awareness, so we ask the loaded libmpi for the
MPIX_Query_cuda_support() extension (Open MPI, MPICH); absent symbol means "not CUDA-aware".
With a CUDA-aware MPI, device tensors are handed to MPI as they are; otherwise they are
staged through a host copy. CPU tensors are always sent zero-copy.
"""
from __future__ import annotations

import ctypes

import torch

from .mpi import MPI
from .staging import OPS, PinnedPool
_mpi_buffer_type = MPI.buffer

_fromaddress = _mpi_buffer_type.fromaddress


def query_cuda_support(mpi_module) -> int:
    """1 if the MPI library says it is CUDA-aware at run time, else 0."""
    try:
        lib = ctypes.CDLL(mpi_module.__file__)
        fn = lib.MPIX_Query_cuda_support
    except (OSError, AttributeError):
        return 0
    fn.restype = ctypes.c_int
    try:
        return int(fn())
    except Exception:  # a broken extension must not stop training: fall back to staging
        return 0


class BufferPolicy:
    """Decides, per tensor, what MPI is given: the tensor itself or a host copy (`ops`: the CUDA
    calls staging makes, staging.CudaOps unless a test gives its FakeOps)."""

    def __init__(self, cuda_aware: bool, ops=None):
        self.cuda_aware = bool(cuda_aware)
        self.stand_in = ops is not None   # a test's fake device layer: CPU tensors may count as device ones
        self._ops, self._pool = ops, None

    @property
    def ops(self):
        if self._ops is None:
            self._ops = OPS
        return self._ops

    @property
    def pool(self):
        """Pinned host buffers for staging, reused per (shape, dtype)."""
        if self._pool is None:
            self._pool = PinnedPool(self.ops)
        return self._pool

    def staged_send(self, t: torch.Tensor) -> bool:
        """Does this tensor go through a pinned host copy (a device tensor, MPI not CUDA-aware)?"""
        if self.cuda_aware:
            return False
        return not t.is_cpu or (self.stand_in and self._ops.is_device(t))

    def staged_recv(self, device) -> bool:
        if self.cuda_aware:
            return False
        if self.stand_in and self._ops.is_device_name(device):
            return True
        return device != "cpu" and torch.device(device).type != "cpu"   # (a str "cpu": no torch.device made)

    def describe(self) -> str:
        if not torch.cuda.is_available():
            return "CPU tensors, zero-copy"
        return "CUDA-aware MPI: device buffers" if self.cuda_aware else "MPI not CUDA-aware: host staging"

    def needs_staging(self, t: torch.Tensor) -> bool:
        return t.device.type != "cpu" and not self.cuda_aware

    def ready_for_mpi(self, t: torch.Tensor) -> None:
        """A device tensor MPI will read itself (CUDA-aware): its producing stream finishes first."""
        if not t.is_cpu:
            self.ops.sync_producer(t)

    def to_wire(self, t: torch.Tensor) -> torch.Tensor:
        """A contiguous tensor MPI may read (the tensor itself when possible)."""
        if t.is_cpu and t.is_contiguous():   # the common case, on every message's path
            return t
        t = t.detach()
        if self.needs_staging(t):
            t = t.to("cpu")
        return t.contiguous()

    def recv_buffer(self, shape, dtype, device) -> torch.Tensor:
        """Where MPI writes an incoming tensor."""
        dev = torch.device(device)
        if dev.type != "cpu" and not self.cuda_aware:
            dev = torch.device("cpu")
        return torch.empty(shape, dtype=dtype, device=dev)

    def from_wire(self, t: torch.Tensor, device) -> torch.Tensor:
        if t.is_cpu and (device == "cpu" or device == _CPU):
            return t
        return t if t.device == torch.device(device) else t.to(device, non_blocking=False)


_CPU = torch.device("cpu")


def pinned_buffer(t: torch.Tensor):
    """Like mpi_buffer, but for CPU tensors a bare address + length (about 10x cheaper than
    the tensor -> numpy views). The buffer does NOT keep `t` alive: the caller must hold `t`
    until MPI is done with it (p2p handles do)."""
    if t.is_cpu:
        return _fromaddress(t.data_ptr(), t.numel() * t.element_size())
    return mpi_buffer(t)


def mpi_buffer(t: torch.Tensor):
    """The bytes of a contiguous tensor as an object mpi4py accepts, without copying.

    Every dtype (bfloat16 and bool included) travels as raw bytes, so MPI datatypes never
    limit what we can send.
    """
    flat = t.reshape(-1).view(torch.uint8)
    return flat.numpy() if flat.device.type == "cpu" else flat  # CUDA: __cuda_array_interface__
