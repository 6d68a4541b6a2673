"""The one import of mpi4py's MPI module. MPI starts when the first World is made, not when
mpipar is imported, so settings that MPI reads once at start-up are chosen at that moment.

If the program imported mpi4py.MPI first (or runs under `python -m mpi4py`), MPI is already
running and is used as it is."""
from __future__ import annotations

import atexit
import os
import sys

import mpi4py

if "mpi4py.MPI" not in sys.modules:   # ours to start: not at import, in start()
    mpi4py.rc.initialize = False
    mpi4py.rc.finalize = False

from mpi4py import MPI  # noqa: E402

# Shared-memory windows (the one-host all-reduce) are osc/sm's job; Open MPI's osc/ucx, tried
# first by the PyPI wheel, prints an error on hosts without UCX devices before falling back.
START_ENV = {"OMPI_MCA_osc": "^ucx"}


def start() -> None:
    """Initialise MPI (thread level MULTIPLE: buckets reduce from a background thread) unless
    it is running; finalised at exit. Variables already set in the environment win."""
    if MPI.Is_initialized():
        return
    for k, v in START_ENV.items():
        os.environ.setdefault(k, v)
    MPI.Init_thread(MPI.THREAD_MULTIPLE)
    atexit.register(finalize)


_finalize_at_exit = True
_before_finalize: list = []


def at_finalize(fn) -> None:
    """Run `fn()` (collective over every rank, all ranks in the same order) just before MPI_Finalize."""
    _before_finalize.append(fn)


def skip_finalize() -> None:
    """Leave MPI unfinalised at exit. For a job that has lost a process (ULFM): Open MPI's
    MPI_Finalize fences every process the job started, the dead one included, and under load
    that fence was seen to wait forever after all the work was done. mpirun started with
    --with-ft ulfm accepts a survivor that exits without it."""
    global _finalize_at_exit
    _finalize_at_exit = False


def finalize() -> None:
    if not MPI.Is_initialized() or MPI.Is_finalized():
        return
    rank = MPI.COMM_WORLD.Get_rank()
    if _finalize_at_exit:
        for fn in _before_finalize:
            fn()
        MPI.Finalize()
    mark_done(rank)


def mark_done(rank: int) -> None:
    """Under the supervisor ($MPIPAR_DONE_DIR): this rank ended cleanly. A launcher that lost a
    host can still exit 0; a rank missing here tells the supervisor (mpipar/app/supervise.py)."""
    folder = os.environ.get("MPIPAR_DONE_DIR")
    if folder:
        try:
            with open(os.path.join(folder, f"rank-{rank}"), "w") as f:
                f.write("done\n" if _finalize_at_exit else "survived\n")   # survived: ULFM, a peer lost
        except OSError:
            pass
