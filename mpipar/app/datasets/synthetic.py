"""A deterministic, learnable regression set for the MLP examples (no files, no download)."""
from __future__ import annotations

import math

import torch

from .common import Split

NOISE = 0.05
HIDDEN = 32


def regression(n_train: int = 2048, n_test: int = 512, in_dim: int = 12, out_dim: int = 12,
               seed: int = 0) -> tuple[Split, Split]:
    """(train, test): x ~ N(0, I) [N, in_dim]; y = f(x) + N(0, 0.05^2) [N, out_dim], float32.

    f is a fixed random smooth teacher drawn from `seed`: a linear part plus a tanh and a sin
    hidden layer, scaled so each target has variance close to 1. Same seed, same bytes."""
    if min(n_train, n_test, in_dim, out_dim) < 1:
        raise ValueError("n_train, n_test, in_dim and out_dim must all be >= 1")
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    lin = randn(in_dim, out_dim) / math.sqrt(in_dim)
    w1, b1 = randn(in_dim, HIDDEN) / math.sqrt(in_dim), randn(HIDDEN) * 0.5
    w2 = randn(in_dim, HIDDEN) / math.sqrt(in_dim)
    v1, v2 = randn(HIDDEN, out_dim) / math.sqrt(HIDDEN), randn(HIDDEN, out_dim) / math.sqrt(HIDDEN)

    def f(x):
        y = 0.3 * (x @ lin) + 1.2 * torch.tanh(x @ w1 + b1) @ v1 + 1.2 * torch.sin(1.5 * (x @ w2)) @ v2
        return y

    x = randn(n_train + n_test, in_dim)
    y = f(x)
    y = (y - y[:n_train].mean(0)) / y[:n_train].std(0)  # targets ~unit variance per output
    y = y + NOISE * randn(n_train + n_test, out_dim)
    x, y = x.float(), y.float()
    note = (f"synthetic regression (seed {seed}): y = fixed random smooth function of x "
            f"({in_dim}->{out_dim}) + N(0, {NOISE}^2) noise; {n_train} train, {n_test} test")
    meta = {"noise_std": NOISE, "seed": seed}
    return (Split(x[:n_train].contiguous(), y[:n_train].contiguous(), note, meta),
            Split(x[n_train:].contiguous(), y[n_train:].contiguous(), note, dict(meta)))
