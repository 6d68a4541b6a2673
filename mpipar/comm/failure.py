"""Failure discipline: any rank's error ends the whole job at once with one line naming the
rank, the user's file and line where the error started, and the cause, printed once however many
ranks fail alike; a stall watchdog turns a silent hang into the same kind of report.

Without this, one rank raising while its peers block in a receive hangs the job forever.
"""
from __future__ import annotations

import os
import re
import site
import sys
import sysconfig
import threading
import time
import traceback
import zlib

import numpy as np

from ..errors import ConfigError, MpiparError
from .mpi import MPI

from .waits import BOARD

_state = {"host": None, "debug": False, "notes": None}

HOLD_SECONDS = 0.3    # how long a failing rank listens for ranks failing alike before it prints
QUIET_SECONDS = 2.0   # how long it waits for a lower rank that failed alike to print (a ConfigError,
# usually every rank's, waits this long on ranks > 0 in any case: rank 0 prints it)
# MPI_Abort goes through the launcher, which may itself be cut off from this host (MPICH's hydra
# proxy, its link to mpiexec cut, never returns). After this long the rank ends itself: its
# launcher daemon then sees it gone, and its peers are ended by their own aborts.
ABORT_GRACE = 15.0
# The launcher forwards a rank's stderr asynchronously; MPICH's hydra tears its proxies down on
# MPI_Abort and could drop the line just written (seen: a job ending with empty stderr).
FORWARD_SECONDS = 0.5
TRACEBACK_HINT = "traceback: mpipar.init(debug=True) or --log-level debug"


def one_line(exc: BaseException) -> str:
    msg = " ".join(str(exc).split()) or "(no message)"
    return f"{type(exc).__name__}: {msg}"


# -- where the user's code started an error ------------------------------------------------------

def _library_roots() -> tuple[str, ...]:
    """Folders whose files are not the user's: mpipar, the standard library, installed packages."""
    paths = {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    paths.update(v for k, v in sysconfig.get_paths().items() if k in ("stdlib", "platstdlib", "purelib", "platlib"))
    paths.update(getattr(site, "getsitepackages", list)())
    paths.add(site.getusersitepackages())
    return tuple(os.path.join(os.path.realpath(p), "") for p in paths if p)


_LIBRARIES = _library_roots()


def _users(filename: str) -> bool:
    if filename.startswith("<"):      # <string>, <stdin>: the user's; <frozen ...>: Python's
        return not filename.startswith("<frozen")
    return not os.path.realpath(filename).startswith(_LIBRARIES)


def user_frame(exc: BaseException) -> traceback.FrameSummary | None:
    """Where the user's code started `exc`: of its chain (causes, contexts), the innermost
    exception that passed through the user's files, and there the last frame in them."""
    chain = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    for e in reversed(chain):
        frames = [f for f in traceback.extract_tb(e.__traceback__) if _users(f.filename)]
        if frames:
            return frames[-1]
    return None


def place(exc: BaseException) -> str:
    """`train.py:23` (relative to the working directory when inside it), or "" if none."""
    f = user_frame(exc)
    if f is None:
        return ""
    path = f.filename
    if not path.startswith("<"):
        rel = os.path.relpath(path)
        path = path if rel.startswith(os.pardir) else rel
    return f"{path}:{f.lineno}"


def _spans(ranks: list[int]) -> str:
    """[1, 2, 3, 5] -> '1-3, 5'."""
    out = []
    for r in ranks:
        if out and r == out[-1][1] + 1:
            out[-1][1] = r
        else:
            out.append([r, r])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in out)


def line(exc: BaseException, rank: int, host: str, also=()) -> str:
    """`rank R (host[; also ranks ...]): file.py:LINE: Type: message` (+ how to get the
    traceback, for errors that are not mpipar's own, whose messages say what to change)."""
    who = f"rank {rank} ({host}" + (f"; also rank{'s' * (len(also) > 1)} {_spans(also)}" if also else "") + ")"
    where = place(exc)
    hint = "" if isinstance(exc, MpiparError) or _state["debug"] else f" ({TRACEBACK_HINT})"
    return f"{who}: {where + ': ' if where else ''}{one_line(exc)}{hint}"


def key(exc: BaseException) -> int:
    """Errors alike on different ranks share a key: the same type, place and message, numbers aside
    (replicas of uneven shards fail on different sizes)."""
    return zlib.crc32(f"{type(exc).__name__}|{place(exc)}|{re.sub(r'[0-9]+', '#', str(exc))}".encode())


# -- one line per job --------------------------------------------------------------------------

class Notes:
    """What failing ranks tell each other, so that an error several ranks hit alike is printed
    once, by the lowest of them, naming the others. A note is (FAILED or REPORTED, the error's
    key), two int64s sent to every rank on a communicator of its own; a failing rank listens
    `hold` seconds and stays quiet if a rank reported the same error (the job is ending with it)
    or a lower rank failed alike (it reports; unless it has not within `patience` more seconds:
    it may be stuck). Different errors are each printed."""
    FAILED, REPORTED = 1, 2

    def __init__(self, rank: int, comm=None):
        self.rank, self.comm = rank, comm
        self.heard: dict[int, tuple[int, int]] = {}   # rank -> its latest (kind, key)
        self.sent: list = []                           # (buffer, request): alive until the abort

    def tell(self, kind: int, key: int) -> None:
        buf = np.array([kind, key], dtype=np.int64)
        self.sent += [(buf, self.comm.Isend(buf, dest=r, tag=0))
                      for r in range(self.comm.Get_size()) if r != self.rank]

    def listen(self) -> None:
        status = MPI.Status()
        while self.comm.Iprobe(MPI.ANY_SOURCE, 0, status):
            buf = np.empty(2, dtype=np.int64)
            self.comm.Recv(buf, status.Get_source(), 0)
            self.heard[status.Get_source()] = (int(buf[0]), int(buf[1]))

    def decide(self, key: int, hold: float, patience: float = QUIET_SECONDS) -> tuple[bool, list[int]]:
        """(whether this rank prints its error, the other ranks that failed alike)."""
        self.tell(self.FAILED, key)
        start = time.monotonic()
        while True:
            self.listen()
            alike = sorted(r for r, (_, k) in self.heard.items() if k == key)
            if any(self.heard[r][0] == self.REPORTED for r in alike):
                return False, []
            waited = time.monotonic() - start
            if waited >= hold and (not alike or alike[0] > self.rank or waited >= hold + patience):
                return True, alike
            time.sleep(0.01)


_reporting = threading.Lock()


def report_and_abort(exc: BaseException, code: int = 1) -> None:
    """Print the one line (Notes: once per job for an error ranks hit alike; debug: the traceback
    before it) and end the job: a job of one rank (plain `python`) just exits, with nothing after
    the line; otherwise MPI_Abort ends every rank (the MPI's own report follows the line)."""
    if not _reporting.acquire(blocking=False):   # another thread of this rank is ending the job
        threading.Event().wait()
    running = MPI.Is_initialized() and not MPI.Is_finalized()
    rank, size = (MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()) if running else (-1, 1)
    host = _state["host"] or os.uname().nodename
    notes, speak, also = _state["notes"] if size > 1 else None, True, []
    if notes is not None:
        try:
            hold = QUIET_SECONDS if rank > 0 and isinstance(exc, ConfigError) else HOLD_SECONDS
            speak, also = notes.decide(key(exc), hold)
        except Exception:   # MPI itself broken (a dead peer): say it anyway
            speak, also = True, []
    if speak:
        if _state["debug"]:
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        sys.stderr.write(line(exc, rank, host, also) + "\n")
        if notes is not None:
            try:
                notes.tell(Notes.REPORTED, key(exc))
            except Exception:
                pass
    sys.stderr.flush()
    sys.stdout.flush()
    if size == 1:
        os._exit(code)
    threading.Thread(target=_exit_after, args=(ABORT_GRACE, code), name="mpipar-abort-grace", daemon=True).start()
    time.sleep(FORWARD_SECONDS if speak else 2 * FORWARD_SECONDS)   # quiet: after the reporter's abort
    MPI.COMM_WORLD.Abort(code)


def _exit_after(seconds: float, code: int) -> None:
    time.sleep(seconds)
    os._exit(code)


def install(host: str, debug: bool = False) -> None:
    """Route uncaught exceptions, in any thread, to report_and_abort. The first call is collective:
    it makes the communicator that failing ranks tell each other on (Notes)."""
    _state["host"], _state["debug"] = host, debug
    if _state["notes"] is None and MPI.Is_initialized():
        comm = MPI.COMM_WORLD.Dup()
        _state["notes"] = Notes(comm.Get_rank(), comm)
    sys.excepthook = lambda t, e, tb: report_and_abort(e)
    threading.excepthook = lambda a: report_and_abort(a.exc_value)


class Watchdog(threading.Thread):
    """Aborts the job when this rank's current wait lasts longer than `timeout` seconds while
    this process runs. A process that was itself stopped (SIGSTOP, a debugger) finds, once
    continued, every wait long overdue: its peers' silence meanwhile is its own doing, so a gap
    between two of the watchdog's ticks restarts the wait's clock instead of blaming the peer
    (the peers, which did wait on it, name it)."""

    def __init__(self, timeout: float, host: str, poll: float = 0.5):
        super().__init__(name="mpipar-watchdog", daemon=True)
        self.timeout, self.host, self.poll = timeout, host, min(poll, max(timeout / 4, 0.05))
        self.last = time.monotonic()
        self.resumed: tuple[object, float] = (None, 0.0)   # (the wait, when this process came back in it)

    def overdue(self, now: float):
        """(the current wait, how long it has lasted while this process ran); (None, 0.0): none."""
        gap, self.last = now - self.last, now
        w = BOARD.current
        if w is None:
            return None, 0.0
        if gap > 2 * self.poll + 1.0:          # the process was not running between two ticks
            self.resumed = (w, now)
        return w, now - (self.resumed[1] if self.resumed[0] is w else w.since)

    def run(self) -> None:
        rank = MPI.COMM_WORLD.Get_rank()
        while True:
            time.sleep(self.poll)
            w, waited = self.overdue(time.monotonic())
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
