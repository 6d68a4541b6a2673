"""Gradient clipping by the GLOBAL norm over every stage's gradients (not per stage): each rank
sums its squares, one all-reduce over the pipeline adds them, every rank scales alike. With
tensor parallelism the squares of sharded gradients are first summed over tp; replicated ones
(equal on every tp rank) are counted once."""
from __future__ import annotations

import math

import torch


def clip_global_norm(params, max_norm: float, pp_world, tp_world=None, sharded=()) -> float:
    """Scale grads so the norm over all stages is at most max_norm; returns the norm before.
    `sharded`: the ids of the parameters that are tensor-parallel shards over `tp_world`."""
    grads = [p.grad for p in params if p.grad is not None]
    local = sum(float(p.grad.detach().float().pow(2).sum()) for p in params
                if p.grad is not None and id(p) not in sharded)
    split = sum(float(p.grad.detach().float().pow(2).sum()) for p in params
                if p.grad is not None and id(p) in sharded)
    if tp_world is not None and tp_world.size > 1:
        split = tp_world.allreduce_native(torch.tensor([split], dtype=torch.float64))[0].item()
    local += split
    total = pp_world.allreduce_native(torch.tensor([local], dtype=torch.float64))[0].item()
    norm = math.sqrt(total)
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in grads:
            g.mul_(scale)
    return norm
