"""An embedding table split over tp by vocabulary rows (Megatron's VocabParallelEmbedding): rank r
holds rows r*V/p .. (r+1)*V/p - 1, looks up the tokens that fall in them (zeros for the others),
and one all-reduce forward sums the ranks' parts into every token's full vector; backward needs
no communication (each rank's rows get the gradient of their own tokens).

Its weight [V/p, E] is also a column-parallel head's over the same rows, so a head tied to the
embedding (GPT) keeps ONE parameter per rank, whose two gradients add up in place. State-dict
name and full shape match nn.Embedding's, and it is one: `counter_init_` and the sharding helpers
treat it as an Embedding whose dim 0 is split.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .clip import refuse_local_norms
from .group import TPGroup, divisible
from .mappings import reduce_from_tp
from .sharding import COLUMN


class VocabParallelEmbedding(nn.Embedding):
    """nn.Embedding(num_embeddings, embedding_dim) with this rank's 1/tp of the rows."""

    def __init__(self, num_embeddings: int, embedding_dim: int, group: TPGroup, device=None, dtype=None):
        local = divisible(num_embeddings, group.size, "VocabParallelEmbedding num_embeddings (the vocabulary)")
        super().__init__(local, embedding_dim, device=device, dtype=dtype)
        self.full_embeddings, self.group = num_embeddings, group
        self.first = group.rank * local
        self.shard_rules = {"weight": COLUMN}
        refuse_local_norms(self)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if self.group.size == 1:
            return super().forward(idx)
        local = idx - self.first
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return reduce_from_tp(out.masked_fill(outside.unsqueeze(-1), 0.0), self.group)

    def extra_repr(self) -> str:
        last = self.first + self.num_embeddings - 1
        return (f"{self.full_embeddings}, {self.embedding_dim} (rows {self.first}..{last} "
                f"on tp rank {self.group.rank}/{self.group.size})")
