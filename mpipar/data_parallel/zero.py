"""ZeRO stages 1, 2 and 3 on our own reduce-scatter and all-gather: the optimizer state (with
stage 2 the gradients too, with stage 3 the parameters as well: zero3.py) sharded over the
data-parallel replicas.

Plain data parallelism keeps the whole optimizer state on every replica (fp32 Adam: 8 of its 16
bytes per parameter). Here the replicas' parameters live in one flat vector; replica r owns
segment r of it (`segment_of`, the ring's layout). A step reduce-scatters the flat gradient
(each replica gets the sum over replicas of its segment), runs the optimizer on that segment
alone -- its state is 1/N of the whole -- and all-gathers the updated parameters. Stage 1:
parameters and gradients stay whole (the gradients are views of one flat vector, which backward
accumulates into); per replica 4 (params) + 4 (grads) + 8/N (Adam state) bytes per parameter.
Stage 2: no whole gradient is kept. Backward hands each bucket of parameters (contiguous in the
flat vector, the last layers first) to a reduce-scatter as soon as its gradients are final, and
the replica keeps only the part of the sum inside its own segment: 4 + 12/N bytes per parameter
at the step (a bucket's gradients while it is reduced on top). Buckets are reduced in one fixed
order on every replica; a bucket whose gradients are not all there yet (a parameter unused on
this replica) waits for the step, zeros standing in.

Only elementwise optimizers are sharded (their step on a slice equals the slice of their step);
others are refused with one line. The inner optimizer steps one piece of the segment per
parameter (views of it), so that a parameter no replica has a gradient for in a step (an
auxiliary head used every other step) gets .grad None and is skipped as torch skips it: no update,
its momentum, weight decay and step count untouched (the flags ride on the step's exchange; a
replica without a gradient where another has one counts as zeros). ShardedOptimizer is a torch
Optimizer whose param_groups are the inner one's: torch's LR schedulers drive its steps.

Clipping by the global norm is exact in exact arithmetic:
the squared norms of the owned segments are summed over the replicas (and over `norm_worlds`,
e.g. the pipeline's other stages) before scaling: clip with step(clip=...), not torch's
clip_grad_norm_, which is refused: every stage refuses a gradient changed in place between backward
and the step, and under stages 2 and 3 a .grad already reduced is a ReducedGrad (zero3.py) until the
step, which refuses any use (a None there would make torch's clip clip nothing).

The gradient convention is DataParallel's (wrapper.py): each replica's loss is a mean over its
own samples and the step uses the global batch's mean gradient, each replica weighted by its
share of the samples (op 'mean'; with several backward passes a step, each pass must split over
the replicas like the batch, or the step refuses: samples.checked_passes); a Pipeline's optimizer
sums (op 'sum'), as the Pipeline weights its micro-batches' losses by their share itself.

    opt = ShardedOptimizer(model, topo, torch.optim.Adam, stage=2, lr=1e-3)
    # stage 3: the model's children gathered one at a time (or units=[...])
    opt.zero_grad(); opt.begin_step(passes=1)   # stages 2, 3: backward passes before the gradients are final
    loss.backward()            # loss: a mean over this replica's samples
    opt.step(clip=1.0)         # (reduce-scatter,) weigh, clip, step the owned segment, all-gather
"""
from __future__ import annotations

import math
from collections import OrderedDict
from contextlib import nullcontext

import torch
from torch import nn

from ..errors import ConfigError
from .buckets import GradientWrites
from .samples import SampleCounter, checked_passes, pass_row
from .reduce import all_gather, reduce_scatter, segment_of
from .wrapper import broadcast_state, check_hyperparameters, hyperparameters
from .zero3 import ReducedGrad, ShardedParameters, collective, drop_reduced

BUCKET_MB = 25   # stage 2: gradients reduced per bucket of about this many MiB

ELEMENTWISE = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad,
               torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam)


def gathered(optimizer, write_back: bool = False):
    """A context in which every parameter the optimizer steps is whole: a stage-3 ShardedOptimizer
    gathers them (collective over its replicas; `write_back`: what is written into them becomes
    its segments); any other optimizer leaves them as they are."""
    return optimizer.gathered(write_back) if isinstance(optimizer, ShardedOptimizer) else nullcontext()


def state_layout(optimizer, kwargs, dtype) -> dict:
    """The state `optimizer` keeps per parameter, by one step of a probe (a vector of 2): its keys
    in torch's order, each a vector for a per-element one, else a value of its type -- what every
    replica needs to write a state_dict, whichever parameters it holds."""
    probe = torch.zeros(2, dtype=dtype, requires_grad=True)
    opt = optimizer([probe], **kwargs)
    probe.grad = torch.zeros_like(probe)
    opt.step()
    return dict(opt.state[probe])


class ShardedOptimizer(torch.optim.Optimizer):
    """`optimizer(pieces, **kwargs)` stepping this replica's segment of the flat parameters, one
    piece per parameter it holds a stretch of: torch's optimizer then skips, as unsharded, a
    parameter that no replica has a gradient for in a step (its state and step count untouched).
    A torch Optimizer to torch's LR schedulers: `param_groups` are the ones the step reads.

    `params`: the model (an nn.Module: stage 3's units default to its children) or its
    parameters; `dp_world`: a Topology (its dp replicas) or a World. `op`, the gradient
    convention, as DataParallel's: 'mean' -- each replica's loss is a mean over its own samples,
    counted from the forward of the model (or of units[0]; along `batch_dim`, as DataParallel),
    and the step uses the global batch's mean gradient, each replica weighted by its share (exact
    on uneven shards); the replicas then
    start from rank 0's weights. 'sum' -- each replica's loss is already weighted by its share
    of the global batch, as a Pipeline weights its micro-batches: gradients are summed (what
    Pipeline.make_optimizer and ShardedOptimizer.like build)."""

    def __init__(self, params, dp_world, optimizer=torch.optim.Adam, norm_worlds=(), stage: int = 1,
                 bucket_mb: float = BUCKET_MB, units=None, op: str = "mean", batch_dim: int | None = None,
                 **kwargs):
        if not (isinstance(optimizer, type) and issubclass(optimizer, ELEMENTWISE)):
            name = getattr(optimizer, "__name__", type(optimizer).__name__)
            raise ConfigError(f"ZeRO shards the optimizer state by segment, which needs an elementwise step; "
                              f"{name} is not one of {', '.join(c.__name__ for c in ELEMENTWISE)}")
        dp_world = getattr(dp_world, "dp_world", dp_world)     # a Topology: its replicas' World
        module = params if isinstance(params, nn.Module) else None
        if module is not None:
            params = module.parameters()
            if units is None and stage == 3:
                units = list(module.children()) or [module]
        if op not in ("mean", "sum"):
            raise ConfigError(f"ShardedOptimizer op={op!r}: 'mean' (each replica's loss a mean over its samples) "
                              f"or 'sum' (each replica's loss already weighted by its share of the global batch)")
        self.op, self.counter, self.count = op, None, None
        if op == "mean":
            if module is None and not units:
                raise ConfigError("ShardedOptimizer weights each replica's gradient by the samples its loss "
                                  "averaged, counted on the model's forward: pass the model itself "
                                  "(ShardedOptimizer(model, topo, ...)) or units=, or op='sum' if each replica's "
                                  "loss is already weighted by its share of the global batch")
            self.counter = (SampleCounter(module, batch_dim=batch_dim, losses=True) if module is not None
                            else SampleCounter(units[0], units[-1], batch_dim=batch_dim, losses=True))
            broadcast_state(module if module is not None else nn.ModuleList(units), dp_world)
        seen: set[int] = set()
        self.params = [p for p in params if p.requires_grad and not (id(p) in seen or seen.add(id(p)))]
        named = {id(p): n for n, p in module.named_parameters()} if module is not None else {}
        self.names = [named.get(id(p), f"parameter {i} {tuple(p.shape)}") for i, p in enumerate(self.params)]
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) != 1:
            raise ConfigError(f"ZeRO here keeps one flat vector: parameters must share a dtype, "
                              f"not {sorted(map(str, dtypes))}")
        if stage not in (1, 2, 3):
            raise ConfigError(f"ZeRO stage {stage}: stages 1 (optimizer state), 2 (+ gradients) and 3 (+ parameters)")
        if stage == 3 and units is None:
            raise ConfigError("ZeRO stage 3 gathers parameters one unit at a time: pass units= (e.g. the model's layers)")
        self.world, self.norm_worlds, self.stage = dp_world, tuple(norm_worlds), stage
        self.sharded = None
        if stage == 3:                         # the parameters themselves sharded (zero3.py)
            self.sharded = ShardedParameters(self.params, units, dp_world)
            self.sharded.scale = self._weight if self.weighted else None
            self.writes = self.sharded.writes
            self.flat = self.grad = None
            self.shard = nn.Parameter(self.sharded.data)
            self._inner(optimizer, kwargs)
            return
        total = sum(p.numel() for p in self.params)
        self.flat = torch.zeros(total, dtype=self.params[0].dtype)
        self.grad = torch.zeros_like(self.flat) if stage == 1 else None
        self.offsets = [0]                 # where each parameter starts in the flat vector
        for p in self.params[:-1]:
            self.offsets.append(self.offsets[-1] + p.numel())
        with torch.no_grad():
            for p, at in zip(self.params, self.offsets):   # the parameters become views of the flat vector
                self.flat[at:at + p.numel()].copy_(p.detach().reshape(-1))
                p.data = self.flat[at:at + p.numel()].view_as(p)
        self.segment = segment_of(total, dp_world.size, dp_world.rank)
        a, b = self.segment
        self.shard = nn.Parameter(self.flat[a:b])      # shares the flat vector's storage
        self.writes = GradientWrites()   # torch's clip_grad_norm_ before step() would clip a replica's own gradient
        if stage == 2:
            self._buckets(bucket_mb)
        else:
            self.hooks = [p.register_post_accumulate_grad_hook(lambda p, i=i: self._noted(i, p))
                          for i, p in enumerate(self.params)]
        self._inner(optimizer, kwargs)

    def _inner(self, optimizer, kwargs) -> None:
        """The optimizer of this replica's pieces (views of its shard; a replica holding none steps
        an empty stand-in for parameter 0), and what torch's LR schedulers need of an Optimizer."""
        self.pieces = self._pieces() or [(0, 0, 0, 0)]
        self.slices = [nn.Parameter(self.shard.data[lo:hi]) for _, _, lo, hi in self.pieces]
        self.inner = optimizer(self.slices, **kwargs)
        self.defaults = self.inner.defaults
        for hooks in ("step_pre", "step_post", "state_dict_pre", "state_dict_post", "load_state_dict_pre",
                      "load_state_dict_post"):
            setattr(self, f"_optimizer_{hooks}_hooks", OrderedDict())
        self._patch_step_function()
        self.layout = state_layout(optimizer, kwargs, self.shard.dtype)
        self.vectors = [k for k, v in self.layout.items() if isinstance(v, torch.Tensor) and v.dim() == 1]
        # which parameters had a gradient this step (backward's hooks, or .grad at the reduction),
        # and which keep a .grad across a zero_grad(set_to_none=False), as torch's do
        self.had = self.sharded.had if self.sharded is not None else [False] * len(self.params)
        self.touched, self.kept = [False] * len(self.params), [False] * len(self.params)
        self.zero_grad()

    def _noted(self, i: int, p: torch.Tensor) -> None:
        """Stage 1: backward accumulated into parameter i's gradient."""
        self.touched[i] = True
        self.writes.note(i, p.grad)

    def add_param_group(self, param_group) -> None:
        raise ConfigError("ShardedOptimizer flattens the parameters it was built with into one vector: it takes "
                          "no param group later; build it over all of them")

    @classmethod
    def like(cls, optimizer, params, topo, stage: int = 1, units=None) -> "ShardedOptimizer":
        """The sharded twin of a built torch optimizer (its class and hyperparameters, one
        param group) over `topo`'s dp replicas; clipping sums norms over the pipeline too.
        Stage 3 gathers the parameters of one of `units` (modules) at a time."""
        if isinstance(optimizer, cls):
            return optimizer
        if not isinstance(optimizer, torch.optim.Optimizer) or len(optimizer.param_groups) != 1:
            raise ConfigError(f"--zero {stage} rebuilds the optimizer over a flat segment: it needs a torch optimizer "
                              f"with one param group, not {type(optimizer).__name__}")
        import inspect
        accepted = inspect.signature(type(optimizer)).parameters
        kwargs = {k: v for k, v in optimizer.param_groups[0].items() if k != "params" and k in accepted}
        return cls(params, topo.dp_world, type(optimizer), norm_worlds=(topo.pp_world,), stage=stage, units=units,
                   op="sum", **kwargs)

    # -- what a torch optimizer offers ----------------------------------------------------
    @property
    def param_groups(self):
        return self.inner.param_groups

    @property
    def weighted(self) -> bool:
        """op 'mean' over several replicas: gradients are weighted by their sample counts."""
        return self.counter is not None and self.world.size > 1

    def _weight(self) -> float:
        """This replica's weight this step, its samples or the targets its token-level loss counted
        (samples.py; read once a step: every reduction weighs the same)."""
        if self.count is None:
            self.count = sum(self.counter.weights())
        return self.count

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Stage 1: each .grad becomes a zeroed view of the flat gradient (backward accumulates
        into it in place). Stages 2, 3: .grad None, the owned sum zeroed. Either way a parameter
        counts as without a gradient until backward reaches it, unless `set_to_none` is False
        and it had one before (torch's zeroed .grad, which steps). The samples counted start
        again (a step skipped after backward leaves its own behind)."""
        self.count = None
        self.touched = [False] * len(self.params)
        if set_to_none:
            self.kept = [False] * len(self.params)
        if self.counter is not None:
            self.counter.reset()
        if self.stage == 1:
            self.grad.zero_()
            for p, at in zip(self.params, self.offsets):
                p.grad = self.grad[at:at + p.numel()].view_as(p)
        else:
            for p in self.params:
                p.grad = None
            (self.owned if self.stage == 2 else self.sharded.grad).zero_()
            self.begin_step(self.passes if self.stage == 2 else self.sharded.passes)

    # -- stage 2: buckets reduced during backward -------------------------------------------
    def _buckets(self, bucket_mb: float) -> None:
        """Buckets of consecutive parameters, the last ones first (backward's order)."""
        a, b = self.segment
        self.owned = torch.zeros(b - a, dtype=self.flat.dtype)    # this replica's summed gradient segment
        limit = int(bucket_mb * 2 ** 20)
        self.buckets: list[list[int]] = []
        size = 0
        for i in reversed(range(len(self.params))):
            nbytes = self.params[i].numel() * self.params[i].element_size()
            if not self.buckets or (size + nbytes > limit and self.buckets[-1]):
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(i)
            size += nbytes
        self.bucket_of = {i: k for k, members in enumerate(self.buckets) for i in members}
        self.reduced = [ReducedGrad(p) for p in self.params]     # .grad once reduced, until the step
        # each bucket's range [lo, hi) of the flat vector, and every replica's segment within it
        segments = [segment_of(self.flat.numel(), self.world.size, j) for j in range(self.world.size)]
        self.spans = []
        for members in self.buckets:
            lo = self.offsets[members[-1]]
            hi = self.offsets[members[0]] + self.params[members[0]].numel()
            self.spans.append((lo, hi, [(min(max(s0, lo), hi) - lo, max(min(s1, hi), lo) - lo) for s0, s1 in segments]))
        self.passes = 1
        self.hooks = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(self.params)]

    def begin_step(self, passes: int = 1) -> None:
        """Stages 2, 3: each parameter's gradient is final after `passes` backward passes (micro-batches)."""
        if self.stage == 3:
            self.sharded.begin_step(passes)
        if self.stage != 2:
            return
        self.passes = max(1, int(passes))
        self.seen = [0] * len(self.params)
        self.waiting = [set(m) for m in self.buckets]
        self.next_bucket = 0
        self.writes.clear()
        drop_reduced(self.params)

    def _hook(self, i: int):
        def on_grad(p: torch.Tensor) -> None:
            self.seen[i] += 1
            self.writes.note(i, p.grad)
            if self.seen[i] == self.passes:
                self.waiting[self.bucket_of[i]].discard(i)
                while self.next_bucket < len(self.buckets) and not self.waiting[self.next_bucket]:
                    self._reduce(self.next_bucket)
        return on_grad

    def _reduce(self, k: int) -> None:
        """Sum bucket k over the replicas and keep the part inside this replica's segment."""
        lo, hi, bounds = self.spans[k]
        scratch = torch.zeros(hi - lo, dtype=self.flat.dtype)
        for i in self.buckets[k]:
            p = self.params[i]
            self.had[i] = p.grad is not None
            if p.grad is not None:
                scratch[self.offsets[i] - lo:self.offsets[i] - lo + p.numel()].copy_(p.grad.reshape(-1))
            p.grad = self.reduced[i]              # its memory goes back now, not at the step
            self.writes.grads.pop(i, None)
        if self.weighted:
            scratch.mul_(self._weight())
        a, b = self.segment
        x, y = max(a, lo), min(b, hi)
        if self.world.size > 1:
            reduce_scatter(self.world, scratch, "sum", bounds=bounds)
        if x < y:
            self.owned[x - a:y - a].add_(scratch[x - lo:y - lo])
        self.next_bucket = k + 1

    # -- checkpoints: the same layout as an unsharded optimizer's --------------------------------
    def _whole(self, mine: torch.Tensor) -> list[torch.Tensor]:
        """Per parameter, the whole of a per-element quantity of which this replica holds
        `mine` (laid out like its shard); collective over the replicas."""
        if self.sharded is not None:
            return self.sharded.whole(mine)
        whole = torch.zeros(self.flat.numel(), dtype=mine.dtype)
        whole[self.segment[0]:self.segment[1]] = mine
        if self.world.size > 1:
            all_gather(self.world, whole)
        return [whole[at:at + p.numel()].view_as(p) for p, at in zip(self.params, self.offsets)]

    def state_dict(self) -> dict:
        """torch's optimizer state_dict for the whole parameter list, as if unsharded (collective
        over the replicas: every segment's state is all-gathered, and each parameter's scalars,
        e.g. Adam's step, come from a replica holding a piece of it). A parameter no step has had
        a gradient for has no state, as in torch. A checkpoint written from it resumes on any
        number of replicas, with or without ZeRO."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        n = len(self.params)
        numbers = [k for k, v in self.layout.items()
                   if k not in self.vectors and isinstance(v, (torch.Tensor, int, float))]
        row = [0.0] * (n * (1 + len(numbers)))      # per parameter: has state, then each number
        vectors = {key: torch.zeros(self.shard.numel(), dtype=self.shard.dtype) for key in self.vectors}
        for (i, _, lo, hi), piece in zip(self.pieces, self.slices):
            st = self.inner.state.get(piece)
            if st:
                row[i] = 1.0
                for j, key in enumerate(numbers):
                    row[(1 + j) * n + i] = float(st[key])
                for key, vector in vectors.items():
                    vector[lo:hi] = st[key]
        with collective(self.world, "ShardedOptimizer.state_dict()"):
            rows = self.world.allgather_floats(row) if self.world.size > 1 else [row]
            whole = {key: self._whole(vector) for key, vector in vectors.items()}
        state = {}
        for i in range(n):
            holder = next((r for r in rows if r[i]), None)
            if holder is None:
                continue
            state[i] = {}
            for key, like in self.layout.items():
                if key in whole:
                    state[i][key] = whole[key][i].clone()
                elif key in numbers:
                    value = holder[(1 + numbers.index(key)) * n + i]
                    state[i][key] = (torch.tensor(value, dtype=like.dtype) if isinstance(like, torch.Tensor)
                                     else type(like)(value))
                else:
                    state[i][key] = like
        group = {k: v for k, v in self.inner.param_groups[0].items() if k != "params"}
        sd = {"state": state, "param_groups": [{**group, "params": list(range(n))}]}
        for hook in self._optimizer_state_dict_post_hooks.values():
            sd = hook(self, sd) or sd
        return sd

    def load_state_dict(self, sd: dict) -> None:
        """The inverse of state_dict: each piece keeps its stretch of its parameter's per-element state."""
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            sd = hook(self, sd) or sd
        group = {k: v for k, v in sd["param_groups"][0].items() if k != "params"}
        state = {}
        for k, (i, start, lo, hi) in enumerate(self.pieces):
            st = sd["state"].get(i)
            if st:     # each piece its own copy of the scalars (Adam's step counts in place)
                state[k] = {key: (v.reshape(-1)[start:start + hi - lo].clone()
                                  if isinstance(v, torch.Tensor) and v.dim() and v.shape == self.params[i].shape
                                  else v.clone() if isinstance(v, torch.Tensor) else v) for key, v in st.items()}
        groups = [{**group, "params": list(range(len(self.pieces)))}]
        self.inner.load_state_dict({"state": state, "param_groups": groups})
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _pieces(self) -> list[tuple[int, int, int, int]]:
        """(parameter index, where in the flattened parameter, lo, hi): the stretches [lo, hi)
        of this replica's shard vector, each inside one parameter."""
        out = []
        if self.sharded is not None:
            z = self.sharded
            for u, members in enumerate(z.members):
                a, b = z.segments[u]
                for i in members:
                    x, y = max(a, z.offset[i]), min(b, z.offset[i] + self.params[i].numel())
                    if x < y:
                        out.append((i, x - z.offset[i], z.at[u] + x - a, z.at[u] + y - a))
            return out
        a, b = self.segment
        for i, (p, at) in enumerate(zip(self.params, self.offsets)):
            x, y = max(a, at), min(b, at + p.numel())
            if x < y:
                out.append((i, x - at, x - a, y - a))
        return out

    def shard_state(self, names: list[str]) -> dict:
        """This replica's part of the parameters and of the optimizer state, by parameter name,
        without any communication: {"params": {name: [start, values]}, "state": {name: {key:
        [start, values] or a scalar}}, "shapes": {name: shape}, "groups": hyperparameters}.
        A checkpoint stores these from every replica; checkpoint/restart.merge_shards puts them
        back together."""
        params, state = {}, {}
        for (i, start, lo, hi), piece in zip(self.pieces, self.slices):
            if lo == hi:
                continue            # the stand-in of a replica holding no piece
            params[names[i]] = [start, self.shard.detach()[lo:hi]]
            state[names[i]] = {k: ([start, v] if k in self.vectors else v)
                               for k, v in self.inner.state.get(piece, {}).items()}
        group = {k: v for k, v in self.inner.param_groups[0].items() if k != "params"}
        return {"params": params, "state": state, "groups": [{**group, "params": list(names)}],
                "shapes": {names[i]: list(p.shape) for i, p in enumerate(self.params)}}

    def gathered(self, write_back: bool = False):
        """A context in which every parameter is whole (stage 3 gathers them: collective, every
        replica calls it; `write_back` keeps what was written into them); stages 1, 2: always
        whole. A model.state_dict() taken inside stays valid after the block (saves and loads)."""
        return self.sharded.gathered(write_back) if self.sharded is not None else nullcontext()

    def describe(self) -> str:
        if self.sharded is not None:
            return (f"ZeRO stage 3 over {self.world.size} replicas: {type(self.inner).__name__} steps {self.shard.numel():,} "
                    f"of {sum(p.numel() for p in self.params):,} parameters here, which are all this replica keeps "
                    f"between uses; each of {len(self.sharded.members)} unit(s) all-gathered before its forward and "
                    f"its backward and freed after; gradients reduce-scattered per unit")
        a, b = self.segment
        kept = "whole" if self.stage == 1 else f"only this segment's ({len(self.buckets)} bucket(s) reduced in backward)"
        return (f"ZeRO stage {self.stage} over {self.world.size} replicas: {type(self.inner).__name__} steps {b - a:,} "
                f"of {self.flat.numel():,} parameters here (its state 1/{self.world.size} of the whole); gradients "
                f"reduce-scattered, kept {kept}; parameters all-gathered")

    def held(self) -> list[torch.Tensor]:
        """The tensors this optimizer keeps besides the parameters' and its inner optimizer's."""
        if self.sharded is not None:
            return [self.sharded.data, self.sharded.grad, *self.sharded.full]
        return [t for t in (self.flat, self.grad, getattr(self, "owned", None)) if t is not None]

    def state_bytes(self) -> int:
        """Bytes of optimizer state this replica holds (tensors only)."""
        return sum(v.numel() * v.element_size() for s in self.inner.state.values() for v in s.values()
                   if isinstance(v, torch.Tensor) and v.dim() > 0)

    # -- the step ---------------------------------------------------------------------------
    @torch.no_grad()
    def gradients(self) -> list[torch.Tensor]:
        """The gradient this replica holds for the step, once the reductions backward left are
        done: stages 2, 3 its segment of the sum over the replicas; stage 1 its own whole
        gradient (summed at the step). What a loss scaler unscales and checks for inf."""
        self.writes.check(self.params, self.names.__getitem__, "clip with opt.step(clip=...) instead")
        if self.stage == 3:
            return [self.sharded.finish()]
        if self.stage == 2:
            while self.next_bucket < len(self.buckets):     # buckets backward left incomplete, in order
                self._reduce(self.next_bucket)
            return [self.owned]
        for i, (p, at) in enumerate(zip(self.params, self.offsets)):
            dst = self.grad[at:at + p.numel()]
            ours = p.grad is not None and p.grad.data_ptr() == dst.data_ptr()
            self.had[i] = p.grad is not None and (self.touched[i] or not ours)
            if p.grad is None:
                dst.zero_()
            elif not ours:
                dst.copy_(p.grad.reshape(-1))
        return [self.grad]

    def _check_reduced(self) -> None:
        """Stages 2, 3 at the step: every gradient went into a reduction, weighed by the samples of
        the whole step; then .grad is None again."""
        stray = next((i for i, p in enumerate(self.params)
                      if p.grad is not None and not isinstance(p.grad, ReducedGrad)), None)
        if stray is not None:
            raise ConfigError(
                f"ShardedOptimizer stage {self.stage}: {self.names[stray]} has a gradient that no reduction took: "
                f"backward ran after this step's reductions were done (no opt.zero_grad() since the last step, "
                f"which arms them): call opt.zero_grad() before each step's backward")
        if self.weighted and self.count is not None and self.count != sum(self.counter.weights()):
            raise ConfigError(
                f"ShardedOptimizer stage {self.stage} weighed this replica's gradients by its {self.count:g} samples "
                f"counted when backward reduced the first of them, but the step had {sum(self.counter.weights()):g}: its backward "
                f"passes ran in rounds of opt.begin_step(...); declare them all before the first: "
                f"opt.begin_step(passes)")
        drop_reduced(self.params)

    def skip_step(self) -> None:
        """The next step() changes nothing (a loss scaler found inf on some rank: every rank skips)."""
        self.skipping = True

    @torch.no_grad()
    def step(self, clip: float = 0.0) -> float:
        """Reduce-scatter the gradients (sum over replicas; stages 2, 3: the buckets backward
        left), clip by the global norm if `clip`, step the owned segment, all-gather the
        parameters (stage 3: gathered when used). Afterwards .grad holds nothing meaningful
        (stages 2, 3: None) until zero_grad. Refused (one line): passes that split over the
        replicas unlike the batch (op 'mean', samples.checked_passes), and under stages 2 and 3
        a gradient backward wrote after the reductions were done (_check_reduced). Returns the
        global norm (nan when skipped: skip_step)."""
        grad = self.gradients()[0]
        if self.stage != 1:
            self._check_reduced()
        count, self.count = (self._weight() if self.weighted else 0), None
        passes = self.counter.weights() if self.counter is not None else []
        if self.counter is not None:
            self.counter.reset()
        if getattr(self, "skipping", False):
            self.skipping = False
            return float("nan")
        if self.stage == 1 and self.weighted:        # stages 2, 3 weighed theirs when reducing them
            grad.mul_(count)
        mine = reduce_scatter(self.world, grad) if self.stage == 1 and self.world.size > 1 else grad
        square = float(mine.double().pow(2).sum())
        had = [float(h or k) for h, k in zip(self.had, self.kept)]   # on some replica: the others' count as 0
        names, values = hyperparameters(self.inner)   # every replica must step with the same ones
        if self.weighted:                            # the sum of n_r x gradient, over N
            row = pass_row(passes)
            rows = self.world.allgather_floats(row + [square] + had + values)
            total = checked_passes(rows[:, :len(row)], self.world, "ShardedOptimizer")
            check_hyperparameters(self.world, self.inner, names, values, rows[:, len(row) + 1 + len(had):])
            mine.div_(total)
            square = float(rows[:, len(row)].sum()) / total ** 2
            had = rows[:, len(row) + 1:len(row) + 1 + len(had)].sum(axis=0)
        elif self.world.size > 1:
            check_hyperparameters(self.world, self.inner, names, values, None)
            got = self.world.allreduce_native(torch.tensor([square] + had, dtype=torch.float64))
            square, had = float(got[0]), got[1:]
        self.kept = [bool(h) for h in had]
        squares = torch.tensor([square], dtype=torch.float64)
        for w in self.norm_worlds:
            if w.size > 1:
                squares = w.allreduce_native(squares)
        norm = math.sqrt(float(squares[0]))
        if clip > 0 and norm > clip:
            mine.mul_(clip / (norm + 1e-6))
        for (i, _, lo, hi), piece in zip(self.pieces, self.slices):   # None: torch's optimizer skips it
            piece.grad = mine[lo:hi] if self.kept[i] else None
        self.inner.step()
        for piece in self.slices:
            piece.grad = None
        if self.world.size > 1 and self.stage != 3:      # stage 3 gathers a unit when it is used
            all_gather(self.world, self.flat)
        return norm
