"""DataParallel: one replica of a module per data-parallel rank, kept identical.

At construction the replicas prove they have the same gradient layout, then take dp rank 0's
parameters and buffers. Each step their gradients are combined with our ring, bucketed and
overlapped with backward (buckets.py); in debug mode every N steps the replicas prove their
parameters are bit-identical. It attaches to a module rather than wrapping it, so state_dict
keys stay those of the single-process model.

The gradient convention (the same as ShardedOptimizer's and Pipeline's): each replica's loss is
a mean over its own samples, and after the sync every replica holds the gradient of the mean over
the GLOBAL batch -- each replica weighted by its share of it, so shards of different sizes (a
short last batch split 2/2/1/1) train exactly as one process would. The shares are counted from
the model's forward once backward runs through its output (samples.SampleCounter: a logging
forward without no_grad does not count; the samples run along `batch_dim` of the forward's first
tensor, 0 unless given, which a sequence-first RNN must be), with or without mpipar.batches; with several backward
passes a step (gradient accumulation) each pass must be split over the replicas like the whole
batch, or the sync refuses. A token-level loss -- a mean cross entropy / NLL over the output whose
targets hold ignored ones (padding) or that has class weights -- divides by counted targets, not
samples: a pass whose backward runs through one is weighed by that count (the output is a
samples.WatchedOutput that sees the loss), so the step is the mean over the global batch's counted
targets, as in one process. op='sum' instead sums: for callers that weight each replica's loss by
its share themselves (Pipeline does), e.g. a loss summed over tokens divided by the global count.

Refused with one line, because they would silently differ from one process: a gradient changed
between backward and the sync (clip_grad_norm_ on a replica's local gradient: call dp.finish(),
then clip), and BatchNorm normalising by the batch (training mode), which each replica would do
over its own shard alone (freeze it with .eval(), or local_batchnorm=True accepts that). Replicas
that drift apart (a scheduler fed each replica's own loss) are stopped at the next check: every
`check_every` syncs (100; 0: never) the parameters and reduced gradients must be bit-identical.

    dp = DataParallel(model, topo)                          # a Topology (its dp sub-world) or any World
    opt = dp.optimizer(torch.optim.SGD(model.parameters(), lr=0.1))   # step() syncs first
    loss.backward(); opt.step()
    # or by hand: loss.backward(); dp.finish(); opt.step()

A step of any optimizer over the module's parameters with gradients that were never synced is
refused with one line (a global optimizer step pre-hook), so a forgotten finish() cannot let the
replicas drift apart. `begin_step()` before backward lets buckets reduce while backward still
runs (overlap); without it, finish() reduces everything after backward. grad_compress='bf16'|
'fp16' sends float32 gradients across hosts as that type, summing in float32 (compress.py).
"""
from __future__ import annotations

import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch import nn

from ..errors import ConfigError
from .buckets import DEFAULT_BUCKET_MB, GradBuckets, check_identical
from .samples import SampleCounter
from .compress import wire_dtype
from .partitioned import is_partitioned


class UnsyncedGradientsError(ConfigError):
    """An optimizer was about to step on data-parallel gradients that were never synchronised."""


class DataParallel:
    def __init__(self, module: nn.Module, dp_world, bucket_mb: float = DEFAULT_BUCKET_MB,
                 op: str = "mean", check_every: int = 100, overlap: bool = True, background: bool = True,
                 algorithm: str = "auto", grad_compress: str | None = None, local_batchnorm: bool = False,
                 batch_dim: int | None = None):
        self.batchnorms = [] if local_batchnorm else [
            (name, m) for name, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.refuse_batch_statistics()
        if op not in ("mean", "sum"):
            raise ConfigError(f"DataParallel op={op!r}: 'mean' (each replica's loss a mean over its samples) "
                              f"or 'sum' (each replica's loss already weighted by its share of the global batch)")
        dp_world = getattr(dp_world, "dp_world", dp_world)   # a Topology: its replicas' World
        self.module, self.world, self.check_every = module, dp_world, check_every
        self.counter = counter = SampleCounter(module, batch_dim=batch_dim, losses=True) if op == "mean" else None
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad and not is_partitioned(p)]
        self.params = {id(p) for _, p in named}
        self.buckets = GradBuckets(dp_world, [p for _, p in named], bucket_mb, op, overlap,
                                   names=[n for n, _ in named], background=background, algorithm=algorithm,
                                   wire=wire_dtype(grad_compress),
                                   samples=counter.weights if counter else None)
        self.steps = 0
        self.wrapped = weakref.WeakKeyDictionary()   # optimizer -> self.steps when it last stepped
        broadcast_state(module, dp_world)
        watch(self)

    def describe(self) -> str:
        """Which all-reduce each gradient bucket runs, e.g. '3 bucket(s), 2.4 MiB: shm x3 over 2 ranks'."""
        from collections import Counter
        used = Counter(getattr(b.plan, "algorithm", "none") for b in self.buckets.buckets)
        nbytes = sum(b.flat.numel() * b.flat.element_size() for b in self.buckets.buckets)
        algos = ", ".join(f"{a} x{k}" for a, k in used.items())
        return f"{len(self.buckets.buckets)} bucket(s), {nbytes / 2**20:.1f} MiB: {algos} over {self.world.size} ranks"

    def optimizer(self, opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """`opt` itself, from now on syncing the gradients when it steps (unless finish() already
        did since its last step): data parallelism that cannot be half-used. Collective: every
        replica steps alike."""
        if not self._steps_on(opt):
            raise ConfigError(f"dp.optimizer({type(opt).__name__}): that optimizer steps none of the parameters "
                              f"of the module DataParallel keeps in sync; build it from model.parameters()")
        self.wrapped[opt] = self.steps
        return opt

    def refuse_batch_statistics(self) -> None:
        """BatchNorm normalising by the batch (training mode, or no running statistics) would use
        each replica's shard and let the running statistics drift apart: not what one process
        computes on the global batch. Checked at construction and at every sync (cheap)."""
        bn = next((f"{type(m).__name__} {name!r}" for name, m in self.batchnorms
                   if m.training or not m.track_running_stats), None)
        if bn is not None:
            raise ConfigError(
                f"DataParallel: {bn} normalises by the batch, which each replica would compute from "
                f"its own shard (running statistics drifting apart), unlike one process on the global batch: "
                f"use GroupNorm or LayerNorm, or freeze it with .eval(), or pass DataParallel(..., "
                f"local_batchnorm=True) to accept per-replica statistics")

    def begin_step(self, backward_passes: int = 1) -> None:
        """Call before the step's backward(s): `backward_passes` = micro-batches run backward
        (op 'mean': weight each micro-batch's mean loss by its share of this replica's samples,
        as gradient accumulation does in one process)."""
        self.buckets.begin_step(backward_passes)

    def finish(self, _hyper=None) -> None:
        """Call after backward, before optimizer.step(): gradients are then the global batch's
        mean (op 'mean'; 'sum': summed) on every replica. Collective."""
        self.refuse_batch_statistics()
        if not self.buckets.active:
            self.buckets.begin_step(1)
        rows = self.buckets.finish(_hyper[2] if _hyper else ())
        if _hyper:
            check_hyperparameters(self.world, *_hyper, rows)
        if self.counter:
            self.counter.reset()
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
        if self.counter:
            self.counter.remove()
        LIVE.discard(self)

    # -- before any optimizer's step ------------------------------------------------------------
    def _steps_on(self, opt) -> bool:
        return any(id(p) in self.params for group in opt.param_groups for p in group["params"])

    def before_step(self, opt) -> None:
        """A wrapped optimizer syncs first (its hyperparameters compared over the replicas in the
        same exchange); any step on gradients still unsynced is refused."""
        if opt in self.wrapped:
            if self.wrapped[opt] == self.steps:      # no finish() since its last step
                self.finish((opt, *hyperparameters(opt)))
            self.wrapped[opt] = self.steps
        elif self._steps_on(opt) and not self.buckets.unreduced:   # after the user's own dp.finish()
            check_hyperparameters(self.world, opt, *hyperparameters(opt), None)
        if self.buckets.unreduced and self._steps_on(opt):
            raise UnsyncedGradientsError(
                f"{type(opt).__name__}.step() would apply gradients that were never "
                f"synchronised over the {self.world.size} data-parallel replica(s) on {self.world.name}, so they "
                f"would drift apart: call dp.finish() after backward, or let the optimizer do it: "
                f"opt = dp.optimizer(torch.optim.{type(opt).__name__}(...))")


def hyperparameters(opt) -> tuple[list[str], list[float]]:
    """(names, values) of the numbers in an optimizer's param groups (lr, momentum, betas, ...)."""
    names, values = [], []
    for g, group in enumerate(opt.param_groups):
        for key in sorted(k for k in group if k != "params"):
            v = group[key]
            items = v if isinstance(v, (tuple, list)) else (v,)
            for j, x in enumerate(items):
                if isinstance(x, torch.Tensor) and x.numel() == 1:
                    x = x.item()
                if isinstance(x, (int, float)) and not isinstance(x, bool):
                    names.append(f"{key}{f'[{j}]' if len(items) > 1 else ''}" + (f" (group {g})" if g else ""))
                    values.append(float(x))
    return names, values


def check_hyperparameters(world, opt, names, values, rows) -> None:
    """Refuse replicas about to step with different hyperparameters (a scheduler fed each replica's
    own loss: ReduceLROnPlateau): the same reduced gradient would move them apart. `rows`: every
    replica's values (None: exchanged here, one small all-gather)."""
    if world.size == 1 or not values:
        return
    if rows is None:
        rows = world.allgather_floats(values)
    for r in range(1, world.size):
        differ = [i for i in range(len(values)) if rows[r, i] != rows[0, i]]
        if differ:
            i = differ[0]
            raise ConfigError(
                f"{type(opt).__name__}.step() on data-parallel replicas with different hyperparameters: "
                f"{names[i]}={rows[0, i]:g} on rank {world.world_rank_of(0)}, {rows[r, i]:g} on rank "
                f"{world.world_rank_of(r)}: every replica must step alike, or they drift apart: feed schedulers "
                f"the global loss (e.g. sched.step(loss_all_reduced)), not each replica's own")


LIVE: "weakref.WeakSet[DataParallel]" = weakref.WeakSet()
HOOK = []   # the global optimizer step pre-hook, registered with the first DataParallel


def watch(dp: DataParallel) -> None:
    """Every optimizer step in this process first passes the live DataParallels' before_step."""
    if not HOOK:
        HOOK.append(register_optimizer_step_pre_hook(before_any_step))
    LIVE.add(dp)


def before_any_step(opt, args, kwargs) -> None:
    for dp in list(LIVE):
        dp.before_step(opt)


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
