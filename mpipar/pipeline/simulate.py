"""Run every rank's action list in one process, no MPI: proves a schedule sound (every send
received, no deadlock) and measures it (bubble, peak activations held) before any process runs.

The model is the engine's, conservatively: a receive completes once its send has executed; a
send completes only once the receiver has executed the matching receive (MPI's rendezvous for
large messages); a rank blocks on its oldest send only when more than `send_window` are
outstanding, and at the end of its list. With `opt_barrier`, OPT is a barrier of all ranks
(an optimizer step with a collective in it, e.g. the global-norm clip). Compute takes `durations[op] / v` time
units, messages and OPT none (or `latency` per message); times are earliest-start given each rank's fixed order.
"""
from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Sequence

from .schedules import COMPUTE, Action, get, message


class ScheduleError(Exception):
    """A schedule's lists do not fit together (unmatched message or deadlock)."""


class DeadlockError(ScheduleError):
    pass


class UnmatchedError(ScheduleError):
    pass


@dataclass
class Result:
    makespan: float
    busy: list[float]                 # compute time per rank
    peak_held: list[int]              # most micro-batches (x chunks) whose activations a rank held
    messages: int
    spans: list[list[tuple[Action, float, float]]] = field(repr=False)   # per rank (action, start, end)

    @property
    def bubble(self) -> float:
        """Idle fraction of p x makespan."""
        return 1.0 - sum(self.busy) / (len(self.busy) * self.makespan) if self.makespan else 0.0


def default_durations(lists: Sequence[Sequence[Action]]) -> dict[str, float]:
    """Unit forward; backward 2 units, or 1 + 1 when split into B and W."""
    split = any(a.op == "W" for acts in lists for a in acts)
    return {"F": 1.0, "B": 1.0 if split else 2.0, "W": 1.0}


def simulate(lists: Sequence[Sequence[Action]], v: int = 1, durations: dict | None = None,
             send_window: int | None = 8, opt_barrier: bool = False, latency: float = 0.0) -> Result:
    """`latency`: time from a send until its receive can complete (0: the conservative model
    above; > 0 shows which schedules keep messages off their critical path)."""
    p = len(lists)
    dur = durations or default_durations(lists)
    timed = dur if callable(dur) else (lambda r, a: dur[a.op] / v)   # durations(rank, action): per stage
    pc, clock = [0] * p, [0.0] * p
    sent: dict[tuple, deque] = defaultdict(deque)          # key -> send times not yet received
    recv_time: dict[tuple, deque] = {}                      # (key, n) -> time received
    outstanding = [deque() for _ in range(p)]               # (key, n) of this rank's sends
    count: dict[tuple, int] = defaultdict(int)              # key -> sends so far (FIFO numbering)
    rcount: dict[tuple, int] = defaultdict(int)
    held, peak = [set() for _ in range(p)], [0] * p
    has_w = [{(a.mb, a.chunk) for a in acts if a.op == "W"} for acts in lists]
    spans = [[] for _ in range(p)]
    busy, messages = [0.0] * p, 0
    opt_arrivals: dict[int, dict[int, float]] = defaultdict(dict)
    opt_seen = [0] * p
    done = [False] * p

    def key_of(r, a):
        peer, kind, k = message(a, r, p)
        return (r, peer, kind, a.mb, k) if a.op.startswith("SEND") else (peer, r, kind, a.mb, k)

    def wait_send(r) -> bool:
        """Complete rank r's oldest send if its receive happened; False if it must block."""
        k = outstanding[r][0]
        if k not in recv_time:
            return False
        clock[r] = max(clock[r], recv_time[k])
        outstanding[r].popleft()
        return True

    def step(r) -> bool:
        """Run rank r's next action; False when it is blocked (or done)."""
        nonlocal messages
        acts = lists[r]
        while send_window is not None and len(outstanding[r]) > send_window:
            if not wait_send(r):
                return False
        if pc[r] == len(acts):
            while outstanding[r]:
                if not wait_send(r):
                    return False
            done[r] = True
            return False
        a = acts[pc[r]]
        if a.op in COMPUTE:
            t0 = clock[r]
            d = timed(r, a)
            clock[r] += d
            busy[r] += d
            spans[r].append((a, t0, clock[r]))
            if a.op == "F":
                held[r].add((a.mb, a.chunk))
                peak[r] = max(peak[r], len(held[r]))
            elif a.op == "W" or (a.op == "B" and (a.mb, a.chunk) not in has_w[r]):
                held[r].discard((a.mb, a.chunk))
        elif a.op.startswith("SEND"):
            k = key_of(r, a)
            n = count[k]
            count[k] += 1
            sent[k].append((n, clock[r]))
            outstanding[r].append((k, n))
            messages += 1
        elif a.op.startswith("RECV"):
            k = key_of(r, a)
            if not sent[k]:
                return False
            n, t = sent[k].popleft()
            if n != rcount[k]:
                raise UnmatchedError(f"rank {r}: {a!r} matched send #{n} of {k}, expected #{rcount[k]}")
            rcount[k] += 1
            clock[r] = max(clock[r], t + latency)
            recv_time[(k, n)] = clock[r]
        elif a.op == "OPT" and opt_barrier:
            i = opt_seen[r]
            opt_arrivals[i][r] = clock[r]
            if len(opt_arrivals[i]) < p:
                return False
            clock[r] = max(opt_arrivals[i].values())
            opt_seen[r] += 1
        elif a.op != "OPT":
            raise ScheduleError(f"rank {r}: unknown action {a!r}")
        pc[r] += 1
        return True

    progress = True
    while progress:
        progress = False
        for r in range(p):
            while not done[r] and step(r):
                progress = True
    if not all(done):
        why = explain_deadlock(lists, pc, outstanding, opt_seen, opt_arrivals, done, key_of, p, send_window)
        raise (UnmatchedError if why.startswith("unmatched") else DeadlockError)(why)
    left = [(k, q) for k, q in sent.items() if q]
    if left:
        (src, dst, kind, mb, k), _ = left[0]
        raise UnmatchedError(f"rank {src} sends {kind} of mb {mb} (virtual stage {k}) to rank {dst}, "
                             f"which never receives it ({len(left)} such message(s))")
    return Result(max(clock) if clock else 0.0, busy, peak, messages, spans)


def explain_deadlock(lists, pc, outstanding, opt_seen, opt_arrivals, done, key_of, p, send_window) -> str:
    """Follow who-waits-for-whom from a blocked rank until a rank repeats (the cycle) or a
    finished rank is reached (a message that will never come)."""
    def waits_for(r):
        full = send_window is not None and len(outstanding[r]) > send_window
        if pc[r] < len(lists[r]) and not full:
            a = lists[r][pc[r]]
            if a.op.startswith("RECV"):
                src = key_of(r, a)[0]
                return src, f"rank {r} waits for {a!r} from rank {src}"
            if a.op == "OPT":
                late = next(q for q in range(p) if q not in opt_arrivals[opt_seen[r]])
                return late, f"rank {r} waits at OPT for rank {late}"
        k = outstanding[r][0][0]
        return k[1], f"rank {r} waits for rank {k[1]} to receive its {k[2]} of mb {k[3]}"

    r = next(q for q in range(p) if not done[q])
    seen, path = [], []
    while r not in seen:
        seen.append(r)
        if done[r]:
            path.append(f"rank {r} has finished")
            return "unmatched: " + " -> ".join(path)
        r, why = waits_for(r)
        path.append(why)
    return "deadlock: " + " -> ".join(path[seen.index(r):])


# -- conveniences for tests and benchmarks ---------------------------------------------------

def lists_for(name: str, p: int, m: int, v: int = 1, steps: int = 1) -> list[list[Action]]:
    """Every rank's list; for a streaming schedule, `steps` steps joined with global numbers."""
    sched = get(name)
    if not sched.streaming:
        return [sched(p, m, s, v) for s in range(p)]
    out = []
    for s in range(p):
        acts = []
        for t in range(steps):
            acts += [Action(a.op, a.mb + (t if a.op == "OPT" else t * m), a.chunk)
                     for a in sched(p, m, s, v, step=t, steps=steps)]
        out.append(acts)
    return out


def run(name: str, p: int, m: int, v: int = 1, steps: int = 1, **kw) -> Result:
    return simulate(lists_for(name, p, m, v, steps), v=v, **kw)


def order_grid(lists: Sequence[Sequence[Action]], result: Result | None = None) -> str:
    """Printed order grid, one column per rank: compute actions in time order."""
    res = result or simulate(lists)
    cols = [[repr(a) for a, _, _ in res.spans[r]] for r in range(len(lists))]
    depth = max(map(len, cols))
    rows = ["  ".join(f"{'rank ' + str(r):>8}" for r in range(len(cols)))]
    for i in range(depth):
        rows.append("  ".join(f"{c[i] if i < len(c) else '':>8}" for c in cols))
    return "\n".join(rows)
