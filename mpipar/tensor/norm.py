"""Normalisation under tensor parallelism.

BatchNorm normalises each feature over the batch, so on a feature-split activation (the output
of a ColumnParallelLinear) every rank normalises its own channels exactly as the single-device
module would: no communication, and weight, bias and running statistics are sharded.
LayerNorm normalises across features, so it is used on replicated activations (after a
row-parallel all-reduce): a plain nn.LayerNorm, replicated, whose gradients agree on every rank.
"""
from __future__ import annotations

from torch import nn

from .clip import refuse_local_norms
from .group import TPGroup, divisible
from .sharding import COLUMN


class ShardedBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d over `num_features` channels of which this rank holds its 1/tp."""

    def __init__(self, num_features: int, group: TPGroup, **kw):
        local = divisible(num_features, group.size, "ShardedBatchNorm1d num_features")
        super().__init__(local, **kw)
        self.full_features, self.group = num_features, group
        self.shard_rules = {n: COLUMN for n in ("weight", "bias", "running_mean", "running_var")
                            if getattr(self, n, None) is not None}
        refuse_local_norms(self)
