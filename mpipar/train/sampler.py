"""Deterministic batches: the same permutation on every rank for a given (seed, epoch), each
data-parallel rank taking its slice of every global batch, so dp training sees exactly the
batches single-process training sees."""
from __future__ import annotations

import torch


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True,
                  dp_rank: int = 0, dp_size: int = 1) -> list[torch.Tensor]:
    """Index tensors of this rank's part of each global batch of `batch_size`."""
    if shuffle:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n, generator=g)
    else:
        order = torch.arange(n)
    out = []
    for start in range(0, n, batch_size):
        batch = order[start:start + batch_size]
        out.append(batch.tensor_split(dp_size)[dp_rank] if dp_size > 1 else batch)
    return out


def split_microbatches(x, m: int) -> list:
    """m micro-batches (sizes differ by at most one; fewer when the batch is smaller than m)."""
    parts = x.tensor_split(min(m, len(x))) if len(x) else [x]
    return list(parts)
