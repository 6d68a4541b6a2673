"""Executes a schedule's action list on one rank, posting receives ahead of need.

The engine knows nothing of any particular schedule: it walks the list. Receives are posted
`lookahead` actions early (non-blocking) so a neighbour's send never waits on us; sends are
non-blocking, tested after every action and released the moment they complete; the engine
blocks on a send only when more than `send_window` are outstanding (simulate.py proves every
schedule deadlock-free under exactly this rule) and at the end of a step. A streaming
schedule (pipedream) leaves its last sends in flight across steps (`flush=False`).
"""
from __future__ import annotations

import time
import warnings
from collections import deque
from typing import Callable, Sequence

import torch
from torch import nn

from ..comm.tags import Kind, tag
from ..errors import ConfigError
from .schedules import Action, message
from .stage import Stage

KINDS = {"act": Kind.ACT, "grad": Kind.GRAD}
PEER_OF = {"RECV_F": "prev", "RECV_B": "next"}


class Engine:
    """`tuples`: the stages pass tuples (the units of a traced module, pipeline/split.py) rather
    than single tensors."""

    def __init__(self, stages: Stage | Sequence[Stage], lookahead: int = 4, send_window: int = 8,
                 tuples: bool = False):
        self.stages = list(stages) if isinstance(stages, (list, tuple)) else [stages]
        self.stage = self.stages[0]
        self.world = self.stage.world
        self.p = self.stage.p
        self.v = len(self.stages)
        self.s = self.stage.index % self.p
        if [st.index for st in self.stages] != [c * self.p + self.s for c in range(self.v)]:
            raise ConfigError(f"rank {self.s}'s chunks are virtual stages {[st.index for st in self.stages]}; "
                              f"with p={self.p} they must be {self.s}, {self.s}+{self.p}, ...")
        self.lookahead, self.send_window = max(1, lookahead), max(2, send_window)
        w = self.world   # a tuple travels as one header and its tensors, under the message's tag
        self.isend, self.irecv = (w.isend_tuple, w.irecv_tuple) if tuples else (w.isend, w.irecv)
        self.sends: deque = deque()
        self.received: dict[tuple, torch.Tensor] = {}
        self.outbox: dict[tuple, torch.Tensor] = {}     # (op, mb, chunk) -> tensor its SEND will send
        self.recorder = None                            # timeline.Recorder, when --timeline is on
        self._warned_bn = False
        self._peak = 0                                  # most micro-batches x chunks held at once

    # -- messages -------------------------------------------------------------------------------
    def _tag(self, a: Action, base: int) -> tuple[int, int]:
        peer, kind, k = message(a, self.s, self.p)
        return peer, tag(KINDS[kind], base + a.mb, k if self.v > 1 else 0)

    def _send(self, t, a: Action, base: int) -> None:
        peer, tg = self._tag(a, base)
        self.sends.append(self.isend(t, peer, tg))
        while len(self.sends) > self.send_window:
            self.sends.popleft().wait()

    def _reap(self) -> None:
        """Release completed sends (keeps MPI progressing while we compute, too)."""
        while self.sends and self.sends[0].done():
            self.sends.popleft()

    # -- checks ---------------------------------------------------------------------------------
    def _check(self, actions: Sequence[Action], inputs, targets) -> None:
        for a in actions:
            if not 0 <= a.chunk < self.v:
                raise ConfigError(f"the schedule runs model chunk {a.chunk} on rank {self.s}, but the rank map "
                                  f"gives it {self.v} chunk(s); use --chunks {a.chunk + 1} or another schedule")
            if a.op == "F" and self.stages[a.chunk].is_first and not 0 <= a.mb < len(inputs or ()):
                raise ConfigError(f"the schedule needs micro-batch {a.mb}, but the batch was split into only "
                                  f"{len(inputs or ())}; raise --batch-size or lower --microbatches")
        if not self._warned_bn and len(inputs or ()) > 1 and torch.is_grad_enabled():
            self._warned_bn = True
            if any(isinstance(mod, nn.modules.batchnorm._BatchNorm)
                   for st in self.stages for mod in st.module.modules()):
                warnings.warn("BatchNorm normalises each micro-batch separately: with --microbatches > 1 "
                              "training differs from whole-batch training", stacklevel=3)

    # -- one step -------------------------------------------------------------------------------
    def run(self, actions: Sequence[Action], inputs: Sequence[torch.Tensor] | None,
            targets: Sequence | None, weights: Sequence[float],
            on_output: Callable[[int, torch.Tensor], None] | None = None, *,
            base: int = 0, batch: int = 0, flush: bool = True,
            on_update: Callable[[], None] | None = None) -> None:
        """Run one step's list. `inputs` is read on the first stage, `targets` on the last one;
        `on_output(mb, out)` sees each last-stage output (metrics). `base` numbers this step's
        micro-batches in a stream (tags, stashes), `batch` is the step's batch number (weight
        versions), `on_update()` is the optimizer step an OPT action runs."""
        self._check(actions, inputs, targets)
        split = {(a.mb, a.chunk) for a in actions if a.op == "W"}
        recv_queue = deque(a for a in actions if a.op in PEER_OF)
        posted: dict[tuple, object] = {}
        rec, clock = self.recorder, time.perf_counter

        def post_more():
            while recv_queue and len(posted) < self.lookahead:
                a = recv_queue.popleft()
                peer, tg = self._tag(a, base)
                posted[(a.op, base + a.mb, a.chunk)] = self.irecv(peer, tg, device=self.stage.device)

        post_more()
        for a in actions:
            op, mb, st = a.op, base + a.mb, self.stages[a.chunk]
            t0 = clock()
            if op in PEER_OF:
                key = (op, mb, a.chunk)
                if key not in posted:
                    raise RuntimeError(f"schedule bug: {a!r} was not posted in order")
                self.received[key] = posted.pop(key).wait()
                post_more()
            elif op == "F":
                x = inputs[a.mb] if st.is_first else self.received.pop(("RECV_F", mb, a.chunk))
                y = targets[a.mb] if (st.is_last and targets is not None) else None
                params = st.weights.params_for(batch) if st.weights is not None and torch.is_grad_enabled() else None
                out = st.forward(mb, x, y, weights[a.mb], params, split=(a.mb, a.chunk) in split)
                held = sum(len(s.stash) for s in self.stages)
                if held > self._peak:
                    self._peak = held
                if st.is_last:
                    if on_output is not None:
                        on_output(a.mb, out)
                else:
                    self.outbox[("SEND_F", mb, a.chunk)] = out
            elif op == "B":
                g = None if st.is_last else self.received.pop(("RECV_B", mb, a.chunk))
                gi = st.backward(mb, g, split=(a.mb, a.chunk) in split)
                if not st.is_first:
                    self.outbox[("SEND_B", mb, a.chunk)] = gi
            elif op == "W":
                st.backward_weight(mb)
            elif op in ("SEND_F", "SEND_B"):
                self._send(self.outbox.pop((op, mb, a.chunk)), a, base)
            elif op == "OPT":
                for stage in self.stages:
                    stage.weights.apply(batch + a.mb, on_update or (lambda: None))
            else:
                raise ValueError(f"unknown action {a!r}")
            if rec is not None and op in ("F", "B", "W", "OPT"):
                rec.add(op, a.mb, a.chunk, t0, clock())
            self._reap()
        if flush:
            self.drain()

    def drain(self) -> None:
        """Wait for every send; a flushed step must leave nothing behind."""
        while self.sends:
            self.sends.popleft().wait()
        left = list(self.received) + list(self.outbox)
        if left:
            raise RuntimeError(f"schedule bug: step ended with unused messages {left[:4]}")
        if not torch.is_grad_enabled():
            for st in self.stages:
                st.stash.clear()

    @property
    def peak_held(self) -> int:
        """Most (micro-batch, chunk) activation sets this rank held at once: what the simulator
        (simulate.py) predicts per rank."""
        return self._peak

    def reset_peak(self) -> None:
        self._peak = 0
        for st in self.stages:
            st.peak_held = 0
