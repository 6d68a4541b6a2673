"""`--balance time`: a short profiling pass that times each layer's forward+backward on a
sample batch, holding one layer at a time (so the whole model is never allocated at once)."""
from __future__ import annotations

import time

import torch

from .model import build_layer


def layer_times(specs, sample: torch.Tensor, seed: int, repeats: int = 3) -> list[float]:
    times, x = [], sample
    for i, spec in enumerate(specs):
        layer = build_layer(spec, i, seed)
        best = float("inf")
        for _ in range(repeats):
            inp = x.detach().requires_grad_(x.is_floating_point())
            t0 = time.perf_counter()
            out = layer(inp)
            out.float().sum().backward()
            best = min(best, time.perf_counter() - t0)
        times.append(best)
        with torch.no_grad():
            x = layer(x)
        del layer
    return times
