"""The metric definitions on fixed predictions: RMSE only for a mean squared error, MAE for a mean
absolute error, neither for any other regression loss, accuracy ignoring unlabelled targets, and
the same numbers whatever the batching."""
import math

import pytest
import torch
from torch import nn

from mpipar.train.metrics import IGNORE, Tally, error_metric, summarize

OUT = torch.tensor([[1.0], [2.0], [4.0], [0.0]])
Y = torch.tensor([[0.0], [2.0], [1.0], [2.0]])


def row(loss_fn, batches=((0, 4),)):
    t = Tally(loss_fn, "regression")
    for a, b in batches:
        t.add(OUT[a:b], Y[a:b])
    return summarize(t.vector(), "regression", "test", error_metric(loss_fn))


@pytest.mark.parametrize("batches", [((0, 4),), ((0, 1), (1, 4)), ((0, 3), (3, 4))])
def test_rmse_is_the_root_of_the_mean_squared_error(batches):
    r = row(nn.MSELoss(), batches)
    assert r["test_loss"] == pytest.approx((1 + 0 + 9 + 4) / 4)
    assert r["test_rmse"] == pytest.approx(math.sqrt((1 + 0 + 9 + 4) / 4)) and "test_mae" not in r


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_an_empty_shard_adds_nothing(task):
    """A short last batch over many replicas leaves some shards empty: their mean loss is nan,
    which must neither enter the epoch's mean nor count as a non-finite step (before, it stopped
    the run: `mpipar.run mlp --grid dp=4 --batch-size 5`, the last batch 3 samples)."""
    t = Tally(nn.MSELoss() if task == "regression" else nn.CrossEntropyLoss(), task)
    t.add(torch.zeros(0, 2), torch.zeros(0, 2) if task == "regression" else torch.zeros(0, dtype=torch.long))
    assert t.nonfinite == 0 and t.vector() == [0.0, 0.0, 0, 0]


def test_mae_is_the_mean_absolute_error_and_an_l1_loss_has_no_rmse():
    r = row(nn.L1Loss())
    assert r["test_mae"] == pytest.approx((1 + 0 + 3 + 2) / 4) and "test_rmse" not in r


def test_other_regression_losses_report_only_the_loss():
    r = row(nn.SmoothL1Loss())
    assert set(r) == {"test_loss"}
    assert error_metric(nn.MSELoss(reduction="sum")) is None


def test_accuracy_ignores_unlabelled_targets():
    t = Tally(nn.CrossEntropyLoss(), "classification")
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])
    t.add(logits, torch.tensor([0, 0, IGNORE, 1]))
    r = summarize(t.vector(), "classification", "train")
    assert r["train_accuracy"] == pytest.approx(2 / 3) and "train_rmse" not in r


def test_a_per_sample_loss_is_averaged_over_samples_whatever_the_split():
    """SentenceCrossEntropy is a mean of per-sentence means: the epoch mean of a batch tallied in
    two uneven shards equals the whole batch's (a token-weighted tally would not: the shards hold
    different numbers of tokens), while accuracy still counts tokens."""
    from mpipar.app.layers import SentenceCrossEntropy
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, 6, generator=g)
    y = torch.randint(0, 6, (5, 4), generator=g)
    y[0, 1:] = IGNORE                                       # sentences of 1 to 4 tokens
    y[1, 2:] = IGNORE
    whole, parts = Tally(SentenceCrossEntropy(), "classification"), Tally(SentenceCrossEntropy(), "classification")
    whole.add(logits, y)
    parts.add(logits[:2], y[:2])
    parts.add(logits[2:], y[2:])
    a, b = summarize(whole.vector(), "classification", "train"), summarize(parts.vector(), "classification", "train")
    assert a["train_loss"] == pytest.approx(float(SentenceCrossEntropy()(logits, y)), rel=1e-6)
    assert b == pytest.approx(a, rel=1e-6)
    token = Tally(nn.CrossEntropyLoss(), "classification")   # a token mean stays token-weighted
    token.add(logits[:2].reshape(-1, 6), y[:2].reshape(-1))
    assert token.vector()[2] == token.vector()[3] == float((y[:2] != IGNORE).sum())


def test_metrics_rows_are_strict_json_with_null_for_non_finite_numbers(tmp_path):
    """A diverged loss (inf, NaN) or a percentile of no steps is null in metrics.jsonl and
    ranks.jsonl: JSON has no NaN or Infinity, and a strict reader refuses Python's bare NaN."""
    import json

    from mpipar.train.metrics import MetricsFile
    from mpipar.train.observe import Dashboard

    def strict(line):
        return json.loads(line, parse_constant=lambda c: pytest.fail(f"not JSON: {c} in {line}"))

    MetricsFile(tmp_path).write({"epoch": 1, "train_loss": float("nan"), "test_loss": float("inf"),
                                 "step_ms_p50": -float("inf"), "samples_per_s": 12.5})
    row = strict((tmp_path / "metrics.jsonl").read_text())
    assert row == {"epoch": 1, "train_loss": None, "test_loss": None, "step_ms_p50": None, "samples_per_s": 12.5}
    Dashboard(tmp_path, ["h0", "h1"], "t", plot=False, live=False).add(row, [[1, 1, 1, 0, 0, 0, 0, float("nan")],
                                                                           [1, 1, 1, 0, 0, 0, 0, 0.5]])
    ranks = [strict(line) for line in (tmp_path / "ranks.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in ranks] == [None, 0.5]
