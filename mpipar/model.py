"""Models as ordered lists of named layer builders, so a rank can build only its own layers.

Each layer is initialised from its own seed (derived from the run seed and the layer's index),
so any partition of the layers over ranks gets exactly the weights a single process would.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn


@dataclass(frozen=True)
class LayerSpec:
    """A named layer. `build()` makes the single-device layer; `tp(group)`, when given, makes its
    tensor-parallel twin (same state-dict names, mpipar.tensor layers), used when --grid has tp>1.
    Layers without `tp` are replicated on every tp rank."""
    name: str
    build: Callable[[], nn.Module]
    tp: Callable | None = None


def layer_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index * 7919) % (2**63 - 1)


def build_layer(spec: LayerSpec, index: int, seed: int, device="cpu") -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(layer_seed(seed, index))
        return spec.build().to(device)


def build_stage(specs: Sequence[LayerSpec], names: Sequence[str], seed: int, device="cpu",
                tp_group=None) -> nn.Sequential:
    """nn.Sequential of just the named layers (in model order); no other layer is allocated.
    With a tp group of size > 1, layers that have a `tp` builder hold only this rank's shard."""
    wanted = set(names)
    mods = {}
    for i, s in enumerate(specs):
        if s.name not in wanted:
            continue
        layer = build_layer(s, i, seed, device)
        if s.tp is not None and tp_group is not None and tp_group.size > 1:
            from .tensor.sharding import shard_layer
            layer = shard_layer(s.tp(tp_group), layer, tp_group)
        mods[s.name] = layer
    return nn.Sequential(OrderedDict((n, mods[n]) for n in names))


def build_full(specs: Sequence[LayerSpec], seed: int, device="cpu") -> nn.Sequential:
    """The whole model in one process: the single-process reference."""
    return build_stage(specs, [s.name for s in specs], seed, device)


def param_shapes(specs: Sequence[LayerSpec]) -> list[list[tuple[int, ...]]]:
    """Each layer's parameter shapes, built on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        return [[tuple(p.shape) for p in s.build().parameters()] for s in specs]


def param_counts(specs: Sequence[LayerSpec]) -> list[int]:
    """Parameters per layer."""
    return [sum(math.prod(shape) for shape in layer) for layer in param_shapes(specs)]


def check_unique(specs: Sequence[LayerSpec]) -> None:
    seen = set()
    for s in specs:
        if s.name in seen:
            raise ValueError(f"two layers are named {s.name!r}; layer names must be unique")
        seen.add(s.name)
