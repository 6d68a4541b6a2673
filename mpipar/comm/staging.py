"""Staging device tensors through page-locked host buffers, for an MPI that is not CUDA-aware
(cuda.py's BufferPolicy decides which tensors go this way), and the CUDA calls it needs.

A send copies on a side stream after the producing stream's work, and its payload is handed to
MPI only when that copy has completed; a receive lands in a pinned buffer, is copied to the device
on the side stream, the compute stream waits for that copy (not the host), and the buffer goes
back to the pool only once the copy has completed. Buffers are reused per (shape, dtype)
(`PinnedPool`). With a CUDA-aware MPI none of this runs: device tensors go to MPI as they are,
once the stream that produced them has finished (synchronised exactly once per send).

The few CUDA calls are methods of `CudaOps`; the tests put `FakeOps` in its place (a CPU stand-in
whose copies land only when their event is found complete), so the ordering is tested on machines
without a GPU. Imports nothing of mpipar: cuda.py, waits.py and messages.py all build on it.
"""
from __future__ import annotations

from collections import defaultdict

import torch


# -------------------------------------------------------------------------------------------------
# The CUDA calls staging needs
# -------------------------------------------------------------------------------------------------
class CudaOps:
    """Real streams and events (one side stream per device, for staging copies)."""

    def __init__(self):
        self._side: dict = {}

    def is_device(self, t: torch.Tensor) -> bool:
        return t.device.type == "cuda"

    def is_device_name(self, device) -> bool:
        return torch.device(device).type == "cuda"

    def pinned(self, shape, dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def device_empty(self, shape, dtype, device) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=device)

    def side(self, device):
        device = torch.device(device)
        if device not in self._side:
            self._side[device] = torch.cuda.Stream(device)
        return self._side[device]

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor, device):
        """dst.copy_(src) on the side stream, after the work queued so far on the current stream;
        returns the event that marks the copy's completion."""
        side = self.side(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(side)
        (src if src.is_cuda else dst).record_stream(side)   # the caching allocator must wait for it too
        return event

    def done(self, event) -> bool:
        return event.query()

    def wait(self, event) -> None:
        event.synchronize()

    def consume_after(self, event, device) -> None:
        """The current (compute) stream waits for `event` on the GPU; the host does not."""
        torch.cuda.current_stream(device).wait_event(event)

    def sync_producer(self, t: torch.Tensor) -> None:
        """Before MPI reads a device tensor itself: the kernels that wrote it have finished."""
        torch.cuda.current_stream(t.device).synchronize()


OPS = CudaOps()


class PinnedPool:
    """Page-locked host buffers reused per (shape, dtype). A buffer handed back with an event is
    reused only once that event has completed (its copy to the device is done)."""

    KEEP = 8   # free buffers kept per (shape, dtype)

    def __init__(self, ops=OPS):
        self.ops = ops
        self.free: dict = defaultdict(list)       # key -> [(buffer, event or None)]
        self.made = 0                             # buffers allocated (tests: reuse happens)

    def take(self, shape, dtype) -> torch.Tensor:
        key = (tuple(shape), dtype)
        spares = self.free[key]
        for i, (buf, event) in enumerate(spares):
            if event is None or self.ops.done(event):
                del spares[i]
                return buf
        self.made += 1
        return self.ops.pinned(key[0], dtype)

    def give(self, buf: torch.Tensor, event=None) -> None:
        spares = self.free[(tuple(buf.shape), buf.dtype)]
        if len(spares) < self.KEEP:
            spares.append((buf, event))


# -------------------------------------------------------------------------------------------------
# Staged sends not yet handed to MPI: posted before this process blocks on anything (waits.py
# calls flush), so a peer waiting for one can never deadlock us.
# -------------------------------------------------------------------------------------------------
_PENDING: set = set()   # held strongly: a staged send must reach MPI even if its handle is dropped


def pending(handle) -> None:
    _PENDING.add(handle)


def posted(handle) -> None:
    _PENDING.discard(handle)


def any_pending() -> bool:
    return len(_PENDING) > 0


def flush() -> None:
    """Post every staged send whose copy is still running (waits for those copies)."""
    for handle in list(_PENDING):
        handle.post(block=True)   # removes itself
