"""The per-rank dashboard of a data-parallel run: each replica's own training loss (which the
job's loss is the sample-weighted mean of), traffic counted on the path the all-reduce took
(host-shared memory on one host, messages with --allreduce ring), the algorithm named in the
log, and the PNG written. Both runs in one job of 3 ranks (tests/mpi/runs_in_turn.py)."""
import json
import re

import pytest

from mpirun import MPI_DIR, mpirun

ARGV = ["viz-dp-lstm-temperature", "--epochs", "2", "--steps", "3", "--plot", "--hidden", "8", "--depth", "2",
        "--stream-steps", "0"]
RUNS = {"shared": [], "ring": ["--allreduce", "ring"]}   # the all-reduce's path: auto (one host: shared memory), ring


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both runs on 3 ranks, one after the other in ONE job: {name: (stdout, ranks.jsonl, metrics.jsonl)}."""
    d = tmp_path_factory.mktemp("dashboard")
    lines = [json.dumps([*ARGV, *extra, "--out", str(d / name)]) for name, extra in RUNS.items()]
    p = mpirun(3, str(MPI_DIR / "runs_in_turn.py"), *lines, timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    shared, ring = re.split(r"(?m)^(?=mpipar \S+ \| )", p.stdout)[1:]   # each run's log starts with its banner
    return {name: (out, [json.loads(line) for line in (d / name / "ranks.jsonl").read_text().splitlines()],
                   [json.loads(line) for line in (d / name / "metrics.jsonl").read_text().splitlines()], d / name)
            for name, out in (("shared", shared), ("ring", ring))}


def test_shared_memory_traffic_and_loss_per_replica(runs):
    out, ranks, rows, folder = runs["shared"]
    assert "data parallel: 1 bucket(s)" in out and "shm x1 over 3 ranks" in out, out
    assert len(ranks) == 2 * 3 and (folder / "dashboard.png").stat().st_size > 10_000
    for epoch, row in enumerate(rows, 1):
        mine = [d for d in ranks if d["epoch"] == epoch]
        assert all(d["bytes_sent"] == 0 and d["bytes_shared"] > 0 for d in mine), mine   # no messages on one host
        assert len({d["bytes_shared"] for d in mine}) == 1                                  # every rank writes its vector
        weighted = sum(d["train_loss"] * d["samples"] for d in mine) / sum(d["samples"] for d in mine)
        assert len({round(d["train_loss"], 6) for d in mine}) == 3                          # each its own shard
        assert weighted == pytest.approx(row["train_loss"], rel=1e-6)


def test_ring_traffic_is_counted_as_messages(runs):
    out, ranks, _, _ = runs["ring"]
    assert "ring x1 over 3 ranks" in out and "shm" not in out, out
    assert all(d["bytes_sent"] > 0 and d["bytes_shared"] == 0 for d in ranks), ranks
