"""Learning-rate schedules the examples use, as LambdaLRs stepped after every optimizer step:
Noam ("Attention Is All You Need", section 5.3: linear warm-up, then decay with the inverse
square root of the step) and a half-cosine decay to a floor (after a linear warm-up, if asked)."""
from __future__ import annotations

import math

from torch.optim.lr_scheduler import LambdaLR


def noam_factor(step: int, d_model: int, warmup: int) -> float:
    """d_model^-0.5 * min(step^-0.5, step * warmup^-1.5) for step >= 1; peaks at step = warmup."""
    step = max(1, step)
    return d_model ** -0.5 * min(step ** -0.5, step * warmup ** -1.5)


def noam(optimizer, d_model: int, warmup: int) -> LambdaLR:
    """LambdaLR whose lr at step k (k = 1 for the first optimizer step) is the optimizer's base lr
    times noam_factor(k): the base lr is the paper's `factor` (1.0 there, peak lr = d^-0.5 w^-0.5).
    Step it after every optimizer step."""
    if warmup < 1:
        raise ValueError(f"warmup must be >= 1 step, got {warmup}")
    return LambdaLR(optimizer, lambda k: noam_factor(k + 1, d_model, warmup))


def cosine(optimizer, total_steps: int, floor: float = 0.05, warmup: int = 0) -> LambdaLR:
    """The base lr down to `floor` times it along a half cosine over `total_steps` steps, then
    held there: the last epochs settle instead of landing on a noisy step. `warmup` > 0: first a
    linear rise over that many steps, the cosine over the rest (nanoGPT's schedule)."""
    total = max(1, total_steps)

    def factor(k: int) -> float:
        if k < warmup:
            return (k + 1) / (warmup + 1)
        done = min(k - warmup, total - warmup) / max(1, total - warmup)
        return floor + (1 - floor) / 2 * (1 + math.cos(math.pi * done))
    return LambdaLR(optimizer, factor)


def run_steps(n_train: int, batch_size: int, epochs: int, steps: int = 0) -> int:
    """Optimizer steps in a run of `epochs` over `n_train` samples (`steps` > 0: at most that many per epoch)."""
    per_epoch = -(-n_train // batch_size)
    return epochs * (min(per_epoch, steps) if steps else per_epoch)
