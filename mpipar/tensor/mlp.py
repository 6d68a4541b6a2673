"""The Megatron MLP: column-parallel then row-parallel, so the hidden activation never leaves its
rank and a two-layer block costs ONE all-reduce forward (g) and one backward (f).

Layouts (indices match the single-device nn.Sequential from `reference_mlp`, so state dicts agree):
    norm=None:    [Linear, act, Linear]
    norm="layer": [LayerNorm(d_in), Linear, act, Linear]        LayerNorm on the replicated input
    norm="batch": [Linear, BatchNorm1d(hidden), act, Linear]    BatchNorm on the split hidden
With BatchNorm the first Linear has no bias: BatchNorm's shift replaces it, and its gradient
would be pure rounding noise (which Adam amplifies into arbitrary, non-reproducible updates).
"""
from __future__ import annotations

from torch import nn

from ..errors import ConfigError
from .group import TPGroup
from .linear import ColumnParallelLinear, RowParallelLinear
from .norm import ShardedBatchNorm1d

NORMS = (None, "layer", "batch")


def _check(norm):
    if norm not in NORMS:
        raise ConfigError(f"norm={norm!r}: use one of None, 'layer', 'batch'")


class ParallelMLP(nn.Sequential):
    """d_in -> hidden (split over tp) -> d_out; input and output replicated."""

    def __init__(self, d_in: int, hidden: int, d_out: int, group: TPGroup, norm: str | None = None,
                 activation=nn.ReLU, bias: bool = True):
        _check(norm)
        layers = [nn.LayerNorm(d_in)] if norm == "layer" else []
        layers.append(ColumnParallelLinear(d_in, hidden, group, bias=bias and norm != "batch"))
        if norm == "batch":
            layers.append(ShardedBatchNorm1d(hidden, group))
        layers += [activation(), RowParallelLinear(hidden, d_out, group, bias=bias)]
        super().__init__(*layers)
        self.group = group


def reference_mlp(d_in: int, hidden: int, d_out: int, norm: str | None = None,
                  activation=nn.ReLU, bias: bool = True) -> nn.Sequential:
    """The single-device module a ParallelMLP with the same arguments must equal."""
    _check(norm)
    layers = [nn.LayerNorm(d_in)] if norm == "layer" else []
    layers.append(nn.Linear(d_in, hidden, bias=bias and norm != "batch"))
    if norm == "batch":
        layers.append(nn.BatchNorm1d(hidden))
    layers += [activation(), nn.Linear(hidden, d_out, bias=bias)]
    return nn.Sequential(*layers)
