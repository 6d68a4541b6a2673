"""ZeRO stage 1 on our own reduce-scatter and all-gather: the optimizer state sharded over the
data-parallel replicas.

Plain data parallelism keeps the whole optimizer state on every replica (fp32 Adam: 8 of its 16
bytes per parameter). Here the replicas' parameters live in one flat vector; replica r owns
segment r of it (`segment_of`, the ring's layout). A step reduce-scatters the flat gradient
(each replica gets the sum over replicas of its segment), runs the optimizer on that segment
alone -- its state is 1/N of the whole -- and all-gathers the updated parameters. Parameters
and gradients stay whole (stage 1); per replica: 4 (params) + 4 (grads) + 8/N (Adam state)
bytes per parameter.

Only elementwise optimizers are sharded (their step on a slice equals the slice of their step);
others are refused with one line. Clipping by the global norm is exact in exact arithmetic:
the squared norms of the owned segments are summed over the replicas (and over `norm_worlds`,
e.g. the pipeline's other stages) before scaling.

    opt = ShardedOptimizer(model.parameters(), topo.dp_world, torch.optim.Adam, lr=1e-3)
    loss.backward()            # local gradients: replicas SUM them in step() (scale the loss)
    opt.step(clip=1.0)         # reduce-scatter, clip, step the owned segment, all-gather
    opt.zero_grad()
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from .reduce import all_gather, reduce_scatter, segment_of

ELEMENTWISE = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad,
               torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam)


class ShardedOptimizer:
    """`optimizer(shard, **kwargs)` stepping this replica's segment of the flat parameters."""

    def __init__(self, params, dp_world, optimizer=torch.optim.Adam, norm_worlds=(), **kwargs):
        if not (isinstance(optimizer, type) and issubclass(optimizer, ELEMENTWISE)):
            name = getattr(optimizer, "__name__", type(optimizer).__name__)
            raise ConfigError(f"ZeRO shards the optimizer state by segment, which needs an elementwise step; "
                              f"{name} is not one of {', '.join(c.__name__ for c in ELEMENTWISE)}")
        seen: set[int] = set()
        self.params = [p for p in params if p.requires_grad and not (id(p) in seen or seen.add(id(p)))]
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) != 1:
            raise ConfigError(f"ZeRO here keeps one flat vector: parameters must share a dtype, "
                              f"not {sorted(map(str, dtypes))}")
        self.world, self.norm_worlds = dp_world, tuple(norm_worlds)
        total = sum(p.numel() for p in self.params)
        self.flat = torch.zeros(total, dtype=self.params[0].dtype)
        self.grad = torch.zeros_like(self.flat)
        offset = 0
        with torch.no_grad():
            for p in self.params:          # the parameters become views of the flat vector
                n = p.numel()
                self.flat[offset:offset + n].copy_(p.detach().reshape(-1))
                p.data = self.flat[offset:offset + n].view_as(p)
                offset += n
        self.segment = segment_of(total, dp_world.size, dp_world.rank)
        a, b = self.segment
        self.shard = nn.Parameter(self.flat[a:b])      # shares the flat vector's storage
        self.inner = optimizer([self.shard], **kwargs)

    @classmethod
    def like(cls, optimizer, params, topo) -> "ShardedOptimizer":
        """The sharded twin of a built torch optimizer (its class and hyperparameters, one
        param group) over `topo`'s dp replicas; clipping sums norms over the pipeline too."""
        if isinstance(optimizer, cls):
            return optimizer
        if not isinstance(optimizer, torch.optim.Optimizer) or len(optimizer.param_groups) != 1:
            raise ConfigError(f"--zero 1 rebuilds the optimizer over a flat segment: it needs a torch optimizer "
                              f"with one param group, not {type(optimizer).__name__}")
        import inspect
        accepted = inspect.signature(type(optimizer)).parameters
        kwargs = {k: v for k, v in optimizer.param_groups[0].items() if k != "params" and k in accepted}
        return cls(params, topo.dp_world, type(optimizer), norm_worlds=(topo.pp_world,), **kwargs)

    # -- what a torch optimizer offers ----------------------------------------------------
    @property
    def param_groups(self):
        return self.inner.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None if set_to_none else (p.grad.zero_() if p.grad is not None else None)

    def describe(self) -> str:
        a, b = self.segment
        return (f"ZeRO stage 1 over {self.world.size} replicas: {type(self.inner).__name__} steps {b - a:,} of "
                f"{self.flat.numel():,} parameters here (its state 1/{self.world.size} of the whole); "
                f"gradients reduce-scattered, parameters all-gathered")

    def state_bytes(self) -> int:
        """Bytes of optimizer state this replica holds (tensors only)."""
        return sum(v.numel() * v.element_size() for s in self.inner.state.values() for v in s.values()
                   if isinstance(v, torch.Tensor) and v.dim() > 0)

    # -- the step ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, clip: float = 0.0) -> float:
        """Reduce-scatter the gradients (sum over replicas), clip by the global norm if `clip`,
        step the owned segment, all-gather the parameters. Returns the global gradient norm."""
        offset = 0
        for p in self.params:
            n = p.numel()
            if p.grad is None:
                self.grad[offset:offset + n].zero_()
            else:
                self.grad[offset:offset + n].copy_(p.grad.reshape(-1))
            offset += n
        mine = reduce_scatter(self.world, self.grad) if self.world.size > 1 else self.grad
        squares = torch.tensor([float(mine.double().pow(2).sum())], dtype=torch.float64)
        for w in (self.world, *self.norm_worlds):
            if w.size > 1:
                squares = w.allreduce_native(squares)
        norm = math.sqrt(float(squares[0]))
        if clip > 0 and norm > clip:
            mine.mul_(clip / (norm + 1e-6))
        self.shard.grad = mine
        self.inner.step()
        self.shard.grad = None
        if self.world.size > 1:
            all_gather(self.world, self.flat)
        return norm
