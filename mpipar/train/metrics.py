"""Per-epoch metrics: summed on the reporting rank, printed by rank 0, written as JSONL."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

IGNORE = -100


class Tally:
    """Sums over an epoch of (loss * weight, correct, n, weight) so means are exact whatever the
    batching. A loss's weight is what it averages over: the counted targets (n), or the samples
    when the loss says `mean_over = "samples"` (a mean of per-sample means, e.g. of sentences of
    different lengths: weighting those by tokens would depend on how the batch was split)."""

    def __init__(self, loss_fn, task: str):
        self.loss_fn, self.task = loss_fn, task
        self.loss = self.correct = self.n = self.weight = 0.0
        self.per_sample = getattr(loss_fn, "mean_over", None) == "samples"
        self.nonfinite = 0      # losses added that were inf or NaN (what the trainer's step guard asks)

    @torch.no_grad()
    def add(self, out: torch.Tensor, y: torch.Tensor) -> None:
        """Classification targets equal to IGNORE (-100, as in CrossEntropyLoss) are not
        counted: masked node classification passes the whole graph with unlabelled nodes. An
        empty shard (a short last batch over many replicas) adds nothing (its mean is nan)."""
        if len(y) == 0:
            return
        if self.task == "classification":
            valid = y != IGNORE
            n = int(valid.sum())
            if n == 0:
                return
            self.correct += float((out.argmax(-1)[valid] == y[valid]).sum())
        else:
            n = len(y)
        weight = len(y) if self.per_sample else n
        loss = float(self.loss_fn(out.detach().float(), y))
        self.nonfinite += not math.isfinite(loss)
        self.loss += loss * weight
        self.n += n
        self.weight += weight

    def vector(self) -> list[float]:
        return [self.loss, self.correct, self.n, self.weight]

    def load(self, vector) -> None:
        """Continue from a saved vector() (three sums, from before the weight was kept: weight = n)."""
        vector = [float(v) for v in vector]
        self.loss, self.correct, self.n, self.weight = vector if len(vector) == 4 else [*vector, vector[2]]


def error_metric(loss_fn) -> str | None:
    """What a regression loss's mean says about the error: 'rmse' for a mean squared error
    (its square root), 'mae' for a mean absolute error (itself); None for any other loss, whose
    mean is reported only as the loss."""
    if isinstance(loss_fn, torch.nn.MSELoss) and loss_fn.reduction == "mean":
        return "rmse"
    if isinstance(loss_fn, torch.nn.L1Loss) and loss_fn.reduction == "mean":
        return "mae"
    return None


def summarize(vec, task: str, prefix: str, error: str | None = None) -> dict:
    """A metrics row's entries from summed (loss * weight, correct, n, weight) (Tally.vector):
    the mean loss, accuracy for classification, and for regression the `error` metric (see
    error_metric) when it has one."""
    loss, correct, n, weight = vec
    row = {f"{prefix}_loss": loss / max(weight, 1)}
    if task == "classification":
        row[f"{prefix}_accuracy"] = correct / max(n, 1)
    elif error == "rmse":
        row[f"{prefix}_rmse"] = math.sqrt(loss / max(n, 1))
    elif error == "mae":
        row[f"{prefix}_mae"] = loss / max(n, 1)
    return row


def format_row(row: dict) -> str:
    parts = [f"epoch {row['epoch']}"]
    for k, v in row.items():
        if k == "epoch":
            continue
        if k.startswith("step_ms_p") and k != "step_ms_p50":
            continue
        name = {"samples_per_s": "samples/s", "steps_per_s": "steps/s", "step_ms_p50": "step ms p50"}.get(k, k.replace("_", " "))
        parts.append(f"{name} {v:.4g}" if isinstance(v, float) else f"{name} {v}")
    return "  ".join(parts)


def json_line(row: dict) -> str:
    """`row` as one line of strict JSON: a non-finite number (a diverged loss, a percentile of no
    steps) is null, as JSON has no NaN or Infinity."""
    return json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()},
                      allow_nan=False)


class MetricsFile:
    """metrics.jsonl in the output dir: one JSON object per epoch (written by rank 0 only)."""

    def __init__(self, out_dir: Path):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "metrics.jsonl"
        self.path.write_text("")

    def write(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json_line(row) + "\n")
