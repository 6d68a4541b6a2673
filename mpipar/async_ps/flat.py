"""A model's parameters as one flat vector, so a parameter server can own a contiguous shard
of it and a worker can receive fresh parameters straight into its model (no copies)."""
from __future__ import annotations

import torch
from torch import nn


def flatten_(module: nn.Module) -> torch.Tensor:
    """Move every parameter into one flat buffer (in module.parameters() order) and make the
    parameters views of it; returns the buffer. Writing into it changes the model."""
    params = list(module.parameters())
    if not params:
        raise ValueError("the model has no parameters to serve")
    dtypes = {p.dtype for p in params}
    if len(dtypes) != 1:
        raise TypeError(f"a served model needs one parameter dtype, found {sorted(map(str, dtypes))}")
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    offset = 0
    for p in params:
        n = p.numel()
        p.data = flat[offset:offset + n].view_as(p)
        offset += n
    return flat


def flat_grad(module: nn.Module) -> torch.Tensor:
    """The gradients in the same order as flatten_ (zeros for parameters that got none)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in module.parameters()])
