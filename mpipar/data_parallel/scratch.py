"""Reusable receive buffers for the all-reduce algorithms.

A fresh 32 MiB array per call costs more than the copy it receives (mmap, then one page fault
per 4 KiB on first touch), so buffers are taken from and given back to a small pool. Collectives
in flight at the same time (gradient buckets) each hold their own buffer.
"""
from __future__ import annotations

import numpy as np

KEEP = 8   # free buffers kept


class ScratchPool:
    def __init__(self):
        self.free: list[np.ndarray] = []

    def take(self, numel: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        """(array of `numel` elements of `dtype`, raw buffer to give back)."""
        nbytes = numel * np.dtype(dtype).itemsize
        best = None
        for i, b in enumerate(self.free):
            if b.nbytes >= nbytes and (best is None or b.nbytes < self.free[best].nbytes):
                best = i
        raw = self.free.pop(best) if best is not None else np.empty(max(nbytes, 64), dtype=np.uint8)
        return raw[:nbytes].view(dtype), raw

    def give(self, raw: np.ndarray | None) -> None:
        if raw is None:
            return
        self.free.append(raw)
        if len(self.free) > KEEP:
            self.free.pop(min(range(len(self.free)), key=lambda i: self.free[i].nbytes))

    def clear(self) -> None:
        self.free.clear()


POOL = ScratchPool()
