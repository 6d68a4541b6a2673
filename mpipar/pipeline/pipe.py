"""Pipeline: this rank's share of a model split over the pipeline ranks, and one call that runs
a batch's forward and backward over all its micro-batches.

    pipe = Pipeline(model, topo, schedule="1f1b", microbatches=4, loss_fn=nn.MSELoss())
    opt = torch.optim.Adam(pipe.parameters())
    opt.zero_grad(); loss = pipe.step(x, y); opt.step()

The model is an `nn.Sequential` (split between its children; build it from the same seed on
every rank), any other traceable nn.Module (traced by torch.fx and cut before named submodules,
`split=["blocks.2"]`, see split.py; also built alike on every rank), or a list of LayerSpecs
(each rank builds only its own layers, each from its own seed). The rank map cuts the layers
into p*v contiguous stages (v model chunks per rank for interleaved schedules; rank s holds
virtual stages s, s+p, ...), by `balance`. With dp > 1 in
the grid, the replicas of each stage keep identical through our all-reduce, overlapped with
backward; with tp > 1, layers that have a tensor-parallel twin (LayerSpec.tp) hold their shard.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from ..data_parallel.buckets import DEFAULT_BUCKET_MB
from ..errors import ConfigError, RankMapError
from ..model import LayerSpec, build_stage, check_unique
from ..rankmap import Balance, RankMap
from . import schedules, timeline
from .balance import partition
from .engine import Engine
from .pipedream import WeightStash
from .schedules import Schedule
from .split import Ties, Traced, split_units
from .stage import Stage


@dataclass
class DataParallelOptions:
    """How the replicas of a stage are kept identical (grid dp > 1)."""
    bucket_mb: float = DEFAULT_BUCKET_MB
    algorithm: str = "auto"       # auto | ring | halving | doubling | shm
    check_every: int = 0          # > 0: every N steps prove the replicas bit-identical (debug)
    grad_compress: str | None = None   # bf16 | fp16: gradients cross hosts as that type
    zero: int = 0                 # 1, 2, 3: ZeRO stage -- no all-reduce here; the optimizer must be a
                                  # ShardedOptimizer (pipe.make_optimizer; Trainer: ShardedOptimizer.like)


def specs_of(model, split=None) -> tuple[list[LayerSpec], Traced | None]:
    """LayerSpecs from an nn.Sequential (its children, already built) or a LayerSpec list; any
    other nn.Module (or any module with `split` names) traced into units (split.py)."""
    if isinstance(model, nn.Module):
        plain = split is None and type(model).forward is nn.Sequential.forward
        if plain:
            check_splittable(model)
            if not shares_parameters(model):
                return [LayerSpec(name, build=lambda child=child: child) for name, child in model.named_children()], None
        try:
            traced = split_units(model)
        except ConfigError as e:
            if not plain:
                raise
            raise ConfigError(f"{type(model).__name__}'s children share a parameter (tied weights), which Pipeline "
                              f"handles by tracing the model, and tracing it failed ({e}): untie the weights or pass "
                              f"a module whose forward traces") from None
        return traced.specs, traced
    specs = list(model)
    if not all(isinstance(s, LayerSpec) for s in specs):
        raise ConfigError(f"Pipeline takes an nn.Module or a list of LayerSpecs, not {type(model).__name__}")
    if split is not None:
        raise ConfigError("split= names submodules of an nn.Module to cut before; LayerSpecs are cut by balance=")
    return specs, None


def shares_parameters(model: nn.Sequential) -> bool:
    """Whether two of the Sequential's children hold the same parameter (tied weights, e.g. an
    output head sharing the embedding's): such a model takes the traced path, which handles ties."""
    owner = {}
    for i, child in enumerate(model.children()):
        for q in child.parameters():
            if owner.setdefault(id(q), i) != i:
                return True
    return False


def check_splittable(model: nn.Sequential) -> None:
    """Pipeline runs a plain Sequential's children one after the other, which is the model itself
    unless it has hooks or lists a child twice (shared weights): those are refused."""
    kind = type(model).__name__
    if model._forward_hooks or model._forward_pre_hooks:
        raise ConfigError(f"{kind} has forward hooks, which Pipeline would not run (it runs the children one "
                          f"after the other): put them on a child")
    children = list(model)
    if len({id(c) for c in children}) != len(children):
        raise ConfigError(f"{kind} lists the same module at two places (shared weights); pipeline stages cannot "
                          f"share a layer: give each place its own module")


def virtual_stages(schedule: Schedule, pp: int, balance: Balance | None = None) -> int:
    """p*v for a parsed schedule (v = its chunks) on pp ranks, validating an explicit balance
    (sizes, a file) against p*v."""
    v = schedule.chunks
    n = pp * v
    given = balance.count() if balance is not None else None
    if v > 1 and given is not None and given != n:
        raise RankMapError(f"--balance {balance} gives {given} stages, but --schedule {schedule} with {v} "
                           f"chunks per rank on pp={pp} needs p*v = {n} virtual stages (rank s holds stages s, "
                           f"s+{pp}, ...); give {n} sizes or change --chunks")
    return n


def recompute_here(flag, s: int, p: int) -> bool:
    """recompute=True (every stage), 'all', or '0,2' / [0, 2] (those pp ranks): does rank s?"""
    if not flag:
        return False
    if flag is True or flag == "all":
        return True
    try:
        wanted = {int(x) for x in (flag if isinstance(flag, (list, tuple, set)) else str(flag).split(","))}
    except ValueError:
        raise RankMapError(f"--recompute {flag}: give stage numbers like 0,1 (or no value for all stages)") from None
    if not wanted <= set(range(p)):
        raise RankMapError(f"--recompute {flag}: stages run 0..{p - 1}")
    return s in wanted


def microbatch_count(n: int, m: int) -> int:
    """Micro-batches (backward passes) a batch of n samples runs as: m, fewer when n < m, and
    one (the empty batch) when n = 0."""
    return max(1, min(m, n))


def split_microbatches(x, m: int) -> list:
    """m micro-batches (sizes differ by at most one; fewer when the batch is smaller than m)."""
    return list(x.tensor_split(microbatch_count(len(x), m))) if len(x) else [x]


def loss_weights(sizes: Sequence[int], global_n: int) -> list[float]:
    """Each micro-batch's loss weight: its share of the GLOBAL batch (len(mb) / global_n). The
    weighted losses sum to the global batch's mean, so data-parallel replicas SUM their
    gradients, even when their shards differ in size."""
    return [k / global_n for k in sizes]


def split_batch(x, y, m: int, global_n: int) -> tuple[list, list, list[float]]:
    """One batch as the engine takes it: (x's micro-batches, y's, their loss weights)."""
    xs, ys = split_microbatches(x, m), split_microbatches(y, m)
    return xs, ys, loss_weights([len(c) for c in ys], global_n)


class BatchRunner:
    """Runs one batch's micro-batches (already cut and weighted) through an Engine: this rank's
    list of the schedule, the data-parallel reduction around it, and for a streaming schedule
    (pipedream) the stream across the steps of an epoch, whose OPT actions run `update`.
    Pipeline.step drives it; the pipeline benchmark drives it over bare stages."""

    def __init__(self, engine: Engine, schedule: Schedule, p: int, s: int, v: int):
        self.engine, self.schedule, self.p, self.s, self.v = engine, schedule, p, s, v
        self._stream_start, self._next_step, self._stream_m = 0, -1, 0

    def run(self, xs: Sequence, ys: Sequence, weights: Sequence[float], on_output=None,
            position: tuple[int, int] = (0, 1), batch: int = 0, update: Callable[[], None] | None = None,
            dp=None, ties: Ties | None = None) -> None:
        """`position` = (step, steps) in the epoch (a stream spans them), `batch` the batch
        number (weight versions), `dp` the DataParallel that reduces the gradients (or None),
        `ties` the parameters shared with other stages, whose gradients are summed after it.
        A streaming schedule runs `update` at its OPT actions; otherwise the caller steps the
        optimizer after this returns (gradients reduced over dp and ties by then)."""
        m = len(xs)
        if not self.schedule.streaming:
            if dp is not None:
                dp.begin_step(m)
            self.engine.run(self.schedule(self.p, m, self.s, self.v), xs, ys, weights, on_output)
            if dp is not None:
                dp.finish()
            if ties:
                ties.sync()
            return
        step, steps = position
        if step != self._next_step:      # a stream starts: at step 0, or mid-epoch after a resume
            self._stream_start, self._stream_m = step, m
        elif m != self._stream_m:        # every rank sees the same m, so every rank raises here
            raise ConfigError(f"schedule {self.schedule.name} streams micro-batches across the steps of an "
                              f"epoch, so every batch must split into {self._stream_m} micro-batches, but step "
                              f"{step} has {m}; use a --batch-size that divides the training set")
        self._next_step = step + 1
        k, n = step - self._stream_start, steps - self._stream_start

        def synced_update():
            if dp is not None:
                dp.begin_step(m)
                dp.finish()
            if ties:
                ties.sync()
            if update is not None:
                update()

        acts = self.schedule(self.p, m, self.s, self.v, step=k, steps=n)
        self.engine.run(acts, xs, ys, weights, on_output, base=k * m, batch=batch, flush=k == n - 1,
                        on_update=synced_update)


class Pipeline:
    """This rank's layers of a model split over topo's pipeline ranks, and how to train them.

    Arguments: `model` (nn.Sequential, any traceable nn.Module, or LayerSpecs), `topo`
    (mpipar.init's Topology; default: every rank a stage), `split` (a traced module's cut points:
    the submodules to cut before, e.g. ["blocks.2", "blocks.4"], p*v - 1 of them; None or 'auto':
    cut where `balance` says, between its top-level children and container items),
    `loss_fn(out, target)` (a mean over the batch), `schedule` (gpipe | 1f1b | eager-1f1b |
    interleaved | zb | pipedream, or a schedules.Schedule), `microbatches`,
    `chunks` (interleaved, default 2), `balance` (a rankmap.Balance or what Balance.parse takes;
    'auto': 'time' when a micro-batch `sample` is given, else 'params'; see partition), `sample`,
    `recompute` (True, or pp ranks),
    `seed` (LayerSpec initialisation), `timeline` (path for a trace of the executed schedule),
    `data_parallel` (DataParallelOptions for dp > 1), `device` ('cpu', 'cuda': GPU local rank %
    GPUs on the host, 'auto': cuda when there is one, or a torch.device).
    """

    def __init__(self, model, topo=None, *, loss_fn: Callable | None = None, schedule: str | Schedule = "gpipe",
                 microbatches: int = 1, chunks: int | None = None, balance: Balance | str | list = "auto",
                 sample: torch.Tensor | None = None, recompute=False, seed: int = 0,
                 timeline: str | None = None, data_parallel: DataParallelOptions | None = None,
                 rankmap: RankMap | None = None, device="cpu", split: str | Sequence[str] | None = None):
        if topo is None:
            from ..topology import init
            topo = init()
        from ..comm import devices
        self.device = devices.choose(device, topo.world) if isinstance(device, str) else torch.device(device)
        self.topo, self.loss_fn, self.microbatches = topo, loss_fn, int(microbatches)
        if self.microbatches < 1:
            raise ConfigError(f"microbatches={microbatches}: need at least 1")
        specs, self.traced = specs_of(model, split)
        check_unique(specs)
        p, s = topo.grid.pp, topo.pp_rank
        self.schedule = schedules.get(schedule, chunks)     # names parsed here, once; values from here on
        balance = Balance.parse(balance)
        if self.traced is not None and split not in (None, "auto"):
            if balance.kind != "auto" or rankmap is not None:
                raise ConfigError(f"split={split!r} and balance={balance} (or a rank map) both cut the model: give one")
            balance = Balance.parse(self.traced.sizes(split, virtual_stages(self.schedule, p)))
        if self.traced is not None and balance.kind == "time":
            raise ConfigError("balance='time' profiles the layers one by one on a tensor; a traced module's units "
                              "pass tuples: name the cuts with split=[...], or balance='params', 'layers' or sizes")
        if rankmap is None:
            if balance.kind == "auto":
                balance = Balance("time" if sample is not None and self.traced is None else "params")
            n = virtual_stages(self.schedule, p, balance)
            rankmap = RankMap(topo.grid, partition(specs, balance, n, topo.world, sample, seed, chunks=n // p))
        if len(rankmap.stages) % p:
            raise RankMapError(f"the rank map has {len(rankmap.stages)} stages, not a multiple of pp={p}")
        self.rankmap, self.specs = rankmap, specs
        self.p, self.s, self.v = p, s, len(rankmap.stages) // p
        self.schedule.check(p, self.microbatches, self.v)   # before any training, on every rank
        # tp > 1: layers with a tensor-parallel builder hold this rank's shard, and their
        # collectives run on the tp sub-communicator inside every F and B
        self.tp_group = None
        if topo.grid.tp > 1:
            from ..tensor.group import TPGroup
            self.tp_group = TPGroup(topo.tp_world)
        chunks_ = [build_stage(specs, rankmap.stages[s + c * p], seed, self.device, tp_group=self.tp_group)
                   for c in range(self.v)]
        self.module = chunks_[0] if self.v == 1 else nn.Sequential(OrderedDict(
            (name, layer) for ch in chunks_ for name, layer in ch.named_children()))
        recompute = recompute_here(recompute, s, p)
        self.stages = [Stage(ch, s + c * p, p * self.v, topo.pp_world, loss_fn, self.device, recompute=recompute,
                             weights=WeightStash(ch) if self.schedule.streaming else None)
                       for c, ch in enumerate(chunks_)]
        self.engine = Engine(self.stages, tuples=self.traced is not None)
        # parameters that units on other pipeline ranks use too (a head tied to the embedding)
        self.ties = (Ties.build({sp.name: sp.build() for sp in specs}, rankmap.stages, topo.pp_world)
                     if self.traced is not None else None)
        from ..tensor.sharding import tp_plan
        plan = tp_plan(self.module)
        self.sharded_ids = {id(q) for name, q in self.module.named_parameters() if name in plan}
        self.dp = None
        o = data_parallel or DataParallelOptions()
        self.zero = o.zero if topo.grid.dp > 1 else 0
        self.sharded = None               # the ShardedOptimizer step() begins (make_optimizer's or the Trainer's)
        if self.zero:
            if o.zero not in (1, 2, 3):
                raise ConfigError(f"--zero {o.zero}: stages 1 (optimizer state sharded), 2 (+ gradients) and "
                                  f"3 (+ parameters) exist")
            if self.streaming or self.tp_group is not None or self.device.type != "cpu":
                raise ConfigError(f"--zero {o.zero} runs with synchronous schedules, tp=1 and CPU tensors so far, not "
                                  f"--schedule {self.schedule} with tp={topo.grid.tp} on {self.device}")
            if self.ties:
                raise ConfigError(f"--zero {o.zero} shards gradients over the replicas of each stage, and "
                                  f"{self.traced.kind} has a parameter that units on several pipeline ranks use "
                                  f"(tied weights), whose gradient is summed between them: use zero=0 with it")
            if o.zero == 3 and self.schedule.name == "zb":
                raise ConfigError("--zero 3 gathers a layer's weights once for its whole backward; --schedule zb "
                                  "splits a backward in two: use 1f1b, eager-1f1b, gpipe or interleaved")
            from ..data_parallel.wrapper import broadcast_state
            broadcast_state(self.module, topo.dp_world)     # replicas start equal; the optimizer sums
        elif topo.grid.dp > 1:
            # each micro-batch's loss is weighted by its share of the GLOBAL batch, so replicas SUM
            # their gradients: the mean over the global batch, even when shards differ in size
            from ..data_parallel.wrapper import DataParallel
            self.dp = DataParallel(self.module, topo.dp_world, bucket_mb=o.bucket_mb, op="sum",
                                   check_every=o.check_every, algorithm=o.algorithm,
                                   grad_compress=o.grad_compress, local_batchnorm=True)   # engine.py warns
        self.runner = BatchRunner(self.engine, self.schedule, p, s, self.v)
        self.placeholder = nn.Parameter(torch.zeros(0, device=self.device))   # see parameters()
        self.last_loss = None             # the last step's (sum of its samples' losses, global batch size)
        self.recorder = None
        self.timeline_path = timeline
        if timeline:
            self.recorder = timeline_recorder(topo.world)
            self.engine.recorder = self.recorder

    # -- what this rank holds -------------------------------------------------------------
    @property
    def is_first(self) -> bool:
        return self.s == 0

    @property
    def is_last(self) -> bool:
        return self.s == self.p - 1

    @property
    def streaming(self) -> bool:
        return self.schedule.streaming

    def parameters(self) -> list[nn.Parameter]:
        """This rank's trainable parameters (hand them to your optimizer). A stage without any
        (more stages than layers with weights, or a rank map that cuts so) gives one empty
        placeholder instead: torch's optimizers refuse an empty list, and its step changes nothing
        (it never gets a gradient and is in no state_dict)."""
        return self.trainable() or [self.placeholder]

    def trainable(self) -> list[nn.Parameter]:
        """This rank's trainable parameters as they are (empty on a stage without any)."""
        return [q for q in self.module.parameters() if q.requires_grad]

    def make_optimizer(self, optimizer, **kwargs):
        """`optimizer(this rank's parameters, **kwargs)`; under ZeRO (DataParallelOptions(zero=
        1|2|3)) a ShardedOptimizer stepping that class on this replica's part of them, which
        step() then tells how many backward passes (micro-batches) make a gradient final.
        Clipping by the global norm: opt.step(clip=...) (the norm spans replicas and stages)."""
        if not self.zero:
            return optimizer(self.parameters(), **kwargs)
        if not self.trainable():
            layers = ", ".join(f"{name} ({type(layer).__name__})" for name, layer in self.module.named_children())
            raise ConfigError(f"pipeline stage {self.s} (rank {self.topo.world.rank}) holds no trainable parameters (layers "
                              f"{layers}), so ZeRO has nothing to shard there: use fewer pipeline stages than the "
                              f"model has layers with weights, or a balance that gives every stage one")
        from ..data_parallel.zero import ShardedOptimizer
        self.sharded = ShardedOptimizer(self.parameters(), self.topo.dp_world, optimizer, norm_worlds=(self.topo.pp_world,),
                                        stage=self.zero, units=self.units(), op="sum", **kwargs)   # step() weighs the losses
        return self.sharded

    def units(self) -> list[nn.Module]:
        """This rank's layers, in forward order: what ZeRO stage 3 gathers one at a time."""
        return [layer for st in self.stages for _, layer in st.layers]

    def parameter_order(self) -> list[int]:
        """For each of parameters(), its place in the whole model's parameters() order (layer
        index, then position in the layer; a traced module's own order, a tied parameter's the
        same on each of its ranks): what the global-norm clip combines norms by."""
        if self.traced is not None:
            return [self.traced.order[id(q)] for q in self.trainable()]
        index, seen, order = {spec.name: i for i, spec in enumerate(self.specs)}, set(), []
        for name, layer in self.module.named_children():
            for j, q in enumerate(layer.parameters()):
                if q.requires_grad and id(q) not in seen:      # as module.parameters(): once each
                    seen.add(id(q))
                    order.append(index[name] * 2 ** 20 + j)
        return order

    def state_dict(self) -> dict:
        """This rank's layers under the single-process model's names (a traced module's own
        state-dict keys); with tp > 1 the shards are gathered (a collective over tp: every tp rank
        calls it)."""
        if self.tp_group is not None:
            from ..tensor.sharding import gather_full_state_dict
            if self.traced is None:
                return gather_full_state_dict(self.module, self.tp_group)
            whole = {}                    # a traced module: each unit's shards gathered, the model's names
            for unit in self.units():
                whole.update(gather_full_state_dict(unit, self.tp_group))
            return {k: v for k, v in whole.items() if k in self.traced.keys}
        if self.traced is not None:
            return self.traced.state_dict(self.units())
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    # -- training -------------------------------------------------------------------------
    def passes(self, n: int) -> int:
        """Backward passes (micro-batches) step() runs for a batch of n samples."""
        return microbatch_count(n, self.microbatches)

    def step(self, x: torch.Tensor, y, global_n: int | None = None, *, on_output=None,
             position: tuple[int, int] = (0, 1), batch: int = 0,
             update: Callable[[], None] | None = None) -> float | None:
        """Forward and backward of one batch over its micro-batches; gradients accumulate into
        this rank's parameters as loss.backward() would (zero them, then step your optimizer).
        With dp > 1, x and y are this replica's shard and `global_n` the global batch size
        (default: the shards' sizes summed over dp); each micro-batch's loss is weighted by its
        share of it. `on_output(out, y)` sees each micro-batch's output on the last stage with
        its targets (metrics). A streaming schedule (pipedream) updates the weights inside its
        lists: it needs `update()`, the optimizer step its OPT actions run, and `position` =
        (step, steps) in the epoch and `batch` (the batch number) to span the steps; with the
        others the caller steps after this returns. Returns the mean loss over this rank's
        samples on the last stage (None on the others, and when `on_output` takes the outputs);
        the whole global batch's: global_loss()."""
        if self.streaming and update is None:
            raise ConfigError(f"schedule {self.schedule.name} updates the weights inside its lists; "
                              f"train it with mpipar.Trainer (or step(..., update=your optimizer step))")
        n, m = len(x), self.microbatches
        if self.topo.grid.dp > 1 and (global_n is None or self.zero == 3):
            sizes = self.topo.dp_world.allgather_floats([n])[:, 0]
            global_n = int(sizes.sum()) if global_n is None else global_n
            if self.zero == 3:    # each micro-batch gathers the weights, a collective over the replicas: a
                m = self.passes(int(sizes.min()))   # shard shorter than m would run fewer (a hang); the same
        elif global_n is None:                      # count everywhere is the same sum of weighted losses
            global_n = n
        self._check_zeroed()
        x, y = self.place(x, y)
        xs, ys, weights = split_batch(x, y, m, global_n)
        if self.sharded is not None and not self.streaming:   # ZeRO stages 2, 3 reduce a gradient once its
            self.sharded.begin_step(len(xs))                   # passes are in
        total = [0.0]
        if on_output is not None:
            def on_out(mb, out):
                on_output(out, ys[mb])
        else:
            def on_out(mb, out):
                if self.loss_fn is not None and len(ys[mb]):   # an empty shard's mean is nan: it adds nothing
                    total[0] += float(self.loss_fn(out.detach(), ys[mb])) * len(ys[mb])
        if self.recorder is not None:
            self.recorder.begin_step()
        self.runner.run(xs, ys, weights, on_out, position, batch, update, dp=self.dp, ties=self.ties)
        if self.dp is not None and self.sharded is None and not self.streaming:
            self._reduced = [(q, q.grad, q.grad._version) for q in self.module.parameters() if q.grad is not None]
        self.last_loss = (total[0], global_n) if on_output is None and self.loss_fn is not None else None
        return total[0] / max(n, 1) if self.is_last and on_output is None else None

    def _check_zeroed(self) -> None:
        """With dp > 1 (no ZeRO) each step all-reduces .grad in place at its end: a gradient the
        last step left (not zeroed since) would be summed over dp again, so accumulating over
        steps is refused (pp only and ZeRO accumulate exactly)."""
        reduced, self._reduced = getattr(self, "_reduced", None), None
        if reduced and any(q.grad is g and g._version == v for q, g, v in reduced):
            raise ConfigError("call opt.zero_grad() before each pipe.step (Pipeline reduces over dp at the end "
                              "of every step); to accumulate, give one step the whole batch with more microbatches")

    def global_loss(self) -> float | None:
        """The mean loss over the whole global batch of the last step() on the last stage (None
        on the others): step() returns this replica's shard's mean, this sums every replica's
        share of the global batch (with dp > 1 an all-gather over the last stage's replicas:
        call it on every rank; the other stages return without communicating)."""
        if not self.is_last or self.last_loss is None:
            return None
        total, global_n = self.last_loss
        if self.topo.grid.dp > 1:
            total = float(self.topo.dp_world.allgather_floats([total]).sum())
        return total / max(global_n, 1)

    def place(self, x, y=None):
        """(x, y) on this rank's device where this rank reads them: x on the first stage, the
        targets on the last (copies from pinned memory run asynchronously)."""
        if self.device.type == "cpu":
            return x, y
        move = lambda t: t.to(self.device, non_blocking=True) if isinstance(t, torch.Tensor) else t
        return (move(x) if self.is_first else x), (move(y) if self.is_last else y)

    @torch.no_grad()
    def forward_only(self, x, y=None, on_output=None) -> None:
        """x through every stage without stashing; `on_output(0, out)` sees the last stage's output."""
        x, y = self.place(x, y)
        rec, self.engine.recorder = self.engine.recorder, None
        try:
            self.engine.run(schedules.forward_only(self.p, 1, self.s, self.v), [x], [y], [1.0], on_output)
        finally:
            self.engine.recorder = rec

    def predict(self, x: torch.Tensor) -> torch.Tensor | None:
        """The model's output for x (eval mode) on the last stage; None on the others."""
        got = []
        was = [(m, m.training) for m in self.module.modules()]     # each submodule's own mode
        self.module.eval()
        try:
            self.forward_only(x, None, lambda mb, out: got.append(out))
        finally:
            for m, flag in was:
                m.training = flag
        return got[0] if got else None

    def write_timeline(self, log=print) -> float | None:
        """Write the trace and Gantt chart (collective); the measured bubble on rank 0."""
        if self.recorder is None:
            return None
        m = self.microbatches
        label = f"{self.schedule.name}, p={self.p}, m={m}" + (f", v={self.v}" if self.v > 1 else "")
        return timeline.write(self.topo.world, self.recorder, self.timeline_path,
                       self.schedule.bubble(self.p, m, self.v), label, log)

    def close(self) -> None:
        """Release the data-parallel hooks and buffers."""
        if self.dp is not None:
            self.dp.remove()
            self.dp = None

    @property
    def peak_held(self) -> int:
        return self.engine.peak_held


def timeline_recorder(world):
    rec = timeline.Recorder()
    rec.sync(world)
    return rec
