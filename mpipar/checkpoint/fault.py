"""Fault injection for tests and demos: `--inject-fault rank=R,step=S[,phase=write]` or
`--inject-fault random=SEED[,count=K][,phase=write]`. The chosen rank dies by SIGKILL to itself,
as a real crash looks: no exception, no MPI_Abort, no flushed buffers.

phase=step  (default): the rank dies after it has done S optimizer steps, before that step's
            checkpoint is written.
phase=write: the rank dies half-way through writing its shard of the first checkpoint at or
            after step S (the test that a torn write never becomes "latest").

Faults fire once each, in order: before dying, the rank drops a marker file FAULTS_DIR/fault-I,
so the relaunched job (which replays steps after its last checkpoint) does not die again there.
"""
from __future__ import annotations

import os
import random
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .store import atomic_write_text

PHASES = ("step", "write")


@dataclass(frozen=True)
class Fault:
    rank: int
    step: int
    phase: str = "step"


def parse(text: str | None) -> dict | None:
    """The flag's key=value pairs, checked (resolution needs the world size and step count)."""
    if not text:
        return None
    try:
        kv = dict(part.split("=", 1) for part in text.split(","))
        spec = {k.strip(): v.strip() for k, v in kv.items()}
        ok = (set(spec) <= {"rank", "step", "phase", "random", "count"} and spec.get("phase", "step") in PHASES
              and (("rank" in spec and "step" in spec) != ("random" in spec)))
        for k in ("rank", "step", "random", "count"):
            if k in spec:
                spec[k] = int(spec[k])
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(f"--inject-fault {text!r}: write rank=R,step=S or random=SEED[,count=K] "
                          f"(optionally ,phase=write)")
    return spec


def resolve(spec: dict | None, world_size: int, total_steps: int, distinct: bool = False) -> list[Fault]:
    """Concrete faults, in firing order (same on every rank: a pure function of the flag).
    `distinct`: each fault on another rank, never all of them (ranks that stay dead: ULFM)."""
    if not spec:
        return []
    phase = spec.get("phase", "step")
    if "rank" in spec:
        if not 0 <= spec["rank"] < world_size or spec["step"] < 1:
            raise ConfigError(f"--inject-fault: rank must be in 0..{world_size - 1} and step >= 1, "
                              f"got rank={spec['rank']} step={spec['step']}")
        return [Fault(spec["rank"], spec["step"], phase)]
    rng = random.Random(spec["random"])
    count = spec.get("count", 1)
    if total_steps < count + 1:
        raise ConfigError(f"--inject-fault random: {count} fault(s) need more than {total_steps} steps")
    steps = sorted(rng.sample(range(1, total_steps), count))
    if distinct:
        if count >= world_size:
            raise ConfigError(f"--inject-fault random: {count} fault(s) would kill all {world_size} ranks")
        return [Fault(r, s, phase) for r, s in zip(rng.sample(range(world_size), count), steps)]
    return [Fault(rng.randrange(world_size), s, phase) for s in steps]


class FaultPlan:
    def __init__(self, faults: list[Fault], marker_dir: Path, rank: int):
        self.faults, self.dir, self.rank = faults, Path(marker_dir), rank
        self._next = self._first_unfired()   # markers only appear when a process dies: read once

    def marker(self, i: int) -> Path:
        return self.dir / f"fault-{i}"

    def _first_unfired(self) -> tuple[int, Fault] | None:
        for i, f in enumerate(self.faults):
            if not self.marker(i).exists():
                return i, f
        return None

    def pending(self) -> tuple[int, Fault] | None:
        return self._next

    def fired(self) -> int:
        return sum(self.marker(i).exists() for i in range(len(self.faults)))

    def due(self, step: int, phase: str) -> tuple[int, Fault] | None:
        p = self.pending()
        if p and p[1].rank == self.rank and p[1].phase == phase and step >= p[1].step:
            return p
        return None

    def check(self, step: int) -> None:
        """Die now if this rank's step fault is due."""
        p = self.due(step, "step")
        if p and step == p[1].step:
            self.die(*p, step)

    def die(self, i: int, fault: Fault, step: int) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.marker(i), f"rank={fault.rank} step={step} phase={fault.phase} "
                                          f"launch={os.environ.get('MPIPAR_ATTEMPT', '0')}\n")
        sys.stdout.flush()
        sys.stderr.write(f"rank {self.rank}: injected fault {i}: SIGKILL at step {step} "
                         f"(phase {fault.phase}, --inject-fault)\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def fired_launches(faults_dir) -> list[int]:
    """For each fault that fired (a marker in `faults_dir`), the launch it ended (0 = first)."""
    out = []
    for marker in sorted(Path(faults_dir).glob("fault-*")):
        fields = dict(kv.split("=", 1) for kv in marker.read_text().split() if "=" in kv)
        out.append(int(fields.get("launch", 0)))
    return out
