"""The benchmarks that launch jobs themselves still run and print their side-by-side tables (tiny
sizes: these tests check that the code works, never how fast; speed is read from full runs, see
README's Benchmarks). The benchmarks run under mpirun: tests/mpi/cases_bench.py, in the shared
jobs of tests/test_mpi_cases.py."""
import os
import re
import subprocess
import sys

from cluster import netns
from mpirun import ENV, ROOT


def test_oversubscribed_rows_with_and_without_yield():
    p = subprocess.run([sys.executable, "-m", "mpipar.bench", "oversubscribed", "--np", "3", "--steps", "3",
                        "--repeats", "1", "--waits", "poll"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    rows = {l.split()[0]: l.split()[1:] for l in p.stdout.splitlines() if l.split()[:1] in (["spin"], ["poll"])}
    assert set(rows) == {"poll"} and all(float(v[0]) > 0 and float(v[1]) > 0 for v in rows.values()), p.stdout


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
