"""The Noam learning-rate schedule ("Attention Is All You Need", section 5.3) as a LambdaLR:
linear warm-up, then decay with the inverse square root of the step."""
from __future__ import annotations

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
