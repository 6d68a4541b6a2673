"""Deterministic batches: the same permutation on every rank for a given (seed, epoch), each
data-parallel rank taking its slice of every global batch, so dp training sees exactly the
batches single-process training sees. In-memory tensors are indexed directly (the fast path);
any map-style Dataset goes through a DataLoader with these index lists (workers allowed)."""
from __future__ import annotations

from typing import Iterator

import torch

from ..errors import ConfigError


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True,
                  dp_rank: int = 0, dp_size: int = 1, steps: int = 0) -> list[torch.Tensor]:
    """Index tensors of this rank's part of each global batch of `batch_size` (`steps` > 0: of
    the first `steps` only, the same ones)."""
    if shuffle:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n, generator=g)
    else:
        order = torch.arange(n)
    out = []
    for start in range(0, min(n, steps * batch_size) if steps else n, batch_size):
        batch = order[start:start + batch_size]
        out.append(batch.tensor_split(dp_size)[dp_rank] if dp_size > 1 else batch)
    return out


def tensors_of(data):
    """(x, y) tensors when `data` holds them in memory (a Split, a TensorDataset of two, an
    (x, y) pair), else None."""
    if hasattr(data, "x") and hasattr(data, "y") and isinstance(data.x, torch.Tensor):
        return data.x, data.y
    if isinstance(data, torch.utils.data.TensorDataset) and len(data.tensors) == 2:
        return data.tensors
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return tuple(data)
    return None


def size_of(data) -> int:
    """Samples in `data` (a Dataset, a Split, or an (x, y) pair of tensors)."""
    return len(data[0]) if isinstance(data, (tuple, list)) else len(data)


def sized_batches(data, batch_size: int, seed: int = 0, epoch: int = 0, shuffle: bool = True,
                  dp_rank: int = 0, dp_size: int = 1, steps: int = 0,
                  num_workers: int = 0, start: int = 0) -> Iterator[tuple]:
    """(x, y, global_n) for this rank's shard of each global batch of the epoch from batch
    `start` on; `steps` > 0 ends the epoch after that many batches (counted from its first)."""
    n = size_of(data)
    idx = epoch_batches(n, batch_size, seed, epoch, shuffle, dp_rank, dp_size, steps)
    sizes = [min(batch_size, n - i * batch_size) for i in range(len(idx))]
    idx, sizes = idx[start:], sizes[start:]
    held = tensors_of(data)
    if held is not None:
        x, y = held
        for i, ix in enumerate(idx):
            yield x[ix], y[ix], sizes[i]
        return
    loader = torch.utils.data.DataLoader(data, batch_sampler=[ix.tolist() for ix in idx], num_workers=num_workers)
    for i, (x, y) in enumerate(loader):
        yield x, y, sizes[i]


def batches(data, batch_size: int, topo=None, *, seed: int = 0, epoch: int = 0, shuffle: bool = True,
            steps: int = 0, num_workers: int = 0, start: int = 0) -> Iterator[tuple]:
    """(x, y): this data-parallel rank's shard of each global batch of `batch_size` from `data`
    (a map-style Dataset yielding (x, y), a TensorDataset, or an (x, y) pair of tensors), in
    the order single-process training with the same seed and epoch sees them. `start`: skip the
    epoch's first `start` global batches, e.g. to continue mid-epoch after a resume (the same
    batches and shards an uninterrupted run sees from there)."""
    if start < 0:
        raise ConfigError(f"batches(start={start}): the number of global batches to skip, >= 0")
    dp_rank, dp_size = (topo.dp_rank, topo.grid.dp) if topo is not None else (0, 1)
    for x, y, _ in sized_batches(data, batch_size, seed, epoch, shuffle, dp_rank, dp_size, steps, num_workers,
                                 start):
        yield x, y
