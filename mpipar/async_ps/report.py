"""After a run: the reporter's parameter snapshots evaluated by every rank (a slice each), the
staleness histogram as text, and time-to-accuracy. Snapshots are evaluated only after training,
so evaluation never slows the timed run nor favours sync or async."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .flat import flatten_
from .training import AsyncResult, Snapshot


def share_snapshots(world, result: AsyncResult) -> list[Snapshot]:
    """The reporter's snapshots, on every rank (three broadcasts of plain numbers)."""
    root, mine = result.reporter, result.snapshots
    n = torch.tensor([len(mine), mine[0].flat.numel() if mine else 0], dtype=torch.int64)
    world.bcast_(n, root)
    count, numel = int(n[0]), int(n[1])
    if count == 0:
        return []
    info = torch.zeros(count, 4, dtype=torch.float64)
    flats = torch.zeros(count, numel, dtype=result.final.dtype)
    if world.rank == root:
        info[:] = torch.tensor([[s.seconds, s.applied, s.version, s.loss] for s in mine], dtype=torch.float64)
        flats[:] = torch.stack([s.flat for s in mine])
    world.bcast_(info, root)
    world.bcast_(flats, root)
    return [Snapshot(float(a), int(b), int(c), float(d), flats[i])
            for i, (a, b, c, d) in enumerate(info.tolist())]


def evaluate_all(world, flats: list[torch.Tensor], model: nn.Module,
                 evaluate: Callable[[nn.Module], dict]) -> list[dict]:
    """evaluate(model) for each parameter vector; rank r does every size-th one from r, then
    all ranks exchange the numbers. `evaluate` must return the same keys every time."""
    flat = flatten_(model)
    keys, values = None, []
    for i, f in enumerate(flats):
        if i % world.size == world.rank:
            flat.copy_(f)
            got = evaluate(model)
            keys = keys or sorted(got)
            values.append((i, [float(got[k]) for k in keys]))
    # every rank learns the keys from one evaluation of the first vector (cheap, deterministic)
    if keys is None and flats:
        flat.copy_(flats[0])
        keys = sorted(evaluate(model))
    table = torch.zeros(len(flats), len(keys or []), dtype=torch.float64)
    for i, row in values:
        table[i] = torch.tensor(row, dtype=torch.float64)
    summed = world.allgather_floats(table.reshape(-1).tolist()).sum(0).reshape(table.shape)
    return [dict(zip(keys, row)) for row in summed.tolist()]


def histogram_lines(histogram: dict[int, int], width: int = 40) -> list[str]:
    """'  staleness 2 |#######        | 140 (23.3%)' per observed value, 0..max."""
    total = sum(histogram.values()) or 1
    top = max(histogram.values(), default=1)
    lines = []
    for s in range(max(histogram, default=-1) + 1):
        c = histogram.get(s, 0)
        bar = "#" * round(width * c / top)
        lines.append(f"  staleness {s:>3} |{bar:<{width}}| {c:>6} ({100 * c / total:5.1f}%)")
    return lines


def time_to(rows: list[dict], key: str, target: float) -> float | None:
    """Seconds at the first row whose `key` reaches `target` (None: never)."""
    return next((r["seconds"] for r in rows if r[key] >= target), None)
