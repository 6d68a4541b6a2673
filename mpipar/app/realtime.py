"""Serving under load: an arrival process, a micro-batching serving loop and its latency summary.

Pure Python (no MPI, no torch): the clock, the sleep and the inference are passed in, so the same
loop runs against `time.perf_counter`/`time.sleep` in the examples and against `FakeClock` in the
tests, where an `infer` of known duration makes every latency, queue length and deadline miss
exactly predictable. How ranks agree on batches is the caller's business (see the realtime
examples): the loop only asks `infer` to serve the batches it forms.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

PROCESSES = ("fixed", "poisson")


def arrival_times(rate: float, requests: int | None = None, duration: float | None = None,
                  process: str = "fixed", seed: int = 0) -> list[float]:
    """Arrival times in seconds from 0, at `rate` requests/s: `fixed` spacing 1/rate, or `poisson`
    (exponential gaps, reproducible from `seed`). The first request arrives at 0; the list stops
    after `requests` arrivals or before `duration` seconds, whichever comes first."""
    if process not in PROCESSES:
        raise ValueError(f"arrival process {process!r}: expected one of {', '.join(PROCESSES)}")
    if not rate > 0:
        raise ValueError(f"arrival rate must be > 0 requests/s, not {rate}")
    if requests is None and duration is None:
        raise ValueError("give a number of requests or a duration")
    rng = random.Random(seed)
    out: list[float] = []
    t = 0.0
    while requests is None or len(out) < requests:
        if process == "fixed":
            t = len(out) / rate          # no accumulated rounding: i/rate exactly rounded
        elif out:
            t += rng.expovariate(rate)
        if duration is not None and t >= duration:
            break
        out.append(t)
    return out


class FakeClock:
    """A clock that moves only when slept on, in whole microseconds, so that times written in
    decimal (10 ms, 15 ms) compare exactly: `clock()` is ticks / 1e6, the correctly rounded value
    that `i / rate` also gives. Every sleep of a positive time advances at least one tick."""

    def __init__(self):
        self.ticks = 0

    def clock(self) -> float:
        return self.ticks / 1e6

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            self.ticks += max(1, round(seconds * 1e6))


@dataclass(frozen=True)
class Served:
    """One request's times (seconds from the schedule's start) and the batch that carried it."""
    index: int
    arrival: float
    start: float
    done: float
    batch: int

    @property
    def latency(self) -> float:
        return self.done - self.arrival


@dataclass
class ServeLog:
    """What one serving loop did: every request's record, the longest queue, each batch's output."""
    records: list[Served]
    max_queue: int
    outputs: list

    @property
    def batches(self) -> int:
        return len(self.outputs)


def serve(arrivals: Sequence[float], infer: Callable, inputs=None, max_batch: int = 1, max_wait: float = 0.0,
          clock: Callable[[], float] = time.perf_counter, sleep: Callable[[float], None] = time.sleep) -> ServeLog:
    """Serve requests 0..n-1 arriving at `arrivals` (sorted, seconds from the call) in arrival order.

    Whenever the server is free and a request waits, a batch is formed of the waiting requests
    (at most `max_batch`, oldest first) and `infer(inputs[i:j])` serves it (`infer(range(i, j))`
    without inputs); its output is kept. With `max_wait` > 0 the server holds a part-full batch
    for more arrivals, but never past the oldest waiting request's arrival + max_wait. The queue
    only grows between batches, so its length just before each batch is its maximum since the
    previous one."""
    if max_batch < 1:
        raise ValueError(f"max batch must be >= 1, not {max_batch}")
    n = len(arrivals)
    t0 = clock()
    records: list[Served] = []
    outputs: list = []
    max_queue = 0
    nxt = came = 0                            # oldest request not yet served; first not yet arrived
    while nxt < n:
        now = clock() - t0
        if arrivals[nxt] > now:               # idle: nothing waits
            sleep(arrivals[nxt] - now)
            continue
        while came < n and arrivals[came] <= now:
            came += 1                         # requests nxt..came-1 are waiting
        waiting = came - nxt
        hold_until = arrivals[nxt] + max_wait
        if waiting < max_batch and came < n and now < hold_until:
            sleep(min(hold_until, arrivals[came]) - now)
            continue
        max_queue = max(max_queue, waiting)
        end = nxt + min(waiting, max_batch)
        start = clock() - t0
        outputs.append(infer(range(nxt, end) if inputs is None else inputs[nxt:end]))
        done = clock() - t0
        records += [Served(i, arrivals[i], start, done, end - nxt) for i in range(nxt, end)]
        nxt = end
    return ServeLog(records, max_queue, outputs)


def follow(next_size: Callable[[], int], infer: Callable, inputs=None) -> int:
    """The other side of a lockstep server: serve the batches another process forms, in order,
    told only their sizes (`next_size()`; 0 ends); returns the number of batches served."""
    nxt = batches = 0
    while (k := next_size()) > 0:
        infer(range(nxt, nxt + k) if inputs is None else inputs[nxt:nxt + k])
        nxt, batches = nxt + k, batches + 1
    return batches


@dataclass(frozen=True)
class Summary:
    """What a serving run achieved, and its one-line report."""
    process: str
    offered: float        # requests/s asked for (nominal: a short Poisson sample runs faster or slower)
    achieved: float       # completed requests / (last completion - first arrival)
    completed: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    missed: int
    deadline_ms: float
    max_queue: int

    @property
    def missed_share(self) -> float:
        return self.missed / self.completed if self.completed else 0.0

    def line(self) -> str:
        return (f"serving: {self.process} {self.offered:.4g} req/s offered, {self.achieved:.4g} achieved, "
                f"latency p50 {self.p50_ms:.1f} ms p95 {self.p95_ms:.1f} ms p99 {self.p99_ms:.1f} ms, "
                f"{self.missed}/{self.completed} ({self.missed_share:.1%}) missed the {self.deadline_ms:g} ms "
                f"deadline, max queue {self.max_queue}")


def summarize(arrivals: Sequence[float], dones: Sequence[float], deadline: float, offered: float,
              max_queue: int, process: str = "fixed") -> Summary:
    """The summary of served requests given as parallel lists (so several servers' requests can be
    pooled): latency percentiles, throughput, misses (latency > deadline, seconds)."""
    a, d = np.asarray(arrivals, dtype=np.float64), np.asarray(dones, dtype=np.float64)
    lat = d - a
    if len(lat) == 0:
        return Summary(process, offered, 0.0, 0, math.nan, math.nan, math.nan, 0, deadline * 1e3, max_queue)
    elapsed = float(d.max() - a.min())
    p50, p95, p99 = np.percentile(lat * 1e3, [50, 95, 99])
    return Summary(process, offered, len(lat) / elapsed if elapsed > 0 else math.inf, len(lat),
                   float(p50), float(p95), float(p99), int((lat > deadline).sum()), deadline * 1e3, max_queue)


def summarize_log(run: ServeLog, deadline: float, offered: float, process: str = "fixed") -> Summary:
    """summarize() of one serving loop."""
    return summarize([r.arrival for r in run.records], [r.done for r in run.records], deadline, offered,
                     run.max_queue, process)
