"""Gradient clipping by the norm of the FULL model's gradient under tensor parallelism: squares of
sharded gradients are all-reduced over tp, replicated ones (equal on every rank) counted once."""
from __future__ import annotations

import math

import torch

from .sharding import tp_plan


def clip_grad_norm_tp(model, max_norm: float, group) -> float:
    """Scale grads by min(1, max_norm / (norm + 1e-6)) as torch's clip_grad_norm_; returns the norm."""
    sharded = set(tp_plan(model))
    split = torch.zeros(1, dtype=torch.float64)
    replicated = 0.0
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        sq = float(p.grad.detach().double().pow(2).sum())
        if name in sharded:
            split += sq
        else:
            replicated += sq
    norm = math.sqrt(float(group.all_reduce(split, "clip")[0]) + replicated)
    coef = min(1.0, max_norm / (norm + 1e-6))
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(coef)
    return norm
