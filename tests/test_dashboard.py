"""The per-rank dashboard of a data-parallel run: each replica's own training loss (which the
job's loss is the sample-weighted mean of), traffic counted on the path the all-reduce took
(host-shared memory on one host, messages with --allreduce ring), the algorithm named in the
log, and the PNG written."""
import json

import pytest

from mpirun import mpirun

ARGV = ["viz-dp-lstm-temperature", "--epochs", "2", "--steps", "3", "--plot", "--hidden", "8", "--depth", "2",
        "--stream-steps", "0"]


def run(tmp_path, np_, *extra):
    p = mpirun(np_, "-m", "mpipar.run", *ARGV, *extra, "--out", str(tmp_path), timeout=180)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    ranks = [json.loads(line) for line in (tmp_path / "ranks.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return p.stdout, ranks, rows


def test_shared_memory_traffic_and_loss_per_replica(tmp_path):
    out, ranks, rows = run(tmp_path, 3)
    assert "data parallel: 1 bucket(s)" in out and "shm x1 over 3 ranks" in out, out
    assert len(ranks) == 2 * 3 and (tmp_path / "dashboard.png").stat().st_size > 10_000
    for epoch, row in enumerate(rows, 1):
        mine = [d for d in ranks if d["epoch"] == epoch]
        assert all(d["bytes_sent"] == 0 and d["bytes_shared"] > 0 for d in mine), mine   # no messages on one host
        assert len({d["bytes_shared"] for d in mine}) == 1                                  # every rank writes its vector
        weighted = sum(d["train_loss"] * d["samples"] for d in mine) / sum(d["samples"] for d in mine)
        assert len({round(d["train_loss"], 6) for d in mine}) == 3                          # each its own shard
        assert weighted == pytest.approx(row["train_loss"], rel=1e-6)


def test_ring_traffic_is_counted_as_messages(tmp_path):
    out, ranks, _ = run(tmp_path, 2, "--allreduce", "ring")
    assert "ring x1 over 2 ranks" in out, out
    assert all(d["bytes_sent"] > 0 and d["bytes_shared"] == 0 for d in ranks), ranks
