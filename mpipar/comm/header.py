"""Fixed-format tensor headers: dtype and shape travel as int64s, never as pickle."""
from __future__ import annotations

import numpy as np
import torch

MAGIC = 0x6D707031  # "mpp1": a header that does not start with this is not ours
MAX_DIMS = 8
HEADER_LEN = 3 + MAX_DIMS  # magic, dtype code, ndim, dims...

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
          torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]
CODE = {dt: i for i, dt in enumerate(DTYPES)}


_CACHE: dict = {}   # (shape, dtype) -> read-only header; training sends few distinct shapes


def encode(shape: torch.Size | tuple, dtype: torch.dtype) -> np.ndarray:
    """Header for a tensor of this shape and dtype, as a read-only int64 array of HEADER_LEN
    (cached: the same shapes go by every step, and building one costs microseconds)."""
    key = (tuple(shape), dtype)
    h = _CACHE.get(key)
    if h is None:
        h = _CACHE[key] = _build(*key)
        if len(_CACHE) > 4096:   # many distinct shapes (e.g. variable lengths): start over
            _CACHE.clear()
    return h


def _build(shape: tuple, dtype: torch.dtype) -> np.ndarray:
    if dtype not in CODE:
        raise TypeError(f"mpipar cannot send dtype {dtype}; supported: {', '.join(map(str, DTYPES))}")
    if len(shape) > MAX_DIMS:
        raise ValueError(f"mpipar sends tensors of at most {MAX_DIMS} dimensions, got {len(shape)}")
    h = np.zeros(HEADER_LEN, dtype=np.int64)
    h[0], h[1], h[2] = MAGIC, CODE[dtype], len(shape)
    h[3:3 + len(shape)] = shape
    h.flags.writeable = False
    return h


def decode(h: np.ndarray) -> tuple[tuple[int, ...], torch.dtype]:
    """(shape, dtype) from a header; ValueError if the bytes are not a header of ours."""
    v = h.tolist()   # plain ints: cheaper than indexing numpy element by element
    if len(v) != HEADER_LEN or v[0] != MAGIC:
        raise ValueError("received bytes are not an mpipar tensor header (mismatched send/recv pairing?)")
    code, ndim = v[1], v[2]
    dims = tuple(v[3:3 + ndim])
    if not 0 <= code < len(DTYPES) or not 0 <= ndim <= MAX_DIMS or any(d < 0 for d in dims):
        raise ValueError(f"corrupt mpipar tensor header {v}")
    return dims, DTYPES[code]


def describe(shape, dtype) -> str:
    """'[16, 64] float32' — how shapes appear in error messages."""
    return f"{list(shape)} {str(dtype).replace('torch.', '')}"
