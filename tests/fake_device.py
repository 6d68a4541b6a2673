"""A CPU stand-in for the CUDA calls of mpipar/comm/staging.py (CudaOps), for tests on machines
without a GPU. "Device" tensors are CPU tensors it registered (or every tensor, with
everything=True), and a staging copy lands only when its event is found complete (after `polls`
queries, or a wait, or when the compute stream is made to wait for it). A payload handed to MPI
before its copy completed therefore arrives as the pool's NaN filling, and a pinned buffer reused
too early corrupts the copy that still reads it: the ordering bugs staging must avoid show up as
wrong numbers."""
from __future__ import annotations

import weakref

import torch


class FakeEvent:
    def __init__(self, land, polls: int):
        self.land, self.polls = land, polls

    def complete(self) -> None:
        if self.land is not None:
            self.land()
            self.land = None


class FakeOps:
    def __init__(self, polls: int = 3, everything: bool = False):
        self.polls, self.everything, self.log, self._device = polls, everything, [], {}

    def register(self, t: torch.Tensor) -> torch.Tensor:
        self._device[id(t)] = weakref.ref(t)
        return t

    def is_device(self, t) -> bool:
        if self.everything:
            return True
        ref = self._device.get(id(t))
        return ref is not None and ref() is t

    def is_device_name(self, device) -> bool:
        return self.everything or str(device).startswith("cuda")

    def pinned(self, shape, dtype):
        self.log.append("pinned")
        return torch.full(shape, float("nan"), dtype=dtype)

    def device_empty(self, shape, dtype, device):
        return self.register(torch.full(shape, float("nan"), dtype=dtype))

    def copy_async(self, dst, src, device):
        self.log.append("copy")
        snapshot = src.clone()          # what the side stream reads, after the producer's kernels
        return FakeEvent(lambda: (dst.copy_(snapshot), self.log.append("landed")), self.polls)

    def done(self, event) -> bool:
        if event.land is not None:
            event.polls -= 1
            if event.polls > 0:
                return False
            event.complete()
        return True

    def wait(self, event) -> None:
        event.complete()

    def consume_after(self, event, device) -> None:
        self.log.append("compute waits")
        event.complete()                # the compute stream's later kernels see the copy

    def sync_producer(self, t) -> None:
        self.log.append("sync")
