"""The one waiting path: every wait on a message goes through here, so we know who waits
for what from whom, for how long (for the stall watchdog and for communication-time metrics)."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass
class Waiting:
    what: str       # e.g. "RECV ACT mb=7"
    peer: int       # world rank we wait on (-1: collective)
    since: float    # time.monotonic() when the wait began


@dataclass
class WaitBoard:
    """Current wait (read by the watchdog thread) and totals (read by metrics)."""
    current: Waiting | None = None
    seconds: float = 0.0
    count: int = 0
    longest: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def wait(self, request, what: str, peer: int):
        """Block on an mpi4py request; returns its result (mpi4py releases the GIL meanwhile)."""
        start = time.monotonic()
        self.current = Waiting(what, peer, start)
        try:
            return request.Wait()
        finally:
            dt = time.monotonic() - start
            self.current = None
            with self.lock:
                self.seconds += dt
                self.count += 1
                self.longest = max(self.longest, dt)

    def waitall(self, requests, what: str, peer: int = -1):
        for r in requests:
            self.wait(r, what, peer)

    def reset(self) -> None:
        with self.lock:
            self.seconds, self.count, self.longest = 0.0, 0, 0.0


BOARD = WaitBoard()  # one per process: there is one main thread doing communication
