"""The one waiting path: every wait on a message goes through here, so we know who waits
for what from whom, for how long (for the stall watchdog and for communication-time metrics),
plus the bytes this process sent (for per-rank traffic metrics)."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from . import staging
from .mpi import MPI
from .tags import label


_Request = MPI.Request


@dataclass
class Waiting:
    what: str       # e.g. "RECV {tag} from": "{tag}" is filled in only when someone reads it
    peer: int       # world rank we wait on (-1: collective)
    since: float    # time.monotonic() when the wait began
    tag: int | None = None
    within: str | None = None   # the collective a user called that this wait is part of

    def describe(self) -> str:
        """The wait as a stall report shows it, e.g. "RECV ACT mb=7 from" (formatted lazily:
        the hot path only stores the tag)."""
        what = self.what if self.tag is None else self.what.replace("{tag}", label(self.tag))
        return f"{what} [in {self.within}]" if self.within else what


@dataclass
class WaitBoard:
    """Current wait (read by the watchdog thread) and totals (read by metrics)."""
    current: Waiting | None = None
    bytes_sent: int = 0      # payload and header bytes handed to MPI by this process
    messages_sent: int = 0
    bytes_shared: int = 0    # bytes this process wrote into host-shared windows for its host's
                             # other ranks to read (the shared-memory all-reduce moves no messages)
    seconds: float = 0.0
    count: int = 0
    longest: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    poll: float | None = None   # seconds: test and sleep instead of spinning in MPI (opt-in, for
                                # hosts with more ranks than cores); None: MPI_Wait
    poll_cap: float = 0.0       # a wait's sleeps double from `poll` up to this (use_polling)
    within: str | None = None   # set by `inside`

    @contextmanager
    def inside(self, collective: str):
        """Stall reports of the waits in this block name `collective` too (the call the user made,
        e.g. "ShardedOptimizer.gathered(), which every rank of dp must call")."""
        before, self.within = self.within, collective
        try:
            yield
        finally:
            self.within = before

    def use_polling(self, seconds: float | None, cap: float | None = None) -> None:
        """Wait by test + sleep instead of spinning in MPI (None: spin again): first sleeps of
        `seconds`, doubling within one wait up to `cap` (default: `seconds`, no backoff). Every
        wake-up of a waiting rank takes the core from a rank that computes, so a long wait backs
        off, while a short one still ends within `seconds` of its message. Linux rounds a sleep up
        by the thread's timer slack (50 us by default), which would dominate a short poll, so
        polling also asks for a 1 us slack."""
        self.poll = seconds
        if seconds is not None:
            self.poll_cap = max(seconds, cap or 0.0)
            _tight_timer_slack()

    def _sleeps(self):
        """The sleeps of one polling wait: poll, 2 poll, 4 poll, ... up to poll_cap."""
        pause = self.poll
        while True:
            yield pause
            pause = min(2 * pause, self.poll_cap)

    def _begin(self, what: str, peer: int, tag: int | None) -> float:
        if staging._PENDING:   # staged device sends reach MPI before this process blocks on anything
            staging.flush()
        start = time.monotonic()
        self.current = Waiting(what, peer, start, tag, self.within)
        return start

    def _end(self, start: float) -> None:
        dt = time.monotonic() - start
        self.current = None
        with self.lock:
            self.seconds += dt
            self.count += 1
            if dt > self.longest:
                self.longest = dt

    @contextmanager
    def waiting(self, what: str, peer: int, tag: int | None = None):
        """Marks this process as waiting (for the watchdog) and adds the time to the totals."""
        start = self._begin(what, peer, tag)
        try:
            yield
        finally:
            self._end(start)

    # wait and waitall are on every message's path, so they inline what `waiting` does
    # (a generator context costs microseconds, which small messages notice).
    def wait(self, request, what: str, peer: int, tag: int | None = None):
        """Block on an mpi4py request; returns its result (mpi4py releases the GIL meanwhile)."""
        start = self._begin(what, peer, tag)
        try:
            if self.poll is not None:
                sleeps = self._sleeps()
                while not request.Test():
                    time.sleep(next(sleeps))
                return True
            return request.Wait()
        finally:
            self._end(start)

    def waitall(self, requests, what: str, peer: int = -1, tag: int | None = None):
        """All of `requests` in one MPI call (one wait, not one per request: on an
        oversubscribed host every separate wait may cost a context switch)."""
        start = self._begin(what, peer, tag)
        try:
            if self.poll is not None:
                sleeps = self._sleeps()
                while not _Request.Testall(requests):
                    time.sleep(next(sleeps))
            else:
                _Request.Waitall(requests)
        finally:
            self._end(start)

    def wait_any(self, requests, what: str, poll: float | None = None, peer: int = -1) -> int:
        """Block until one of `requests` completes (MPI_Waitany); returns its index, or -1 when
        none is active. The completed request becomes MPI.REQUEST_NULL in the list.
        poll=seconds: test and sleep instead of spinning in MPI, for a rank that is mostly idle
        on a host with more ranks than cores (a parameter server), at up to `poll` extra latency;
        None: the board's own `poll` setting."""
        from .mpi import MPI
        poll = self.poll if poll is None else poll
        with self.waiting(what, peer):
            if poll is None:
                index = MPI.Request.Waitany(requests)
            else:
                index, done = MPI.Request.Testany(requests)
                while not done:
                    time.sleep(poll)
                    index, done = MPI.Request.Testany(requests)
        return -1 if index == MPI.UNDEFINED else index

    def sent(self, nbytes: int) -> None:
        self.bytes_sent += nbytes
        self.messages_sent += 1

    def shared(self, nbytes: int) -> None:
        self.bytes_shared += nbytes

    def reset(self) -> None:
        with self.lock:
            self.seconds, self.count, self.longest = 0.0, 0, 0.0
            self.bytes_sent, self.messages_sent, self.bytes_shared = 0, 0, 0


def _tight_timer_slack() -> None:
    try:
        import ctypes
        ctypes.CDLL(None).prctl(29, 1000, 0, 0, 0)   # PR_SET_TIMERSLACK, 1000 ns
    except (OSError, AttributeError):                # not Linux: sleeps stay as they are
        pass


BOARD = WaitBoard()  # one per process: there is one main thread doing communication


# -------------------------------------------------------------------------------------------------
# Non-blocking completion checks, so an all-reduce started during backward can move on between
# autograd hooks without ever blocking (blocking waits still go through BOARD).
# -------------------------------------------------------------------------------------------------
def all_done(requests) -> bool:
    """True when every request has completed (completed requests are released); never blocks."""
    return bool(MPI.Request.Testall(requests)) if requests else True
