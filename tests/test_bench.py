"""The benchmarks still run and print their side-by-side tables (tiny sizes: these tests check
that the code works, never how fast; speed is read from full runs, see README's Benchmarks)."""
import os
import re
import subprocess
import sys

import pytest

from cluster import netns
from mpirun import ENV, ROOT, mpirun


def bench(np_, *argv, timeout=180):
    p = mpirun(np_, "-m", "mpipar.bench", *argv, timeout=timeout)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p.stdout


@pytest.mark.quick
def test_p2p_prints_ours_over_raw_per_size():
    out = bench(2, "p2p", "--max-mib", "1", "--repeats", "1")
    rows = [l for l in out.splitlines() if re.match(r"\s+\d+ (KiB|MiB)\s", l)]
    assert len(rows) == 5, out          # 4, 16, 64, 256 KiB, 1 MiB
    assert all(float(r.split()[-1]) > 0 for r in rows)


def test_allreduce_table_has_every_size_and_ratio():
    out = bench(3, "allreduce", "--sizes", "1K,64K,1M", "--rounds", "2", "--no-gloo")
    rows = [l for l in out.splitlines() if re.match(r"\s+\d+ (KiB|MiB)\s", l) and l.rstrip().endswith("x")]
    assert [r.split()[0] + r.split()[1] for r in rows] == ["1KiB", "64KiB", "1MiB"], out
    assert "shm" in out     # 3 ranks on one host: auto picks the shared-memory all-reduce


def test_pipeline_efficiency_rows_for_each_schedule():
    out = bench(4, "pipeline", "--part", "a", "--schedules", "1f1b,zb", "--ms", "4", "--tf", "1", "--tb", "2",
                "--repeats", "1")
    assert "sleep calibration" in out
    for name in ("1f1b", "zb"):
        row = next(l for l in out.splitlines() if l.startswith(name))
        measured, ideal = float(row.split()[2]), float(row.split()[3])
        assert measured > 0 and ideal > 0, row


def test_dp_step_times_ours_ours_bf16_ddp_and_the_hybrid():
    out = bench(2, "dp-step", "--steps", "2", "--batch", "4", "--hybrid")
    row = next(l for l in out.splitlines() if l.startswith("local "))
    times = dict(zip(row.split()[0::2], map(float, row.split()[1::2])))
    assert set(times) == {"local", "ours", "ours+bf16", "ddp-gloo", "pp2-ours"} and all(v > 0 for v in times.values()), out
    assert "synthetic inputs" in out and "ours/ddp-gloo" in out, out
    assert f"pp=2 x dp=1 (1F1B, 4 micro-batches; the same global batch): {times['pp2-ours']:.1f} ms" in out, out


def test_balance_rows_for_each_partition():
    out = bench(2, "balance", "--examples", "pipeline-cifar", "--steps", "2", "--warmup", "1",
                "--microbatches", "2", "--batch-size", "8")
    rows = {(l.split()[0], l.split()[1]): l.split() for l in out.splitlines()
            if len(l.split()) > 2 and l.split()[1] in ("params", "layers", "time", "best")}
    assert set(rows) == {("1f1b", b) for b in ("params", "layers", "time", "best")} | {("eager-1f1b", "time")}, out
    assert float(rows[("1f1b", "best")][4].rstrip("x")) == 1.0, out
    assert all(float(r[3]) > 0 and 0 <= float(r[5]) < 1 for r in rows.values()), out
    assert rows[("1f1b", "time")][2] == rows[("eager-1f1b", "time")][2]     # the same cut under both


def test_oversubscribed_rows_with_and_without_yield():
    p = subprocess.run([sys.executable, "-m", "mpipar.bench", "oversubscribed", "--np", "3", "--steps", "3",
                        "--repeats", "1", "--waits", "poll"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    rows = {l.split()[0]: l.split()[1:] for l in p.stdout.splitlines() if l.split()[:1] in (["spin"], ["poll"])}
    assert set(rows) == {"poll"} and all(float(v[0]) > 0 and float(v[1]) > 0 for v in rows.values()), p.stdout


def test_zero_rows_for_dp_and_stages():
    out = bench(2, "zero", "--width", "64", "--depth", "2", "--steps", "2", "--warmup", "1")
    modes = {"dp", "zero1", "zero2", "zero3"}
    rows = {l.split()[0]: l.split() for l in out.splitlines() if l.split()[:1] and l.split()[0] in modes}
    assert set(rows) == modes, out
    held = {k: float(r[1]) for k, r in rows.items()}
    assert held["zero3"] < held["zero2"] < held["zero1"] < held["dp"], out   # 16/N < 4+12/N < 8+8/N < 16
    assert all(abs(float(r[3]) - 1.0) <= 0.1 for r in rows.values()), out   # within 10% of the formula
    assert "synthetic inputs" in out


def test_allreduce_hosts_table_and_a_job_on_emulated_hosts():
    """The launcher of emulated hosts with capped links (root: network namespaces): its table, and
    --job running a training job across them."""
    reason = netns.why_unavailable()
    if reason:
        netns.unavailable(reason, "bench allreduce-hosts")

    def hosts_bench(*argv):
        p = subprocess.run([sys.executable, "-m", "mpipar.bench", "allreduce-hosts", "--timeout", "150", *argv],
                           capture_output=True, text=True, env={**os.environ, **ENV, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
                           timeout=200)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        return p.stdout

    out = hosts_bench("--configs", "2x2", "--sizes", "64K,1M", "--rounds", "1", "--no-gloo")
    rows = [l.split() for l in out.splitlines() if re.match(r"\s+\d+ (KiB|MiB)\s", l)]
    assert [r[0] + r[1] for r in rows] == ["64KiB", "1MiB"], out
    assert all(r[2] == "hier" and all(float(v) > 0 for v in r[3:]) for r in rows), out
    out = hosts_bench("--configs", "2x1", "--job", "-m mpipar.run mlp --epochs 1 --steps 2 --grad-compress bf16")
    assert "2 ranks on 2 host(s)" in out and "summary: mlp on 2 ranks" in out, out
