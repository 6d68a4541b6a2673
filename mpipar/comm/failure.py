"""Failure discipline: any rank's error ends the whole job at once with one line naming the
rank and the cause; a stall watchdog turns a silent hang into the same kind of report.

Without this, one rank raising while its peers block in a receive hangs the job forever.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import traceback

from .mpi import MPI

from .waits import BOARD

_state = {"host": None, "debug": False}


def one_line(exc: BaseException) -> str:
    msg = " ".join(str(exc).split()) or "(no message)"
    return f"{type(exc).__name__}: {msg}"


def report_and_abort(exc: BaseException, code: int = 1) -> None:
    """Print `rank R (host): Type: message` and abort every rank of the job."""
    rank = MPI.COMM_WORLD.Get_rank() if MPI.Is_initialized() else -1
    host = _state["host"] or os.uname().nodename
    if _state["debug"]:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    sys.stderr.write(f"rank {rank} ({host}): {one_line(exc)}\n")
    sys.stderr.flush()
    sys.stdout.flush()
    MPI.COMM_WORLD.Abort(code)


def install(host: str, debug: bool = False) -> None:
    """Route uncaught exceptions, in any thread, to report_and_abort."""
    _state["host"], _state["debug"] = host, debug
    sys.excepthook = lambda t, e, tb: report_and_abort(e)
    threading.excepthook = lambda a: report_and_abort(a.exc_value)


class Watchdog(threading.Thread):
    """Aborts the job when this rank's current wait lasts longer than `timeout` seconds."""

    def __init__(self, timeout: float, host: str, poll: float = 0.5):
        super().__init__(name="mpipar-watchdog", daemon=True)
        self.timeout, self.host, self.poll = timeout, host, min(poll, max(timeout / 4, 0.05))

    def run(self) -> None:
        rank = MPI.COMM_WORLD.Get_rank()
        while True:
            time.sleep(self.poll)
            w = BOARD.current
            if w is None:
                continue
            waited = time.monotonic() - w.since
            if waited > self.timeout:
                peer = f" rank {w.peer}" if w.peer >= 0 else " the other ranks"
                sys.stderr.write(
                    f"rank {rank} ({self.host}): StallError: waited {waited:.0f} s for {w.describe()}{peer} "
                    f"(--stall-timeout {self.timeout:g}); aborting the job\n")
                sys.stderr.flush()
                MPI.COMM_WORLD.Abort(3)


def start_watchdog(timeout: float, host: str) -> Watchdog | None:
    if not timeout or timeout <= 0:
        return None
    dog = Watchdog(timeout, host)
    dog.start()
    return dog
