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

from ..errors import ConfigError
from .mpi import MPI

from .waits import BOARD

_state = {"host": None, "debug": False}


def one_line(exc: BaseException) -> str:
    msg = " ".join(str(exc).split()) or "(no message)"
    return f"{type(exc).__name__}: {msg}"


QUIET_SECONDS = 2.0   # how long ranks > 0 hold back a ConfigError's line for rank 0's
# MPI_Abort goes through the launcher, which may itself be cut off from this host (MPICH's hydra
# proxy, its link to mpiexec cut, never returns). After this long the rank ends itself: its
# launcher daemon then sees it gone, and its peers are ended by their own aborts.
ABORT_GRACE = 15.0
# The launcher forwards a rank's stderr asynchronously; MPICH's hydra tears its proxies down on
# MPI_Abort and could drop the line just written (seen: a job ending with empty stderr).
FORWARD_SECONDS = 0.5


def report_and_abort(exc: BaseException, code: int = 1) -> None:
    """Print `rank R (host): Type: message` and abort every rank of the job.
    A ConfigError (bad flags, a rank map that cannot hold) is usually raised by every rank
    alike; ranks other than 0 wait QUIET_SECONDS first, so rank 0's abort ends them before they
    print the same line again (16 ranks: one line, not 16). One whose error is its own still
    prints it, a little later."""
    rank = MPI.COMM_WORLD.Get_rank() if MPI.Is_initialized() else -1
    if rank > 0 and isinstance(exc, ConfigError):
        time.sleep(QUIET_SECONDS)
    host = _state["host"] or os.uname().nodename
    if _state["debug"]:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    sys.stderr.write(f"rank {rank} ({host}): {one_line(exc)}\n")
    sys.stderr.flush()
    sys.stdout.flush()
    threading.Thread(target=_exit_after, args=(ABORT_GRACE, code), name="mpipar-abort-grace", daemon=True).start()
    time.sleep(FORWARD_SECONDS)
    MPI.COMM_WORLD.Abort(code)


def _exit_after(seconds: float, code: int) -> None:
    time.sleep(seconds)
    os._exit(code)


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
                peer = f" rank {w.peer}" if w.peer >= 0 else " from the other ranks"
                sys.stderr.write(
                    f"rank {rank} ({self.host}): StallError: waited {waited:.0f} s for {w.describe()}{peer} "
                    f"(--stall-timeout {self.timeout:g}); aborting the job\n")
                sys.stderr.flush()
                time.sleep(FORWARD_SECONDS)      # as report_and_abort: let the launcher forward it
                MPI.COMM_WORLD.Abort(3)


def start_watchdog(timeout: float, host: str) -> Watchdog | None:
    if not timeout or timeout <= 0:
        return None
    dog = Watchdog(timeout, host)
    dog.start()
    return dog
