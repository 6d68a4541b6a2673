"""DataParallel: one replica of a module per data-parallel rank, kept identical.

At construction the replicas prove they have the same gradient layout, then take dp rank 0's
parameters and buffers. Each step, gradients are averaged (or summed) with our ring, bucketed
and overlapped with backward (buckets.py); in debug mode every N steps the replicas prove their
parameters are bit-identical. It attaches to a module rather than wrapping it, so state_dict
keys stay those of the single-process model.

    dp = DataParallel(model, topo)          # a Topology (its dp sub-world) or any World
    loss.backward(); dp.finish(); opt.step()

`begin_step()` before backward lets buckets reduce while backward still runs (overlap);
without it, finish() reduces everything after backward. grad_compress='bf16'|'fp16' sends
float32 gradients across hosts as that type, summing in float32 (compress.py; one host: no-op).
A Pipeline on a grid with dp > 1 makes its own (summing gradients of losses weighted by the
global batch: exact for uneven shards).
"""
from __future__ import annotations

import torch
from torch import nn

from .buckets import DEFAULT_BUCKET_MB, GradBuckets, check_identical
from .compress import wire_dtype
from .partitioned import is_partitioned


class DataParallel:
    def __init__(self, module: nn.Module, dp_world, bucket_mb: float = DEFAULT_BUCKET_MB,
                 op: str = "avg", check_every: int = 0, overlap: bool = True, background: bool = True,
                 algorithm: str = "auto", grad_compress: str | None = None):
        dp_world = getattr(dp_world, "dp_world", dp_world)   # a Topology: its replicas' World
        self.module, self.world, self.check_every = module, dp_world, check_every
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad and not is_partitioned(p)]
        self.buckets = GradBuckets(dp_world, [p for _, p in named], bucket_mb, op, overlap,
                                   names=[n for n, _ in named], background=background, algorithm=algorithm,
                                   wire=wire_dtype(grad_compress))
        self.steps = 0
        broadcast_state(module, dp_world)

    def describe(self) -> str:
        """Which all-reduce each gradient bucket runs, e.g. '3 bucket(s), 2.4 MiB: shm x3 over 2 ranks'."""
        from collections import Counter
        used = Counter(getattr(b.plan, "algorithm", "none") for b in self.buckets.buckets)
        nbytes = sum(b.flat.numel() * b.flat.element_size() for b in self.buckets.buckets)
        algos = ", ".join(f"{a} x{k}" for a, k in used.items())
        return f"{len(self.buckets.buckets)} bucket(s), {nbytes / 2**20:.1f} MiB: {algos} over {self.world.size} ranks"

    def begin_step(self, backward_passes: int = 1) -> None:
        """Call before the step's backward(s): `backward_passes` = micro-batches run backward."""
        self.buckets.begin_step(backward_passes)

    def finish(self) -> None:
        """Call after backward, before optimizer.step(): gradients are then reduced everywhere."""
        if not self.buckets.active:
            self.buckets.begin_step(1)
        self.buckets.finish()
        if self.check_every and self.steps % self.check_every == 0:
            self.check_replicas()
        self.steps += 1

    def check_replicas(self) -> None:
        """Raise ReplicaMismatchError unless parameters and reduced gradients are bit-identical."""
        params = [p for p in self.module.parameters() if not is_partitioned(p)]
        check_identical(self.world, params, f"parameters before step {self.steps}")
        grads = [p.grad for p in params if p.grad is not None]
        check_identical(self.world, grads, f"reduced gradients of step {self.steps}")

    def remove(self) -> None:
        self.buckets.remove()


@torch.no_grad()
def broadcast_state(module: nn.Module, world, root: int = 0) -> None:
    """Every parameter and buffer takes rank `root`'s values (same shapes checked beforehand)."""
    if world.size == 1:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        if is_partitioned(t):     # each rank holds its own rows (partitioned.py)
            continue
        if t.is_contiguous():
            world.bcast_(t.data, root)
        else:
            tmp = t.data.contiguous()
            t.data.copy_(world.bcast_(tmp, root))
