"""Self-attention with its heads split over tp: the stacked QKV projection is column-parallel
(rank r holds q, k and v rows of heads r*H/p .. (r+1)*H/p - 1), attention runs on local heads
only, and the output projection is row-parallel: one all-reduce forward, one backward.

Parameter names and full shapes match nn.MultiheadAttention(batch_first=True), which is the
single-device module it must equal (in_proj_weight [3E, E], in_proj_bias, out_proj); `dropout`
on the attention weights as its (the same draws; tp = 1 only: see check_dropout).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .clip import refuse_local_norms
from .group import TPGroup, divisible
from .linear import RowParallelLinear
from .mappings import copy_to_tp
from .sharding import QKV


class ParallelSelfAttention(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, group: TPGroup, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        check_dropout(dropout, group, "ParallelSelfAttention")
        self.embed_dim, self.num_heads, self.group, self.dropout = embed_dim, num_heads, group, dropout
        if num_heads < 1 or embed_dim % num_heads:
            raise ConfigError(f"ParallelSelfAttention: embed_dim {embed_dim} is not a multiple of "
                              f"num_heads {num_heads}; choose embed_dim = heads x head size")
        self.head_dim = embed_dim // num_heads
        self.local_heads = divisible(num_heads, group.size, "ParallelSelfAttention num_heads")
        local = self.local_heads * self.head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * local, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * local)) if bias else None
        self.shard_rules = {"in_proj_weight": QKV, "in_proj_bias": QKV} if bias else {"in_proj_weight": QKV}
        refuse_local_norms(self)
        self.out_proj = RowParallelLinear(embed_dim, embed_dim, group, bias=bias)
        nn.init.xavier_uniform_(self.in_proj_weight)   # local stand-in; counter_init_ gives parity

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        """x [B, T, E] replicated -> [B, T, E] replicated."""
        b, t, _ = x.shape
        qkv = F.linear(copy_to_tp(x, self.group), self.in_proj_weight, self.in_proj_bias)
        q, k, v = (z.reshape(b, t, self.local_heads, self.head_dim).transpose(1, 2)
                   for z in qkv.chunk(3, dim=-1))
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(ctx.transpose(1, 2).reshape(b, t, self.local_heads * self.head_dim))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads} "
                f"({self.local_heads} on tp rank {self.group.rank}/{self.group.size})")


def check_dropout(p: float, group: TPGroup, what: str) -> None:
    """Dropout under tp > 1 needs masks agreed over the tp ranks on replicated activations and
    independent ones on each rank's heads and neurons (Megatron's RNG tracker): not built, so refused."""
    if p and group.size > 1:
        raise ConfigError(f"{what}: dropout {p} with tensor parallelism (tp={group.size}) is not supported "
                          f"(its masks are not coordinated over the tp ranks); use dropout 0, or tp=1")
