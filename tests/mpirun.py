"""Launch multi-rank jobs from pytest: oversubscribed Open MPI, a hard timeout, no hang."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MPI_DIR = Path(__file__).resolve().parent / "mpi"

ENV = {
    "OMPI_MCA_mpi_yield_when_idle": "1",     # without it, oversubscribed ranks spin and starve each other
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
    "OMPI_MCA_hwloc_base_binding_policy": "none",
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "PRTE_MCA_prte_silence_shared_fs": "1",
    "OMP_NUM_THREADS": "1",
    "OMPI_MCA_osc": "^ucx",                   # what mpipar's World sets when it starts MPI itself; under
                                              # `python -m mpi4py` MPI starts first (osc/ucx would complain)
}


def mpirun_exe() -> str:
    exe = shutil.which("mpirun", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    if not exe:
        raise RuntimeError("mpirun not found: pip install -e .[all] (bundled Open MPI) or load your MPI module")
    return exe


def mpirun(np: int, *argv: str, timeout: float = 120, env: dict | None = None,
           cwd: Path | None = None, mpi_args: tuple = ()) -> subprocess.CompletedProcess:
    """Run `python argv...` on np ranks (`mpi_args`: more mpirun options); returns the finished
    process (never hangs past timeout)."""
    cmd = [mpirun_exe(), "-np", str(np), "--oversubscribe", "--bind-to", "none", *mpi_args,
           sys.executable, *argv]
    full_env = {**os.environ, **ENV, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=full_env, cwd=cwd or ROOT, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        raise AssertionError(f"mpirun -np {np} {' '.join(argv)} hung for {timeout} s\n"
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
