"""Background progress for bucket all-reduces started during backward.

Between autograd hooks nothing in the main thread touches MPI, so a ring started for the last
layers' bucket would otherwise sit still while the earlier layers' backward runs (MPI moves a
large message only while a process is inside an MPI call). This thread keeps polling the
in-flight handles: it only tests (never blocks, so BOARD's one waiting path stays the main
thread's), and numpy adds and MPI calls release the GIL, so it runs beside the backward kernels.
Needs MPI_THREAD_MULTIPLE (what mpi4py asks for); the main thread takes the handles back
(`drain`) before waiting on them.
"""
from __future__ import annotations

import threading
import time


class ProgressThread(threading.Thread):
    def __init__(self, poll_seconds: float = 50e-6):
        super().__init__(name="mpipar-dp-progress", daemon=True)
        self.poll = poll_seconds
        self.lock = threading.Lock()          # held while a handle's generator runs
        self.wake = threading.Condition(self.lock)
        self.handles: list = []
        self.stopping = False

    def add(self, handle) -> None:
        with self.wake:
            self.handles.append(handle)
            self.wake.notify()

    def drain(self) -> None:
        """Stop touching the handles (the caller waits on them now)."""
        with self.lock:
            self.handles = []

    def stop(self) -> None:
        with self.wake:
            self.stopping, self.handles = True, []
            self.wake.notify()

    def run(self) -> None:
        while True:
            with self.wake:
                while not self.handles and not self.stopping:
                    self.wake.wait()
                if self.stopping:
                    return
                moved = False
                for h in self.handles:
                    before = h.pending
                    h.progress()
                    moved |= h.pending is not before
                self.handles = [h for h in self.handles if not h.done]
            if not moved:
                time.sleep(self.poll)
