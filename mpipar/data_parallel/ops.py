"""Reduction operators and accumulation dtypes shared by every all-reduce algorithm.

The hot loops work on numpy views of CPU tensors (slicing and adding a numpy array costs a
fraction of the torch call overhead, which dominates at the piece sizes a pipelined ring uses).
Half-precision inputs (bfloat16, float16) are accumulated in float32 and rounded once at the
end, so the result is round(sum) rather than a chain of per-hop roundings (Open MPI 5's native
Allreduce returns inf for bfloat16, MPICH rejects it).
"""
from __future__ import annotations

import numpy as np
import torch

OPS = ("sum", "avg", "max", "min")
LOW_PRECISION = (torch.bfloat16, torch.float16)
UFUNC = {"sum": np.add, "avg": np.add, "max": np.maximum, "min": np.minimum}


def check_op(op: str, dtype: torch.dtype) -> None:
    if op not in OPS:
        raise ValueError(f"unknown reduction {op!r}; use one of {', '.join(OPS)}")
    if dtype == torch.bool or dtype.is_complex:
        raise TypeError(f"cannot all-reduce a {dtype} tensor; use a real floating-point or integer dtype")
    if op == "avg" and not dtype.is_floating_point:
        raise TypeError(f"op='avg' needs a floating-point tensor, got {dtype}; use op='sum'")


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in LOW_PRECISION else dtype


_NUMPY: dict = {}


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    if dtype not in _NUMPY:
        _NUMPY[dtype] = torch.empty(0, dtype=dtype).numpy().dtype
    return _NUMPY[dtype]


def reduce_into(op: str, acc: np.ndarray, other: np.ndarray) -> None:
    """acc <- acc (op) other, in place (sum and avg both add; avg divides once at the end)."""
    UFUNC[op](acc, other, out=acc)


def finish_into(op: str, n: int, out: torch.Tensor, acc: np.ndarray, same: bool) -> None:
    """out <- the final value of acc: divided by n for avg, rounded to out's dtype. `same`: acc
    is out's own memory (no accumulation dtype), so this works in place."""
    if same:
        if op == "avg" and n > 1:
            np.divide(acc, n, out=acc)
        return
    src = torch.from_numpy(acc)
    out.copy_(src / n if op == "avg" and n > 1 else src)
