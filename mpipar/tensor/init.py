"""Sharded initialisation: each tp rank computes only its slice of every weight, and the slices
put together equal the single-device module initialised with the same seed, for any tp size.

How: a counter-based generator. Element i (flat index in the FULL tensor) of the tensor named
`name` gets the value hash(seed, name, i) -> uniform/normal, computed with splitmix64. A rank
evaluates the hash only at the global indices of its shard, so it never builds the full tensor
and the result does not depend on tp. State-dict names are shared by the tensor-parallel module
and the single-device module, so both get the same numbers. Distributions follow PyTorch's
defaults in shape (Linear: U(+-1/sqrt(fan_in)); attention in_proj: Xavier-uniform, bias 0;
norms: 1 and 0; Embedding: N(0, 1)) but not in bits: call `counter_init_` on both modules.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from .sharding import ShardRule, full_shape

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
SECOND_STREAM = np.uint64(0xD1B54A32D192ED03)


def splitmix64(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = z + GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def name_key(seed: int, name: str) -> np.uint64:
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return np.uint64(int.from_bytes(digest, "little"))


def global_indices(shape, rule: ShardRule | None, picked: torch.Tensor | None) -> np.ndarray:
    """Flat indices into the full tensor of every element of the shard, in shard layout (uint64)."""
    strides = np.cumprod((list(shape[1:]) + [1])[::-1])[::-1].astype(np.uint64)
    flat = np.zeros((), dtype=np.uint64)
    for d, n in enumerate(shape):
        split_here = rule is not None and d == rule.dim
        coord = picked.numpy().astype(np.uint64) if split_here else np.arange(n, dtype=np.uint64)
        view = [1] * len(shape)
        view[d] = len(coord)
        with np.errstate(over="ignore"):
            flat = flat + coord.reshape(view) * strides[d]
    return flat


def uniform01(key: np.uint64, flat: np.ndarray) -> np.ndarray:
    """[0, 1) in steps of 2^-24 (exact in float32), one value per flat index."""
    with np.errstate(over="ignore"):
        bits = splitmix64(key ^ (flat * GOLDEN)) >> np.uint64(40)
    return bits.astype(np.float64) / float(1 << 24)


def draw(kind: tuple, key: np.uint64, flat: np.ndarray) -> np.ndarray:
    what, value = kind
    if what == "const":
        return np.full(flat.shape, value, dtype=np.float64)
    if what == "uniform":
        return (2.0 * uniform01(key, flat) - 1.0) * value
    if what == "normal":   # Box-Muller on two independent streams
        u1, u2 = uniform01(key, flat), uniform01(key ^ SECOND_STREAM, flat)
        return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * math.pi * u2) * value
    raise ValueError(f"unknown init kind {what!r}")


def init_kind(module: nn.Module, pname: str, shape) -> tuple:
    """(distribution, scale) for parameter/buffer `pname` of `module`, from its FULL shape."""
    if isinstance(module, (nn.LayerNorm, _NormBase)):
        return ("const", 1.0 if pname in ("weight", "running_var") else 0.0)
    if isinstance(module, nn.Embedding):
        return ("normal", 1.0)
    if pname == "in_proj_weight":    # nn.MultiheadAttention or ParallelSelfAttention: [3E, E]
        return ("uniform", math.sqrt(6.0 / (shape[0] + shape[1])))
    if pname == "in_proj_bias":
        return ("const", 0.0)
    if hasattr(module, "in_features") and pname in ("weight", "bias"):   # Linear, Column/RowParallelLinear
        return ("uniform", 1.0 / math.sqrt(module.in_features))
    raise ValueError(f"no sharded-init rule for {type(module).__name__}.{pname}; "
                     f"add one to mpipar.tensor.init.init_kind")


def shard_values(seed: int, name: str, kind: tuple, shape, rule, rank: int, size: int, dtype) -> torch.Tensor:
    picked = rule.indices(shape[rule.dim], rank, size) if rule is not None else None
    flat = global_indices(shape, rule, picked)
    return torch.from_numpy(draw(kind, name_key(seed, name), flat)).to(dtype)


@torch.no_grad()
def counter_init_(module: nn.Module, seed: int, group=None) -> nn.Module:
    """(Re)initialise every parameter and buffer of `module` in place of its current storage
    (meta tensors included): this rank's shard under `group`, the whole tensor without one."""
    rank, size = (group.rank, group.size) if group is not None else (0, 1)
    if group is None and any(getattr(m, "group", None) is not None and m.group.size > 1
                             for m in module.modules() if getattr(m, "shard_rules", None)):
        raise ValueError("counter_init_ of a tensor-parallel module needs its TPGroup: "
                         "counter_init_(model, seed, group)")
    drawn = {}   # id of a tensor already drawn -> (it, its new value): a tied weight (GPT's head) stays one
    for prefix, m in module.named_modules():
        rules = getattr(m, "shard_rules", {}) if group is not None else {}
        for store in (m._parameters, m._buffers):
            for pname, t in list(store.items()):
                if t is None:
                    continue
                if id(t) in drawn:
                    store[pname] = drawn[id(t)][1]
                    continue
                name = f"{prefix}.{pname}" if prefix else pname
                if pname == "num_batches_tracked":
                    store[pname] = torch.zeros((), dtype=t.dtype)
                    continue
                rule = rules.get(pname)
                shape = full_shape(t, rule, size)
                values = shard_values(seed, name, init_kind(m, pname, shape), shape, rule, rank, size, t.dtype)
                store[pname] = nn.Parameter(values, t.requires_grad) if store is m._parameters else values
                drawn[id(t)] = (t, store[pname])
    return module
