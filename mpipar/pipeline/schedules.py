"""Pipeline schedules as data: pure functions from (p stages, m micro-batches, stage s) to the
ordered list of atomic actions that stage executes. The engine only executes lists, so
schedules differ in one function each and are tested without any process (simulate.py).

Symbols (used everywhere in mpipar.pipeline):
    p  pipeline ranks (stages)           s  this rank's stage, 0..p-1
    m  micro-batches per step            v  model chunks per rank (interleaved; else 1)
    k  virtual stage = chunk * p + s     n  virtual stages = p * v (layers are split n ways)
Actions: F forward; B backward (input and weight gradients, or only the input gradient when the
list also holds W for that micro-batch); W weight gradient; SEND_F/RECV_F activations;
SEND_B/RECV_B gradients; OPT optimizer step inside the list (streaming schedules only; its mb
is the batch, relative to the step's). Each action is atomic: a barrier between two successive
actions cannot deadlock. Receives sit just before the F/B that consumes them and sends just
after the F/B that produces them; the engine posts receives early and never blocks on a send
until its window is full, which simulate.py models exactly.

Micro-batch transparency: summing the micro-batches' weighted losses gives the whole batch's
gradient for any layer that treats samples independently. BatchNorm (in training mode) does
not: it normalises each micro-batch with its own statistics, so with m > 1 it matches neither
single-process training nor itself at another m (use GroupNorm/LayerNorm, or m = 1).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from ..errors import ConfigError
from .actions import COMPUTE, Action, backward_unit, forward_unit, message  # noqa: F401
from .pipedream import pipedream_2bw, pipedream_needs


# -- the schedules ----------------------------------------------------------------------------

def gpipe(p: int, m: int, s: int, v: int = 1) -> list[Action]:
    """All m forwards, then all m backwards (in reverse, as torchgpipe): the same gradients
    as one big batch; holds all m micro-batches' activations."""
    acts = [a for mb in range(m) for a in forward_unit(s, p, mb)]
    acts += [a for mb in reversed(range(m)) for a in backward_unit(s, p, mb)]
    return acts


def one_f_one_b(p: int, m: int, s: int, v: int = 1) -> list[Action]:
    """1F1B (PipeDream-Flush): w = min(p-1-s, m) warm-up forwards, then one forward and one
    backward in turn, then the w remaining backwards. Stage s holds at most w+1 <= p-s
    micro-batches' activations, whatever m is; the bubble is GPipe's."""
    return _warm_then_alternate(p, m, s, min(p - 1 - s, m))


def eager_1f1b(p: int, m: int, s: int, v: int = 1) -> list[Action]:
    """1F1B with one more warm-up forward on every stage but the last (w = p-s). In 1F1B's steady
    state a stage waits for its successor's gradient, which the successor sends only after running
    the forward this stage had just sent it: two message latencies per micro-batch sit in that loop
    on every pair of stages. One micro-batch of slack takes them out (as long as they are shorter
    than a forward+backward). Costs one more micro-batch of activations held on stages 0..p-2;
    same gradients, same bubble formula."""
    return _warm_then_alternate(p, m, s, min(p - s if s < p - 1 else 0, m))


def _warm_then_alternate(p: int, m: int, s: int, w: int) -> list[Action]:
    acts = [a for mb in range(w) for a in forward_unit(s, p, mb)]
    for i in range(m - w):
        acts += forward_unit(s, p, i + w) + backward_unit(s, p, i)
    for i in range(m - w, m):
        acts += backward_unit(s, p, i)
    return acts


def interleaved(p: int, m: int, s: int, v: int = 2) -> list[Action]:
    """Interleaved 1F1B (Megatron-LM): rank s holds v chunks, virtual stages s, s+p, ...,
    s+(v-1)p. Work is taken in groups of p micro-batches per chunk: virtual step j runs chunk
    (j mod pv) div p (reversed for backward) on micro-batch (j div pv)*p + j mod p. Warm-up
    is 2(p-1-s) + (v-1)p forwards (all of them when m == p). Needs m % p == 0; the bubble
    shrinks v-fold: (p-1)/(vm+p-1)."""
    total = m * v

    def chunk_of(j: int, forward: bool) -> int:
        c = (j % (p * v)) // p
        return c if forward else v - 1 - c

    def mb_of(j: int) -> int:
        return (j // (p * v)) * p + j % p

    def f(j):
        return forward_unit(s, p, mb_of(j), chunk_of(j, True), v)

    def b(j):
        return backward_unit(s, p, mb_of(j), chunk_of(j, False), v)

    warm = total if m == p else min(2 * (p - 1 - s) + (v - 1) * p, total)
    acts = [a for j in range(warm) for a in f(j)]
    for j in range(total - warm):
        acts += f(j + warm) + b(j)
    for j in range(total - warm, total):
        acts += b(j)
    return acts


def zero_bubble_h1(p: int, m: int, s: int, v: int = 1) -> list[Action]:
    """ZB-H1 (Qi et al. 2023): backward split into B (input gradient, on the critical path)
    and W (weight gradient, deferrable). 1F1B's order with each stage's W lagging its B by s
    micro-batches; the s deferred Ws fill the tail. With unit F = B = W and m >= p the bubble
    is (p-1)/(3m+p-1), a third of 1F1B's (m < p: (2p-1-m)/(2m+2p-1)); activations are held
    until W, at most p per stage (1F1B's peak)."""
    w = min(p - 1 - s, m)
    acts = [a for mb in range(w) for a in forward_unit(s, p, mb)]
    for i in range(m):
        if i + w < m:
            acts += forward_unit(s, p, i + w)
        acts += backward_unit(s, p, i)
        if i >= s:
            acts.append(Action("W", i - s))
    acts += [Action("W", i) for i in range(max(0, m - s), m)]
    return acts


def forward_only(p: int, m: int, s: int, v: int = 1) -> list[Action]:
    """Evaluation: forwards only, chunk after chunk."""
    return [a for mb in range(m) for c in range(v) for a in forward_unit(s, p, mb, c, v)]


# -- registry -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Schedule:
    """A schedule as a value, parsed once from its name (`get`): the name with aliases resolved,
    how it builds its lists (`sched(p, m, s, v=1, step=0, steps=1)` checks and builds), whether
    it streams, and `chunks`, the model chunks per rank (v) it runs with. str() is its name."""
    name: str
    build: Callable[..., list[Action]]
    bubble: Callable[[int, int, int], float]   # (p, m, v) -> idle fraction with unit F, B, W
    needs: Callable[[int, int, int], str | None] = lambda p, m, v: None
    chunked: bool = False       # uses v > 1 model chunks per rank
    streaming: bool = False     # its lists span steps (OPT inside; see pipedream.py)
    chunks: int = 1             # v: the --chunks flag, or (in the registry) the schedule's default

    def __str__(self) -> str:
        return self.name

    def __format__(self, spec: str) -> str:
        return format(self.name, spec)

    def check(self, p: int, m: int, v: int = 1) -> None:
        """ConfigError (one line, what to change) when (p, m, v) do not fit this schedule."""
        if p < 1 or m < 1 or v < 1:
            raise ConfigError(f"schedule {self.name}: p, m and v must be >= 1 (got p={p}, m={m}, v={v})")
        if v > 1 and not self.chunked:
            raise ConfigError(f"schedule {self.name} runs one model chunk per rank, but the rank map gives "
                              f"{v}; use --schedule interleaved or --chunks 1")
        problem = self.needs(p, m, v)
        if problem:
            raise ConfigError(f"schedule {self.name}: {problem}")

    def __call__(self, p: int, m: int, s: int, v: int = 1, step: int = 0, steps: int = 1) -> list[Action]:
        self.check(p, m, v)
        if not 0 <= s < p:
            raise ConfigError(f"stage {s} does not exist in a {p}-stage pipeline")
        if self.streaming:
            return self.build(p, m, s, v, step=step, steps=steps)
        return self.build(p, m, s, v)


def _flat(p, m, v):
    return (p - 1) / (m + p - 1)


def _zb_bubble(p, m, v):
    idle = p - 1 + max(0, p - m)   # with m < p the W tail cannot fill the warm-up gap
    return idle / (3 * m + idle)


def _interleaved_needs(p, m, v):
    if m % p:
        up = -(-m // p) * p
        return (f"needs the micro-batches per step to be a multiple of p={p}, got {m}; use --microbatches {up} "
                f"(and a batch size that splits into {up})")
    return None


def _register() -> dict[str, Schedule]:
    scheds = [
        Schedule("gpipe", gpipe, _flat),
        Schedule("1f1b", one_f_one_b, _flat),
        Schedule("eager-1f1b", eager_1f1b, _flat),
        Schedule("interleaved", interleaved, lambda p, m, v: (p - 1) / (v * m + p - 1),
                 _interleaved_needs, chunked=True, chunks=2),
        Schedule("zb", zero_bubble_h1, _zb_bubble),
        Schedule("pipedream", pipedream_2bw, _flat, pipedream_needs, streaming=True),
    ]
    return {s.name: s for s in scheds}


SCHEDULES = _register()
ALIASES = {"eager1f1b": "eager-1f1b", "zb-h1": "zb", "zbh1": "zb", "1F1B": "1f1b", "interleaved-1f1b": "interleaved",
           "2bw": "pipedream", "pipedream-2bw": "pipedream"}


def get(schedule: str | Schedule, chunks: int | None = None) -> Schedule:
    """The Schedule value of a name (aliases resolved: '2bw' is pipedream) or of a value already
    parsed (returned as it is), running `chunks` model chunks per rank (the --chunks flag; None:
    the value's own, for a name the schedule's default). Parse once where the name comes in (the
    command line, the Pipeline constructor) and pass the value on."""
    if isinstance(schedule, Schedule):
        sched = schedule
    else:
        try:
            sched = SCHEDULES[ALIASES.get(schedule, schedule)]
        except KeyError:
            raise ConfigError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}") from None
    if chunks is None or chunks == sched.chunks:
        return sched
    if chunks < 1:
        raise ConfigError(f"--chunks {chunks}: give a positive number of model chunks per rank")
    if chunks > 1 and not sched.chunked:
        raise ConfigError(f"--chunks {chunks} needs --schedule interleaved ({sched.name} runs one chunk per rank)")
    return replace(sched, chunks=chunks)
