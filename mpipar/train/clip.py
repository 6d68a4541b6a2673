"""Gradient clipping by the GLOBAL norm over every stage's gradients (not per stage): each rank
sums its squares, one all-reduce over the pipeline adds them, every rank scales alike."""
from __future__ import annotations

import math

import torch


def clip_global_norm(params, max_norm: float, pp_world) -> float:
    """Scale grads so the norm over all stages is at most max_norm; returns the norm before."""
    grads = [p.grad for p in params if p.grad is not None]
    local = sum(float(g.detach().float().pow(2).sum()) for g in grads)
    total = pp_world.allreduce_native(torch.tensor([local], dtype=torch.float64))[0].item()
    norm = math.sqrt(total)
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in grads:
            g.mul_(scale)
    return norm
