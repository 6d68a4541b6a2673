"""Mixed precision with no engine change: a wrapper that runs one layer under torch.autocast
(parameters stay fp32 and activations cross stage boundaries as fp32), and a loss scaler for
fp16 whose scale and skip decisions every rank of the job agrees on.

Modes: off (fp32), bf16 (autocast to bfloat16: no loss scaling needed, the CPU choice),
fp16 (autocast to float16 + PipelineGradScaler: the CUDA choice; CPU runs it too, slowly)."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..callbacks import Callback

MODES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown amp mode {mode!r}; choose one of {', '.join(MODES)}")
    return mode


class Autocast(nn.Module):
    """`layer` run under torch.autocast(mode) on its input's device; floating outputs come back
    as fp32, so the next layer (or stage, or the loss) sees fp32 whatever the mode. Mode 'off'
    wraps too, so state_dict keys (`layer.`...) do not depend on the mode."""

    def __init__(self, layer: nn.Module, mode: str = "off"):
        super().__init__()
        self.layer, self.mode = layer, check_mode(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = MODES[self.mode]
        with torch.autocast(x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = self.layer(x)
        return out.float() if out.is_floating_point() else out

    def extra_repr(self) -> str:
        return f"mode={self.mode}"


class ScaledLoss(nn.Module):
    """loss_fn(out, y) * the scaler's current scale (give this to the last stage only; metrics
    keep the unscaled loss_fn)."""

    def __init__(self, loss_fn: nn.Module, scaler: "PipelineGradScaler"):
        super().__init__()
        self.loss_fn, self.scaler = loss_fn, scaler

    @property
    def unscaled(self):
        """The loss it scales: what Pipeline's loss checks judge (pipeline/stage.py judged)."""
        return self.loss_fn

    def forward(self, out, y):
        return self.loss_fn(out, y) * self.scaler.scale


class PipelineGradScaler(Callback):
    """Dynamic loss scaling (torch.amp.GradScaler's rules) for a model split over ranks.

    The last stage multiplies its loss by `scale`, so every stage's gradients carry the same
    factor. After backward each rank divides its gradients by it and the ranks agree, with one
    all-reduce (max) over `world`, whether any gradient anywhere is inf/NaN. If so, every rank
    drops its gradients (p.grad = None: the optimizer then skips every parameter, clipping sees
    nothing) and the scale shrinks by `backoff`; after `interval` clean steps in a row it grows
    by `growth`. Same decisions on every rank, so the scale never diverges between stages.
    Powers of two keep scaling exact in fp32."""

    def __init__(self, world, init_scale: float = 2.0**16, growth: float = 2.0, backoff: float = 0.5,
                 interval: int = 2000):
        self.world, self.scale = world, float(init_scale)
        self.growth, self.backoff, self.interval = growth, backoff, interval
        self.clean_steps = 0
        self.skipped = 0

    def attach(self, trainer) -> "PipelineGradScaler":
        """Scale the trainer's loss (on the last stage) and unscale after backward: an
        after_backward callback, so it runs after any data-parallel gradient sync attached before
        it, and before clipping and the optimizer step."""
        for stage in trainer.pipe.stages:   # this rank's model chunks; the last one holds the loss
            if stage.is_last:
                stage.loss_fn = ScaledLoss(stage.loss_fn, self)
        trainer.callbacks.append(self)
        return self

    def after_backward(self, trainer) -> None:
        opt = trainer.optimizer
        if hasattr(opt, "skip_step"):     # ZeRO: the gradient this replica holds (stages 2, 3: reduced already)
            if self.unscale_grads(opt.gradients()):
                opt.skip_step()
        else:
            self.unscale_(trainer.params)

    @staticmethod
    def of(trainer) -> "PipelineGradScaler | None":
        """The scaler attached to `trainer`, if any."""
        return next((cb for cb in trainer.callbacks if isinstance(cb, PipelineGradScaler)), None)

    @torch.no_grad()
    def unscale_(self, params) -> bool:
        """Divide the params' grads by the scale; on inf anywhere (any rank) drop them all (the
        optimizer then skips every parameter, clipping sees nothing). Returns whether the step
        is skipped (on every rank alike)."""
        found_inf = self.unscale_grads([p.grad for p in params if p.grad is not None])
        if found_inf:
            for p in params:
                p.grad = None
        return found_inf

    @torch.no_grad()
    def unscale_grads(self, grads) -> bool:
        """Divide `grads` by the scale in place and agree over the world whether any rank saw
        inf/NaN (then the scale backs off and the caller drops the step)."""
        inv = 1.0 / self.scale
        bad = 0.0
        for g in grads:
            g.mul_(inv)
            if not bool(torch.isfinite(g).all()):
                bad = 1.0
        agreed = self.world.allreduce_native(torch.tensor([bad], dtype=torch.float64), op="max")
        found_inf = bool(agreed[0] > 0)
        if found_inf:
            self.scale *= self.backoff
            self.clean_steps = 0
            self.skipped += 1
        else:
            self.clean_steps += 1
            if self.clean_steps >= self.interval and math.isfinite(self.scale * self.growth):
                self.scale *= self.growth
                self.clean_steps = 0
        return found_inf
