"""A recorded series replayed as a stream of timestamped readings, and the prequential loop that
consumes it: forecast each reading from the model as it stands, then learn from its truth.

Pure (no MPI, no trainer): the stream is deterministic, so every rank of a job generates the same
one itself and they stay in lockstep without sending readings; how a forecast or an update is
computed is passed in, so the tests drive the loop with plain functions.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch


def stream(values, timestamps, window: int, start: int | None = None,
           stop: int | None = None) -> Iterator[tuple[int, torch.Tensor, float]]:
    """(timestamp, past_window, next_value) for each reading t in [start, stop), in time order:
    timestamp = when reading t was logged (seconds, as `timestamps` holds them), past_window =
    values[t - window : t] (what is known when t is forecast), next_value = values[t] (its truth).
    `start` defaults to the first reading with a full window behind it."""
    v = torch.as_tensor(values)
    ts = torch.as_tensor(timestamps)
    if v.ndim != 1 or ts.shape != v.shape:
        raise ValueError(f"values and timestamps must be 1-D of one length, got {tuple(v.shape)}, {tuple(ts.shape)}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    start = window if start is None else start
    stop = len(v) if stop is None else min(stop, len(v))
    if start < window:
        raise ValueError(f"start={start}: the first {window} readings have no full window behind them")
    for t in range(start, stop):
        yield int(ts[t]), v[t - window:t], float(v[t])


def groups(readings: Iterable, size: int) -> Iterator[list]:
    """Consecutive groups of `size` readings (the last one may be shorter)."""
    if size < 1:
        raise ValueError(f"group size must be >= 1, got {size}")
    group: list = []
    for r in readings:
        group.append(r)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def prequential(batches: Iterable, forecast: Callable, learn: Callable) -> list:
    """Online learning scored prequentially: for each (x, y) in order, forecast(x) with the model
    as it stands (y not yet seen), then learn(x, y, step, steps) once the truth has arrived. The
    last batch is forecast but not learnt from: no forecast follows it, so its update would go
    unscored. Returns the forecasts, one per batch, in stream order."""
    batches = list(batches)
    out = []
    for i, (x, y) in enumerate(batches):
        out.append(forecast(x))
        if i + 1 < len(batches):
            learn(x, y, i, len(batches) - 1)
    return out
