"""Sample counts: the weights of op 'mean', the gradient convention of DataParallel and
ShardedOptimizer in a user's loop. A replica whose loss averaged n_r of the global batch's N
samples contributes n_r/N of its gradient; its gradient is scaled by n_r before the sum and the
sum divided by N after, so N (one small exchange) is needed only once the reduction is done.
SampleCounter counts n_r per backward pass on the model's forward; checked_passes finds N and
refuses what weighing by n_r cannot make exact.

A token-level loss is a mean over counted targets, not samples: F.cross_entropy(out.reshape(-1, V),
y.reshape(-1), ignore_index=PAD) divides by this replica's non-PAD tokens (with class weights: their
weights' sum). With `losses=True` the model's output is a WatchedOutput, so that such a mean-reduced
cross_entropy / nll_loss computed from it is seen, and a pass whose backward runs through one weighs
by the count that loss divided by instead of by samples: exact as the mean over the global batch's
counted targets. A loss built in a way it cannot see is weighed by samples."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch.nn import _reduction

from ..errors import ConfigError

LOSSES = (F.cross_entropy, F.nll_loss)     # nn.CrossEntropyLoss / NLLLoss call these
NO_WRAP = torch.overrides.get_default_nowrap_functions()


def output_tensors(out) -> list[torch.Tensor]:
    """The tensors in a forward's output (a tensor, or tuples, lists and dicts of them)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in output_tensors(o)]
    return []


class WatchedOutput(torch.Tensor):
    """A model's output (and everything computed from it) that tells `counter` of a mean cross
    entropy / NLL taken on it; that loss itself, and all it reads as, is a plain tensor."""
    counter: "SampleCounter"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        if func in LOSSES:
            cls.on_loss(func, args, kwargs, out)
            return out
        return out if func in NO_WRAP else torch._tensor._convert(out, cls)

    @classmethod
    def on_loss(cls, func, args, kwargs, loss: torch.Tensor) -> None:
        """A cross entropy / NLL was taken on the output: its count goes to the counter."""
        cls.counter.note_loss(args, kwargs, loss)

    def plain(self) -> torch.Tensor:
        with torch._C.DisableTorchFunctionSubclass():
            return self.as_subclass(torch.Tensor)

    def __repr__(self, **kwargs) -> str:
        return repr(self.plain())

    def __format__(self, spec: str) -> str:
        return format(self.plain(), spec)

    def __reduce_ex__(self, protocol):     # torch.save / pickle: a plain tensor (weights_only loads it)
        return self.plain().__reduce_ex__(protocol)


def loss_count(args, kwargs) -> tuple[torch.Tensor, bool] | None:
    """What a mean-reduced cross_entropy / nll_loss call divides by, and whether that differs from
    its targets' number (ignored targets or class weights); None if it is not such a call."""
    target = args[1] if len(args) > 1 else kwargs.get("target")
    reduction = kwargs.get("reduction", "mean")
    if kwargs.get("size_average") is not None or kwargs.get("reduce") is not None:
        reduction = _reduction.legacy_get_string(kwargs.get("size_average"), kwargs.get("reduce"), emit_warning=False)
    if reduction != "mean" or not isinstance(target, torch.Tensor) or target.is_floating_point():
        return None                        # a sum, or class probabilities: a mean over samples
    counted = target != kwargs.get("ignore_index", -100)
    weight = kwargs.get("weight")
    if weight is not None:
        return weight[target[counted]].sum(), True
    count = counted.sum()
    return count, count != target.numel()


class SampleCounter:
    """Samples `module`'s forward has seen since the last reset, per backward pass (`passes`): the
    leading dimension of its first tensor argument, counted when backward reaches the output of
    `last` (default: the module; ZeRO's units: the last one, where backward starts), so a forward
    never backpropagated (evaluation, logging, no_grad) does not count. Forwards backpropagated
    by the same backward call count as one pass. `batch_dim`: the dimension of that argument
    that runs over samples (None: 0, refused for a module holding a sequence-first RNN, whose
    input is (time, batch, ...): the count would be the sequence length). `losses`: the output is
    a WatchedOutput and `weights()` the counts of the token-level losses seen (module docstring)."""

    def __init__(self, module: torch.nn.Module, last: torch.nn.Module | None = None, batch_dim: int | None = None,
                 losses: bool = False):
        if batch_dim is None:
            rnn = next((name for name, m in module.named_modules()
                        if isinstance(m, torch.nn.RNNBase) and not m.batch_first), None)
            if rnn is not None:
                raise ConfigError(
                    f"{type(module).__name__} holds {rnn or 'an RNN'} with batch_first=False, whose input runs "
                    f"over time first; the data-parallel weighting counts each replica's samples along one "
                    f"dimension of the model's first input: pass batch_dim=1 (or 0 if that input is batch-first), "
                    f"or build the RNN with batch_first=True")
            batch_dim = 0
        self.batch_dim = batch_dim
        self.passes: list[int] = []
        self.tasks: list[int] = []        # the autograd graph task (backward call) of each pass
        self.losses: dict[int, list] = {}  # graph task -> (count, differs from targets) of each loss it ran through
        self.output_type = type("DataParallelOutput", (WatchedOutput,), {"counter": self}) if losses else None
        self.pending = None               # samples of the forward under way
        self.hooks = [module.register_forward_pre_hook(self._note, with_kwargs=True),
                      (last or module).register_forward_hook(self._watch)]

    @property
    def n(self) -> int:
        return sum(self.passes)

    def _note(self, module, args, kwargs) -> None:
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        self.pending = None if first is None else int(first.shape[self.batch_dim]) if first.dim() > self.batch_dim else 1

    def _watch(self, module, args, output) -> None:
        outs = [t for t in output_tensors(output) if t.requires_grad]
        if self.pending is None or not outs:
            return None
        n, counted, self.pending = self.pending, set(), None

        def on_grad(grad):
            task = torch._C._current_graph_task_id()
            if task not in counted:           # once per backward call, whichever output it reaches
                counted.add(task)
                self._add(n, task)
        for t in outs:
            t.register_hook(on_grad)
        if self.output_type is None:
            return None
        if isinstance(output, torch.Tensor):
            return output.as_subclass(self.output_type)
        if type(output) in (tuple, list):
            return type(output)(o.as_subclass(self.output_type) if isinstance(o, torch.Tensor) else o for o in output)
        return None                       # a dict or other container: its losses are not seen

    def _add(self, n: int, task: int) -> None:
        if self.tasks and task == self.tasks[-1]:
            self.passes[-1] += n
        else:
            self.passes.append(n)
            self.tasks.append(task)

    def note_loss(self, args, kwargs, loss: torch.Tensor) -> None:
        """A loss on the output: its count is noted for the backward call that runs through it."""
        count = loss_count(args, kwargs)
        if count is None or not loss.requires_grad:
            return
        loss.register_hook(lambda grad: self.losses.setdefault(torch._C._current_graph_task_id(), []).append(count))

    def weights(self) -> list[float]:
        """Each backward pass's weight: the count its token-level loss divided by (several such
        losses: the same count, or none differing from its targets' number), else its samples."""
        out = []
        for n, task in zip(self.passes, self.tasks):
            seen = self.losses.get(task, [])
            counts = {float(c) for c, _ in seen}
            if len(counts) == 1:
                out.append(counts.pop())
            elif any(bool(differs) for _, differs in seen):
                raise ConfigError(
                    f"DataParallel: one backward pass ran through {len(seen)} cross entropy / NLL losses that "
                    f"average over different counts of targets ({', '.join(f'{c:g}' for c in sorted(counts))}; "
                    f"ignored targets or class weights), so no one weight per replica can equal one process: "
                    f"pass DataParallel(..., op='sum') and divide each loss's sum (reduction='sum') by its "
                    f"global count (all-reduced)")
            else:
                out.append(n)
        return out

    def reset(self) -> None:
        self.passes, self.tasks, self.losses = [], [], {}

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def checked_total(total: float, who: str) -> float:
    """The global batch's sample count, which op 'mean' divides by; none at all is a usage error."""
    if total <= 0:
        raise ConfigError(
            f"{who} saw no samples on any replica this step, so it cannot weight their gradients: it counts "
            f"the leading dimension of the first tensor passed to the model's forward, once backward runs "
            f"through its output, since the last sync; run the forward through that model, and sync once "
            f"per step (or pass op='sum' and weight each replica's loss by its share of the global batch yourself)")
    return total


PASSES_SENT = 8   # pass counts each replica shares at the sync (the first ones; zero-padded)


def pass_row(passes: Sequence[int]) -> list[float]:
    """What a replica shares at the sync: its samples, its backward passes, the first passes' samples."""
    head = list(passes[:PASSES_SENT])
    return [float(sum(passes)), float(len(passes))] + [float(k) for k in head] + [0.0] * (PASSES_SENT - len(head))


def checked_passes(rows, world, who: str) -> float:
    """The global batch's sample count N from every replica's pass_row, once the weights n_r/N are
    exact: with several backward passes a step, only if each pass is split over the replicas in
    proportion to their samples (n_rp * N == n_r * B_p: rank r's samples in pass p, B_p the pass's
    global count), as gradient accumulation in one process weighs the passes."""
    total = checked_total(float(rows[:, 0].sum()), who)
    used = [r for r in range(len(rows)) if rows[r, 0] > 0]        # a replica with no samples weighs 0
    counts = {int(rows[r, 1]) for r in used}
    fix = ("or pass op='sum' and weight each pass's loss by its share of the global batch yourself "
           "(len(y_pass) / global batch size)")
    if len(counts) > 1:
        raise ConfigError(
            f"{who}: the replicas ran different numbers of backward passes this step "
            f"({', '.join(f'rank {world.world_rank_of(r)}: {int(rows[r, 1])}' for r in used)}), so their samples "
            f"cannot be weighed per pass: run the same passes on every replica (an empty shard still runs them), {fix}")
    p_n = min(counts.pop(), PASSES_SENT) if counts else 0
    shares = rows[:, 2:2 + p_n]
    global_pass = shares.sum(axis=0)
    for r in used:
        for p in range(p_n):
            if shares[r, p] * total != rows[r, 0] * global_pass[p]:
                raise ConfigError(
                    f"{who}: backward pass {p + 1} of this step covered {int(shares[r, p])} of rank "
                    f"{world.world_rank_of(r)}'s {int(rows[r, 0])} samples but {int(global_pass[p])} of the "
                    f"global batch's {int(total)}, so weighing each replica by its samples cannot equal "
                    f"one process's gradient accumulation: split every pass over the replicas like the "
                    f"whole batch (even passes), {fix}")
    return total
