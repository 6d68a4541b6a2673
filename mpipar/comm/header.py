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


def encode(shape: torch.Size | tuple, dtype: torch.dtype) -> np.ndarray:
    """Header for a tensor of this shape and dtype, as an int64 array of HEADER_LEN."""
    if dtype not in CODE:
        raise TypeError(f"mpipar cannot send dtype {dtype}; supported: {', '.join(map(str, DTYPES))}")
    if len(shape) > MAX_DIMS:
        raise ValueError(f"mpipar sends tensors of at most {MAX_DIMS} dimensions, got {len(shape)}")
    h = np.zeros(HEADER_LEN, dtype=np.int64)
    h[0], h[1], h[2] = MAGIC, CODE[dtype], len(shape)
    h[3:3 + len(shape)] = shape
    return h


def decode(h: np.ndarray) -> tuple[tuple[int, ...], torch.dtype]:
    """(shape, dtype) from a header; ValueError if the bytes are not a header of ours."""
    if h.shape != (HEADER_LEN,) or int(h[0]) != MAGIC:
        raise ValueError("received bytes are not an mpipar tensor header (mismatched send/recv pairing?)")
    code, ndim = int(h[1]), int(h[2])
    if not 0 <= code < len(DTYPES) or not 0 <= ndim <= MAX_DIMS or (h[3:3 + ndim] < 0).any():
        raise ValueError(f"corrupt mpipar tensor header {h.tolist()}")
    return tuple(int(d) for d in h[3:3 + ndim]), DTYPES[code]


def describe(shape, dtype) -> str:
    """'[16, 64] float32' — how shapes appear in error messages."""
    return f"{list(shape)} {str(dtype).replace('torch.', '')}"
