"""Gradient clipping by the norm of the FULL model's gradient under tensor parallelism: squares of
sharded gradients are all-reduced over tp, replicated ones (equal on every rank) counted once.

torch's own norm of a sharded gradient (clip_grad_norm_, get_total_norm, .norm()) sees only this
rank's slice, and each rank would clip by its own wrong norm: a sharded parameter's .grad is a
ShardedGrad, which refuses norms with one line naming clip_grad_norm_tp."""
from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from .sharding import tp_plan

NORMS = frozenset({torch.linalg.vector_norm, torch.linalg.norm, torch.linalg.matrix_norm, torch.norm,
                   torch.Tensor.norm, torch._foreach_norm})


class ShardedGradNormError(ConfigError):
    """A norm taken over this rank's slice of a tensor-parallel gradient as if it were the whole."""


class ShardedGrad(torch.Tensor):
    """The .grad of a parameter split over tp: to every operation a plain tensor (results are plain
    tensors: optimizers, data-parallel reduction, checkpoints), except norms, which are refused."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in NORMS:
            raise ShardedGradNormError(
                f"torch's {func.__name__} of a tensor-parallel parameter's gradient sees only this rank's shard "
                f"(torch.nn.utils.clip_grad_norm_ would clip each rank by its own wrong norm): clip with "
                f"mpipar.tensor.clip.clip_grad_norm_tp(model, max_norm, group) (after dp.finish() under "
                f"DataParallel), which sums the shards' squares over tp")
        return torch._C._disabled_torch_function_impl(func, types, args, kwargs or {})

    def __reduce_ex__(self, protocol):
        """Saved as the plain tensor it is (a weights-only load knows no ShardedGrad)."""
        return self.as_subclass(torch.Tensor).__reduce_ex__(protocol)


def refuse_local_norms(layer) -> None:
    """Make the gradients of `layer`'s sharded parameters ShardedGrads (tp > 1). Hooked at each
    forward, not once: to_empty() (meta init) and deepcopy make new parameters without hooks."""
    if layer.group.size > 1:
        layer.register_forward_pre_hook(_guard_sharded)


def _guard_sharded(layer, args) -> None:
    for name in layer.shard_rules:
        p = layer._parameters.get(name)
        if p is not None and "sharded_grad_hook" not in p.__dict__:
            p.sharded_grad_hook = p.register_post_accumulate_grad_hook(_as_sharded_grad)


def _as_sharded_grad(p: torch.Tensor) -> None:
    """In place (the same object: data parallelism's hooks keep it by identity)."""
    if type(p.grad) is torch.Tensor:
        p.grad.__class__ = ShardedGrad


def clip_grad_norm_tp(model, max_norm: float, group) -> float:
    """Scale grads by min(1, max_norm / (norm + 1e-6)) as torch's clip_grad_norm_; returns the norm."""
    sharded = set(tp_plan(model))
    split = torch.zeros(1, dtype=torch.float64)
    replicated = 0.0
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        sq = float(p.grad.detach().double().pow(2).sum())
        if name in sharded:
            split += sq
        else:
            replicated += sq
    norm = math.sqrt(float(group.all_reduce(split, "clip")[0]) + replicated)
    coef = min(1.0, max_norm / (norm + 1e-6))
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(coef)
    return norm
