"""One pipeline stage on one rank: its layers, what it stashed for backward, its neighbours."""
from __future__ import annotations

import torch
from torch import nn

from ..comm.tags import Kind, tag
from ..errors import ShapeError
from ..comm.header import describe


class Stage:
    """Runs F and B for micro-batches and keeps exactly what backward needs until it runs."""

    def __init__(self, module: nn.Module, index: int, n_stages: int, pp_world, loss_fn=None,
                 device="cpu"):
        self.module, self.index, self.n = module, index, n_stages
        self.world, self.loss_fn, self.device = pp_world, loss_fn, device
        self.inputs: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.grads_in: dict[int, torch.Tensor] = {}
        self.layer_names = [n for n, _ in module.named_children()]

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.n - 1

    @property
    def prev(self) -> int:
        return self.index - 1

    @property
    def next(self) -> int:
        return self.index + 1

    def forward(self, mb: int, x: torch.Tensor, target=None, weight: float = 1.0) -> torch.Tensor:
        """Forward one micro-batch; on the last stage returns the weighted loss (or the output
        when there is no target, for evaluation)."""
        if not self.is_first and torch.is_grad_enabled():
            x = x.detach().requires_grad_(x.is_floating_point())
        self.inputs[mb] = x
        try:
            out = self.module(x)
        except RuntimeError as e:
            if self.is_first:
                raise
            src = self.world.world_rank_of(self.prev)
            raise ShapeError(
                f"stage {self.index} (rank {self.world.world_rank}, layers {self.layer_names[0]}.."
                f"{self.layer_names[-1]}) cannot take the activation {describe(x.shape, x.dtype)} from rank "
                f"{src} (stage {self.prev}): {' '.join(str(e).split())}") from None
        if self.is_last and target is not None and self.loss_fn is not None:
            loss = self.loss_fn(out, target) * weight
            self.outputs[mb] = loss
            return out
        self.outputs[mb] = out
        return out

    def backward(self, mb: int, grad: torch.Tensor | None = None) -> torch.Tensor | None:
        """Backward one micro-batch; returns the gradient for the previous stage."""
        out = self.outputs.pop(mb)
        x = self.inputs.pop(mb)
        if grad is None:
            out.backward()
        else:
            out.backward(grad)
        return None if self.is_first else x.grad

    def loss_of(self, mb: int) -> float:
        return float(self.outputs[mb].detach())

    # -- messages ------------------------------------------------------------------------
    def tag(self, kind: Kind, mb: int, chunk: int = 0) -> int:
        return tag(kind, mb, chunk)
