"""Column- and row-parallel Linear layers: each tp rank holds a slice of the weight and computes
a slice of the neurons. State-dict names and full sizes match nn.Linear's, so a plain Linear's
weights shard into them and `counter_init_` gives them the same numbers.

    ColumnParallelLinear: W [out/p, in]   y_r = f(x) W_r^T + b_r      (optionally all-gather y)
    RowParallelLinear:    W [out, in/p]   y   = g(x_r W_r^T) + b      (b replicated, added once)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .clip import refuse_local_norms
from .group import TPGroup, divisible
from .mappings import copy_to_tp, gather_from_tp, reduce_from_tp, scatter_to_tp
from .sharding import COLUMN, ROW


class ColumnParallelLinear(nn.Module):
    """Output features split over tp; input replicated. `gather_output` returns the full output."""

    def __init__(self, in_features: int, out_features: int, group: TPGroup, bias: bool = True,
                 gather_output: bool = False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.group = in_features, out_features, group
        self.gather_output = gather_output
        local = divisible(out_features, group.size, f"{type(self).__name__} out_features")
        self.weight = nn.Parameter(torch.empty(local, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(local, device=device, dtype=dtype)) if bias else None
        self.shard_rules = {"weight": COLUMN, "bias": COLUMN} if bias else {"weight": COLUMN}
        refuse_local_norms(self)
        fallback_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(copy_to_tp(x, self.group), self.weight, self.bias)
        return gather_from_tp(y, self.group) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} "
                f"({self.weight.shape[0]} on tp rank {self.group.rank}/{self.group.size}), "
                f"gather_output={self.gather_output}")


class RowParallelLinear(nn.Module):
    """Input features split over tp; partial outputs all-reduced. With `input_is_parallel=False`
    the full input is given and each rank keeps its slice (all-gather of the gradient)."""

    def __init__(self, in_features: int, out_features: int, group: TPGroup, bias: bool = True,
                 input_is_parallel: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.group = in_features, out_features, group
        self.input_is_parallel = input_is_parallel
        local = divisible(in_features, group.size, f"{type(self).__name__} in_features")
        self.weight = nn.Parameter(torch.empty(out_features, local, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.shard_rules = {"weight": ROW}
        refuse_local_norms(self)
        fallback_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.group)
        y = reduce_from_tp(F.linear(x, self.weight), self.group)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} ({self.weight.shape[1]} on tp rank "
                f"{self.group.rank}/{self.group.size}), out_features={self.out_features}, "
                f"input_is_parallel={self.input_is_parallel}")


@torch.no_grad()
def fallback_init_(layer: nn.Module) -> None:
    """Local U(+-1/sqrt(fan_in)) so a layer is usable as built; `counter_init_` gives parity."""
    if layer.weight.device.type == "meta":
        return
    bound = layer.in_features ** -0.5
    layer.weight.uniform_(-bound, bound)
    if layer.bias is not None:
        layer.bias.uniform_(-bound, bound)
