"""`--timeline PATH`: every rank records when each of its actions really started and ended;
the records reach rank 0 as fixed-size float arrays through comm (no pickle) and become a
Chrome/Perfetto trace (PATH.json) and a Gantt chart (PATH.png) with the bubbles visible."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..extras import need, pyplot

OPS = ["F", "B", "W", "OPT"]
COLORS = {"F": "#4C72B0", "B": "#55A868", "W": "#DD8452", "OPT": "#8C8C8C"}
FIELDS = 6   # step, op, mb, chunk, start, end (seconds since the common origin)


class Recorder:
    """One rank's action times; keeps the last `keep_steps` steps."""

    def __init__(self, keep_steps: int = 20):
        self.keep_steps, self.step, self.rows = keep_steps, -1, []
        self.origin = time.perf_counter()

    def sync(self, world) -> None:
        """Common time origin (collective). On one host perf_counter is one system-wide
        monotonic clock, so all ranks take the same origin and times are exact; across hosts
        each takes the moment it left a barrier (off by the barrier's exit skew)."""
        world.barrier()
        mine = time.perf_counter()
        origins = world.allgather_floats([mine])[:, 0]
        self.origin = float(origins.min()) if len(set(world.hosts())) == 1 else mine

    def begin_step(self) -> None:
        self.step += 1
        if self.keep_steps and self.rows and self.rows[0][0] <= self.step - self.keep_steps:
            self.rows = [r for r in self.rows if r[0] > self.step - self.keep_steps]

    def add(self, op: str, mb: int, chunk: int, t0: float, t1: float) -> None:
        self.rows.append((self.step, OPS.index(op), mb, chunk, t0 - self.origin, t1 - self.origin))

    def array(self) -> np.ndarray:
        return np.asarray(self.rows, dtype=np.float64).reshape(-1, FIELDS)


def gather(world, rec: Recorder) -> list[np.ndarray]:
    """Every rank's rows, on every rank: counts first, then one padded all-gather."""
    mine = rec.array()
    n = int(world.allgather_floats([len(mine)]).max())
    padded = np.full((n, FIELDS), np.nan)
    padded[:len(mine)] = mine
    every = world.allgather_floats(padded.reshape(-1)).reshape(world.size, n, FIELDS)
    return [r[~np.isnan(r[:, 0])] for r in every]


def measured_bubble(ranks: list[np.ndarray]) -> float:
    """Idle share of (ranks x step time), averaged over the recorded steps after the first
    (which pays one-time costs). Step time runs from its first action's start on any rank to
    its last action's end on any rank; F, B and W count as work."""
    steps = sorted({int(s) for r in ranks for s in r[:, 0]})
    if len(steps) > 1:
        steps = steps[1:]
    fractions = []
    for s in steps:
        rows = [r[(r[:, 0] == s)] for r in ranks]
        rows = [r for r in rows if len(r)]
        if not rows:
            continue
        start = min(r[:, 4].min() for r in rows)
        end = max(r[:, 5].max() for r in rows)
        work = sum(((r[:, 5] - r[:, 4]) * (r[:, 1] < OPS.index("OPT"))).sum() for r in rows)
        if end > start:
            fractions.append(1.0 - work / (len(ranks) * (end - start)))
    return float(np.mean(fractions)) if fractions else float("nan")


def write_trace(ranks: list[np.ndarray], path: Path) -> Path:
    events = [{"name": "thread_name", "ph": "M", "pid": 0, "tid": r, "args": {"name": f"rank {r}"}}
              for r in range(len(ranks))]
    for r, rows in enumerate(ranks):
        for step, op, mb, chunk, t0, t1 in rows:
            name = OPS[int(op)] + str(int(mb)) + (f".{int(chunk)}" if chunk else "")
            events.append({"name": name, "cat": OPS[int(op)], "ph": "X", "pid": 0, "tid": r,
                           "ts": t0 * 1e6, "dur": max(t1 - t0, 0.0) * 1e6,
                           "args": {"step": int(step), "mb": int(mb), "chunk": int(chunk)}})
    path.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
    return path


def write_gantt(ranks: list[np.ndarray], path: Path, title: str, last_steps: int = 2) -> Path:
    """One row per rank, actions as coloured bars, gaps (bubbles) left white."""
    plt = pyplot()
    Patch = need("matplotlib.patches", "the timeline chart").Patch

    top = max((int(r[:, 0].max()) for r in ranks if len(r)), default=0)
    shown = [r[r[:, 0] > top - last_steps] for r in ranks]
    t_min = min((r[:, 4].min() for r in shown if len(r)), default=0.0)
    fig, ax = plt.subplots(figsize=(12, 0.6 * len(ranks) + 1.6))
    for rank, rows in enumerate(shown):
        for op_i, op in enumerate(OPS):
            for later in (False, True):          # chunks after the first (interleaved) are hatched
                sel = rows[(rows[:, 1] == op_i) & ((rows[:, 3] > 0) == later)]
                bars = [((t0 - t_min) * 1e3, (t1 - t0) * 1e3) for t0, t1 in sel[:, 4:6]]
                ax.broken_barh(bars, (rank - 0.4, 0.8), facecolors=COLORS[op], edgecolor="white", linewidth=0.3,
                               hatch="///" if later else None)
        if len(rows) <= 120:   # labels only while they stay readable
            for _, op, mb, chunk, t0, t1 in rows:
                label = str(int(mb)) + (f".{int(chunk)}" if chunk else "")
                ax.text((t0 + t1) / 2 * 1e3 - t_min * 1e3, rank, label, ha="center", va="center", fontsize=6,
                        color="white")
    ax.set_yticks(range(len(ranks)), [f"rank {r}" for r in range(len(ranks))])
    ax.invert_yaxis()
    ax.set_xlabel("time (ms)")
    ax.set_title(title, fontsize=10)
    present = [o for i, o in enumerate(OPS) if any((r[:, 1] == i).any() for r in shown)]
    ax.legend(handles=[Patch(color=COLORS[o], label=o) for o in present], loc="upper left",
              bbox_to_anchor=(1.0, 1.0), fontsize=8, title="white: idle", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write(world, rec: Recorder, path: str, formula: float, label: str, log=print) -> float | None:
    """Collective: gather to everyone, rank 0 writes PATH.json and PATH.png and prints the
    measured bubble next to the formula. Returns the measured bubble on rank 0."""
    ranks = gather(world, rec)
    if world.rank != 0:
        return None
    base = Path(path)
    base = base.with_suffix("") if base.suffix in (".json", ".png") else base
    base.parent.mkdir(parents=True, exist_ok=True)
    bubble = measured_bubble(ranks)
    trace = write_trace(ranks, base.with_suffix(".json"))
    png = write_gantt(ranks, base.with_suffix(".png"),
                      f"{label}: measured bubble {bubble:.3f}, formula {formula:.3f}")
    log(f"timeline: {trace} and {png}; measured bubble fraction {bubble:.3f} vs formula {formula:.3f} ({label})")
    return bubble
