"""Examples run longer than their short form, with checks of their own, in the 2- and 3-rank jobs
of tests/test_mpi_cases.py (each was a job of its own: N ranks' start of torch saved): the
tensor-parallel examples' parity line and curves, the realtime examples' `serving:` line,
async-gcn-cora against its synchronous run, gpt-shakespeare pipelined (its module cut by
Pipeline). Each case parses the command line as `python -m mpipar.run` does and runs it on this
job's World; rank 0 checks what every rank printed and what the run wrote."""
import json
import re

import pytest

import job
from checked_outputs import GAP

NP = (2, 3)
TIMEOUT = 240
QUICK = {2: ("test_example_run",)}   # the realtime examples were in `pytest -m quick` as jobs of their own


def tensor_parallel_parity_and_curves(out, printed):
    assert "parity after 20 steps: tensor-parallel parameters equal single-process training" in printed, printed
    assert "allreduce forward" in printed and (out / "learning_curves.png").stat().st_size > 10_000


SERVING = re.compile(r"serving: (\w+) (\S+) req/s offered, (\S+) achieved, latency p50 (\S+) ms p95 (\S+) ms "
                     r"p99 (\S+) ms, (\d+)/(\d+) \((\S+)%\) missed the (\S+) ms deadline, max queue (\d+)")


def serves_requests(grid):
    """One sane `serving:` line from the realtime example, and its latency report."""
    def check(out, printed):
        lines = [ln for ln in printed.splitlines() if ln.startswith("serving:")]
        assert len(lines) == 1, printed[-2000:]
        m = SERVING.match(lines[0])
        assert m, lines[0]
        process, offered, achieved, p50, p95, p99 = m.group(1), *map(float, m.group(2, 3, 4, 5, 6))
        missed, total, deadline, queue = int(m.group(7)), int(m.group(8)), float(m.group(10)), int(m.group(11))
        assert process == "poisson" and offered == 200 and total == 100 and deadline == 20, lines[0]
        assert 0 < achieved < 2 * offered and 0 < p50 <= p95 <= p99 and 0 <= missed <= total and queue >= 1, lines[0]
        assert f"({grid} tp=1)" in printed and "per-batch latency p50" in printed and "serving p99" in printed
    return check


def async_compares_sync(out, printed):
    """1 server + 2 workers, a straggler, --compare-sync: both runs, histogram, summary, metrics
    rows (this replaces the generic example smoke test for it)."""
    assert "k=0 (synchronous)" in printed and "--- k=3:" in printed and "sync vs async (k=3)" in printed, printed[-3000:]
    assert "staleness   0 |" in printed and "summary: async-gcn-cora on 3 ranks" in printed
    for name in ("metrics.jsonl", "sync_metrics.jsonl"):
        rows = [json.loads(line) for line in (out / name).read_text().splitlines()]
        assert rows and all(r["samples_per_s"] > 0 for r in rows) and rows[-1]["final"]


def pipelined_gpt(out, printed):
    """gpt-shakespeare --grid pp=2: the blocks spread over the stages (the tied head on the last),
    progress lines, validation and a generated sample, and single-process training's losses."""
    assert re.search(r"^ +0 +0 +0 +0 +0 +tok_emb\.\.blocks_0 ", printed, re.M), printed[:2000]
    assert re.search(r"^ +1 +1 +0 +0 +1 +blocks_1\.\.head ", printed, re.M), printed[:2000]
    assert re.search(r"^step 6/8  train loss [0-9.]+  [0-9,]+ tokens/s  ETA", printed, re.M), printed[-2000:]
    assert "generated (40 characters" in printed and "validation loss" in printed, printed[-2000:]
    gap = re.search(r"largest train-loss gap to single process: (\S+)\)", printed)
    assert gap and float(gap.group(1)) < GAP, printed[-2000:]


RUNS = {   # name: (ranks, argv, check(the --out folder, what every rank printed))
    "tp-mlp": (2, ["tp-mlp", "--n-train", "640", "--n-test", "200", "--hidden", "128", "--epochs", "2", "--steps", "10"],
               tensor_parallel_parity_and_curves),
    "tp-transformer": (2, ["tp-transformer", "--max-number", "999", "--epochs", "2", "--d-model", "32", "--ff", "64"],
                       tensor_parallel_parity_and_curves),
    "gpt-shakespeare-pp2": (2, ["gpt-shakespeare", "--grid", "pp=2", "--epochs", "2", "--steps", "4", "--warmup", "2",
                                "--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--block-size", "16",
                                "--val-windows", "24", "--log-every", "2", "--sample-chars", "40", "--compare"],
                            pipelined_gpt),
    "realtime-mp-accel": (2, ["realtime-mp-accel", "--epochs", "1", "--steps", "3", "--requests", "100"],
                          serves_requests("pp=2 dp=1")),
    "realtime-dp-accel": (2, ["realtime-dp-accel", "--epochs", "1", "--steps", "3", "--requests", "100"],
                          serves_requests("pp=1 dp=2")),
    "async-gcn-cora-compare-sync": (3, ["async-gcn-cora", "--epochs", "4", "--max-staleness", "3", "--slow-rank", "2",
                                        "--slow-factor", "3", "--compare-sync"], async_compares_sync),
}


@pytest.mark.parametrize("name", sorted(n for n, (ranks, _, _) in RUNS.items() if ranks == job.size()))
def test_example_run(world, name, mpi_tmp_path):
    _, argv, check = RUNS[name]
    out = mpi_tmp_path / name
    printed = world.comm.gather(job.run(world, [*argv, "--out", str(out)]))
    if world.rank == 0:
        check(out, "".join(printed))
