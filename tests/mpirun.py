"""Launch multi-rank jobs from pytest: oversubscribed ranks under the MPI this Python uses (Open MPI,
MPICH or Intel MPI, through mpipar.launcher), a hard timeout, no hang."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MPI_DIR = Path(__file__).resolve().parent / "mpi"

from mpipar import launcher  # noqa: E402

MPIEXEC = launcher.find()   # the MPI this Python's mpi4py uses: Open MPI, MPICH or Intel MPI
KIND = MPIEXEC.kind
ENV = {**MPIEXEC.environment(oversubscribed=True), "OMP_NUM_THREADS": "1"}
if KIND == "openmpi":   # what mpipar's World sets when it starts MPI itself; under `python -m
    ENV["OMPI_MCA_osc"] = "^ucx"   # mpi4py` MPI starts first (osc/ucx would complain)


def mpirun(np: int, *argv: str, timeout: float = 120, env: dict | None = None,
           cwd: Path | None = None, mpi_args: tuple = (), hostfile: Path | None = None) -> subprocess.CompletedProcess:
    """Run `python argv...` on np ranks (`mpi_args`: more launcher options; `hostfile` in this
    MPI's format); returns the finished process (never hangs past timeout)."""
    cmd = MPIEXEC.command(np, list(argv), extra=mpi_args, hostfile=hostfile)
    return run_command(cmd, {**os.environ, **ENV, "PYTHONPATH": str(ROOT), **(env or {})}, timeout, cwd)


def run_command(cmd: list[str], env: dict, timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """A launcher command line in its own session, killed with every rank it started if it runs
    past `timeout` (an AssertionError with its output) or if the test is interrupted."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=cwd or ROOT, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        if os.environ.get("MPIPAR_LAUNCH_LOG"):   # one line per launch: which test, how long (suite costs)
            with open(os.environ["MPIPAR_LAUNCH_LOG"], "a") as f:
                f.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '?').split(' ')[0]}\t{time.monotonic() - t0:.1f}\t"
                        f"{' '.join(cmd[1:4])}\n")
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(cmd)} hung for {timeout} s\n"
                             f"stdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}") from None
    except BaseException:   # Ctrl-C, pytest-timeout: the ranks are in their own session, end them too
        kill_group(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def kill_group(proc: subprocess.Popen) -> None:
    """mpirun and every rank it started (they share its session)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def run_script(np: int, script: str, *args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """Run tests/mpi/<script> on np ranks and require success."""
    p = mpirun(np, str(MPI_DIR / script), *args, timeout=timeout, **kw)
    assert p.returncode == 0, f"{script} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p
