"""This rank's share of the pipeline, built from the rank map: its model chunks, their Stages,
the Engine, the schedule and (with --timeline) the recorder; the trainer only hands it batches.

With v chunks per rank the rank map holds n = p*v virtual stages in model order, and rank s
builds virtual stages s, s+p, ..., s+(v-1)p (Megatron's interleaving)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence

import torch
from torch import nn

from ..errors import ConfigError, RankMapError
from ..model import build_stage
from . import schedules, timeline
from .engine import Engine
from .pipedream import WeightStash
from .stage import Stage


def virtual_stage_count(args, pp: int) -> int:
    """p*v, validating --chunks against --schedule and an explicit --balance against p*v."""
    name = getattr(args, "schedule", "gpipe")
    v = schedules.chunks_for(name, getattr(args, "chunks", None))
    n = pp * v
    spec = getattr(args, "balance", None) or ""
    given = None
    if spec and spec[0].isdigit():
        given = len(spec.split(","))
    elif spec.endswith(".json"):
        from ..rankmap import load_json
        given = len(load_json(spec))
    if v > 1 and given is not None and given != n:
        raise RankMapError(f"--balance {spec} gives {given} stages, but --schedule {name} with {v} chunks per rank "
                           f"on pp={pp} needs p*v = {n} virtual stages (rank s holds stages s, s+{pp}, ...); "
                           f"give {n} sizes or change --chunks")
    return n


def recompute_here(flag, s: int, p: int) -> bool:
    """--recompute (every stage) or --recompute 0,2 (those pp ranks): does rank s recompute?"""
    if not flag:
        return False
    if flag is True or flag == "all":
        return True
    try:
        wanted = {int(x) for x in str(flag).split(",")}
    except ValueError:
        raise RankMapError(f"--recompute {flag}: give stage numbers like 0,1 (or no value for all stages)") from None
    if not wanted <= set(range(p)):
        raise RankMapError(f"--recompute {flag}: stages run 0..{p - 1}")
    return s in wanted


class StagePlan:
    def __init__(self, topo, rankmap, specs, args, loss_fn):
        p, s = topo.grid.pp, topo.pp_rank
        if len(rankmap.stages) % p:
            raise RankMapError(f"the rank map has {len(rankmap.stages)} stages, not a multiple of pp={p}")
        self.p, self.s, self.v = p, s, len(rankmap.stages) // p
        self.schedule = schedules.get(getattr(args, "schedule", "gpipe"))
        self.schedule.check(p, args.microbatches, self.v)   # before any training, on every rank
        # tp > 1: layers with a tensor-parallel builder hold this rank's shard, and their
        # collectives run on the tp sub-communicator inside every F and B
        self.tp_group = None
        if topo.grid.tp > 1:
            from ..tensor.group import TPGroup
            self.tp_group = TPGroup(topo.tp_world)
        chunks = [build_stage(specs, rankmap.stages[s + c * p], args.seed, tp_group=self.tp_group)
                  for c in range(self.v)]
        self.module = chunks[0] if self.v == 1 else nn.Sequential(OrderedDict(
            (name, layer) for ch in chunks for name, layer in ch.named_children()))
        recompute = recompute_here(getattr(args, "recompute", None), s, p)
        self.stages = [Stage(ch, s + c * p, p * self.v, topo.pp_world, loss_fn, recompute=recompute,
                             weights=WeightStash(ch) if self.schedule.streaming else None)
                       for c, ch in enumerate(chunks)]
        self.engine = Engine(self.stages)
        self._stream_start, self._next_step, self._stream_m = 0, -1, 0
        self.recorder = None
        self.timeline_path = getattr(args, "timeline", None)
        if self.timeline_path:
            self.recorder = timeline.Recorder()
            self.recorder.sync(topo.world)
            self.engine.recorder = self.recorder

    @property
    def streaming(self) -> bool:
        return self.schedule.streaming

    def train(self, xs: Sequence[torch.Tensor], ys: Sequence, weights: Sequence[float], on_output,
              step: int, steps: int, batch: int, update: Callable[[], None]) -> None:
        """One batch through the pipeline. A streaming schedule runs `update` itself (at its
        OPT actions); otherwise the caller runs it after this returns."""
        m = len(xs)
        if self.recorder is not None:
            self.recorder.begin_step()
        if not self.streaming:
            self.engine.run(self.schedule(self.p, m, self.s, self.v), xs, ys, weights, on_output)
            return
        if step != self._next_step:      # a stream starts: at step 0, or mid-epoch after a resume
            self._stream_start, self._stream_m = step, m
        elif m != self._stream_m:        # every rank sees the same m, so every rank raises here
            raise ConfigError(f"schedule {self.schedule.name} streams micro-batches across the steps of an "
                              f"epoch, so every batch must split into {self._stream_m} micro-batches, but step "
                              f"{step} has {m}; use a --batch-size that divides the training set")
        self._next_step = step + 1
        k, n = step - self._stream_start, steps - self._stream_start
        acts = self.schedule(self.p, m, self.s, self.v, step=k, steps=n)
        self.engine.run(acts, xs, ys, weights, on_output, base=k * m, batch=batch, flush=k == n - 1,
                        on_update=update)

    @torch.no_grad()
    def forward_only(self, x, y, on_output) -> None:
        rec, self.engine.recorder = self.engine.recorder, None
        try:
            self.engine.run(schedules.forward_only(self.p, 1, self.s, self.v), [x], [y], [1.0], on_output)
        finally:
            self.engine.recorder = rec

    def write_timeline(self, world, microbatches: int, log=print) -> None:
        if self.recorder is None:
            return
        name = self.schedule.name
        label = f"{name}, p={self.p}, m={microbatches}" + (f", v={self.v}" if self.v > 1 else "")
        timeline.write(world, self.recorder, self.timeline_path,
                       self.schedule.bubble(self.p, microbatches, self.v), label, log)

    @property
    def peak_held(self) -> int:
        return self.engine.peak_held
