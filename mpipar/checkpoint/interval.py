"""When to checkpoint: every N steps (--checkpoint-every N), or by default an interval measured
from the run itself: after each checkpoint, N = (time a save holds training up) / (BUDGET x mean
step time), both averaged over the run so far on the slowest rank, so saving costs about BUDGET
of the training time whatever the model and the disk."""
from __future__ import annotations

import math

BUDGET = 0.02     # share of the step time that checkpointing may take (auto)
FIRST = 20        # auto: steps before the first checkpoint (then measured)
MOST = 2000       # auto: never more steps than this between checkpoints


class Interval:
    def __init__(self, every: int | None):
        self.auto = not every
        self.every = FIRST if self.auto else int(every)
        self.last = 0   # step of the last checkpoint (auto counts from it)

    def due(self, step: int) -> bool:
        return step - self.last >= self.every if self.auto else step % self.every == 0

    def saved(self, step: int) -> None:
        self.last = step

    def adapt(self, save_seconds: float, step_seconds: float) -> bool:
        """Auto: the next interval from the measured costs (the same numbers on every rank, as
        they come from one allgather). True when it changed."""
        if not self.auto or step_seconds <= 0:
            return False
        new = min(MOST, max(FIRST, math.ceil(save_seconds / (BUDGET * step_seconds))))
        changed, self.every = new != self.every, new
        return changed

    def describe(self) -> str:
        return f"every {self.every} steps" + (f" (auto: ~{BUDGET:.0%} of step time)" if self.auto else "")
