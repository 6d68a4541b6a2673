"""Oversubscribed ranks, with and without the MPI's yield-when-idle settings (mpipar.launcher's
OVERSUBSCRIBED_ENV: Open MPI's mpi_yield_when_idle, MPICH's polls-before-yield, Intel MPI's
wait mode), measured side by side in one run.

Not run under mpirun: it is the launcher. Each row is one job of the mlp example on --np ranks
(more ranks than cores), samples/s from its metrics. `--wait spin` keeps each rank inside
MPI_Wait, so the MPI's own busy-polling decides how fast the rank it waits for can run; `--wait
poll` is mpipar's default on an oversubscribed host (test, then sleep: the core is free anyway).

    python -m mpipar.bench oversubscribed [--np 4] [--steps 40] [--repeats 2] [--waits spin,poll]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ..launcher import OVERSUBSCRIBED_ENV, find

ROOT = Path(__file__).resolve().parents[2]
# The same settings turned off: ranks waiting in MPI never give their core away.
NO_YIELD = {"openmpi": {"OMPI_MCA_mpi_yield_when_idle": "0"},
            "mpich": {"MPIR_CVAR_POLLS_BEFORE_YIELD": "0"},
            "impi": {"I_MPI_WAIT_MODE": "0"}}


def job(mpi, np_: int, steps: int, wait: str, yield_: bool, out: Path, timeout: float) -> float:
    """samples/s of one run (the best epoch's), or NaN when it did not finish within timeout."""
    env = {**os.environ, **mpi.environment(oversubscribed=True), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    if not yield_:
        env.update(NO_YIELD[mpi.kind])
    argv = ["-m", "mpipar.run", "mlp", "--epochs", "2", "--steps", str(steps), "--wait", wait,
            "--log-level", "quiet", "--out", str(out)]
    try:
        p = subprocess.run(mpi.command(np_, argv), env=env, capture_output=True, text=True, timeout=timeout,
                           start_new_session=True)
    except subprocess.TimeoutExpired:
        return float("nan")
    if p.returncode:
        raise RuntimeError(f"mlp --wait {wait} failed ({p.returncode}): {p.stderr[-1500:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return max(r["samples_per_s"] for r in rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mpipar.bench oversubscribed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--np", type=int, default=4)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=2, help="runs per cell; the best is kept")
    p.add_argument("--timeout", type=float, default=300, help="a run slower than this counts as NaN")
    p.add_argument("--waits", default="spin,poll", help="the rows: how ranks wait (comma-separated: spin, poll)")
    a = p.parse_args(argv)
    if any(k in os.environ for k in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK")):
        print("bench oversubscribed is the launcher: run it without mpirun", file=sys.stderr)
        return 2
    if not set(a.waits.split(",")) <= {"spin", "poll"}:
        p.error(f"--waits {a.waits}: expected spin, poll or spin,poll")
    mpi = find()
    cores = os.cpu_count() or 1
    print(f"{mpi.name}: mlp (pp={a.np}) on {a.np} ranks, {cores} cores, {a.steps} steps x 2 epochs; "
          f"samples/s, best of {a.repeats}; yield settings: "
          + " ".join(f"{k}={v}" for k, v in OVERSUBSCRIBED_ENV[mpi.kind].items()), flush=True)
    print(f"{'wait':<6} {'no-yield':>10} {'yield':>10} {'yield/no-yield':>15}")
    with tempfile.TemporaryDirectory(prefix="mpipar-oversub-") as tmp:
        for wait in a.waits.split(","):
            cells = {}
            for yield_ in (False, True):
                runs = [job(mpi, a.np, a.steps, wait, yield_, Path(tmp) / f"{wait}{yield_}{i}", a.timeout)
                        for i in range(a.repeats)]
                cells[yield_] = max(runs)
            ratio = cells[True] / cells[False] if cells[False] > 0 else float("nan")   # NaN > 0 is False
            print(f"{wait:<6} {cells[False]:>10.0f} {cells[True]:>10.0f} {ratio:>15.2f}", flush=True)
    return 0
