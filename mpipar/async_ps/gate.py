"""Bounded staleness as a pure state machine (no MPI): which pushed gradients the servers may
apply now, which must wait, and the record of every update's staleness.

Symbols: k = max staleness, V = server version (updates applied so far), b = a worker's base
(the version its gradient was computed on). A gradient applied at version V has staleness V - b.

Rule (stale-synchronous, per push):
  - a push is applied on its own when, after V+1, every OTHER worker that is still computing
    or has a push waiting keeps V+1 - b' <= k (so nobody can ever exceed k);
  - otherwise it waits (buffered; one per worker, whose next pull is not answered meanwhile);
  - when nothing can be applied on its own and no worker is still computing, every buffered
    push is averaged into ONE update (staleness of each: V - b <= k, by the invariant).
Invariant: V - b <= k for every computing or buffered worker, at all times.

k = 0 therefore averages the gradients of all active workers of a round into one update:
synchronous data parallelism. A worker that leaves (DONE / PUSH_DONE) stops constraining others.
All workers start computing on base 0 (they pull version 0 before anything can be applied).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass


class ProtocolError(RuntimeError):
    """A worker broke the protocol (pushed twice without an answer, pushed after leaving...)."""


@dataclass(frozen=True)
class Update:
    version: int                 # V before the update: the update produces version + 1
    workers: tuple[int, ...]     # whose gradients are averaged (ascending)
    staleness: tuple[int, ...]   # version - base, per worker
    reply: tuple[int, ...]       # workers waiting for the new parameters (PUSH, not PUSH_DONE)
    applied: int                 # gradients applied in total once this update is in


class StalenessGate:
    def __init__(self, workers: int, max_staleness: int):
        if max_staleness < 0:
            raise ValueError(f"max staleness must be >= 0, got {max_staleness}")
        self.k = max_staleness
        self.version = 0
        self.computing: dict[int, int] = {w: 0 for w in range(workers)}   # worker -> base
        self.buffered: dict[int, tuple[int, bool]] = {}                  # worker -> (base, final)
        self.done: set[int] = set()
        self.updates: list[Update] = []
        self.applied = 0          # gradients applied (a merged update counts each of its gradients)

    # -- events -----------------------------------------------------------------------------
    def pull(self, w: int) -> int:
        """Worker w asks for the current parameters: answered at once; its base is now V."""
        self._expect_computing(w, "PULL")
        self.computing[w] = self.version
        return self.version

    def push(self, w: int, base: int, final: bool = False) -> list[Update]:
        """Worker w pushed a gradient computed on `base`; returns the updates now applicable."""
        self._expect_computing(w, "PUSH")
        if base != self.computing[w]:
            raise ProtocolError(f"worker {w} pushed on base {base}, but was answered version {self.computing[w]}")
        del self.computing[w]
        self.buffered[w] = (base, final)
        return self._drain()

    def leave(self, w: int) -> list[Update]:
        """Worker w stops without a gradient (DONE)."""
        self._expect_computing(w, "DONE")
        del self.computing[w]
        self.done.add(w)
        return self._drain()

    @property
    def finished(self) -> bool:
        return not self.computing and not self.buffered

    def histogram(self) -> Counter:
        """staleness -> number of gradients applied with it."""
        return Counter(s for u in self.updates for s in u.staleness)

    # -- the rule ---------------------------------------------------------------------------
    def _fits_after_next(self, w: int) -> bool:
        """Would every other active worker stay within k after one more update?"""
        nxt = self.version + 1
        others = [b for q, b in self.computing.items()] + [b for q, (b, _) in self.buffered.items() if q != w]
        return all(nxt - b <= self.k for b in others)

    def _drain(self) -> list[Update]:
        out = []
        while self.buffered:
            ready = [w for w in sorted(self.buffered, key=lambda q: (self.buffered[q][0], q))
                     if self._fits_after_next(w)]
            if ready:
                out.append(self._apply([ready[0]]))
            elif not self.computing:
                out.append(self._apply(sorted(self.buffered)))
            else:
                break
        return out

    def _apply(self, workers: list[int]) -> Update:
        stale, reply = [], []
        for w in workers:
            base, final = self.buffered.pop(w)
            stale.append(self.version - base)
            if final:
                self.done.add(w)
            else:
                reply.append(w)
        if max(stale) > self.k:   # cannot happen while the invariant holds; a loud guard
            raise AssertionError(f"staleness {max(stale)} > k={self.k} at version {self.version}")
        self.applied += len(workers)
        u = Update(self.version, tuple(workers), tuple(stale), tuple(reply), self.applied)
        self.version += 1
        for w in reply:
            self.computing[w] = self.version
        self.updates.append(u)
        return u

    def _expect_computing(self, w: int, what: str) -> None:
        if w in self.computing:
            return
        state = "has left" if w in self.done else ("has a push waiting" if w in self.buffered else "is unknown")
        raise ProtocolError(f"worker {w} sent {what} but {state}")
