"""The one way to plug into the Trainer: a Callback in `trainer.callbacks`. Checkpointing,
the data-parallel gradient sync and loss scaling are callbacks, so the loop itself stays plain.

Every method is a no-op here: a callback overrides only what it needs. They run in list order
(attach order), which matters for after_backward: the data-parallel sync is attached first, so
loss unscaling and gradient edits see reduced gradients; clipping and the optimizer come after
all of them.
"""
from __future__ import annotations


class Callback:
    def on_fit_start(self, trainer, metrics) -> list[dict]:
        """Before the first epoch; returns metrics rows of epochs an earlier run already trained
        (a resumed checkpoint), which rank 0's `metrics` file gets again."""
        return []

    def first_epoch(self, trainer) -> int:
        """The epoch training starts from (a resumed run skips finished ones); fit takes the largest."""
        return 0

    def on_epoch_start(self, trainer, epoch: int, tally) -> None:
        """The epoch's tally is fresh; a resumed epoch refills it with the sums before the restart."""

    def skip_batch(self, trainer, epoch: int, index: int) -> bool:
        """True: batch `index` of `epoch` was already trained (before the checkpoint resumed from)."""
        return False

    def before_step(self, trainer, passes: int) -> None:
        """Right before the backward passes of one update run (`passes` = micro-batches);
        a streaming schedule calls it mid-batch, just before each update."""

    def after_backward(self, trainer) -> None:
        """Gradients are complete on this rank; clipping and the optimizer step follow."""

    def after_step(self, trainer, epoch: int, step_in_epoch: int, n_batches: int, tally, rows) -> None:
        """After a batch (`step_in_epoch` of `n_batches` done); `rows` = finished epochs' metrics."""

    def after_epoch(self, trainer, epoch: int, rows) -> None:
        """After the epoch's metrics row (the last of `rows`) is written."""

    def on_preempt(self, trainer, epoch: int, step_in_epoch: int, n_batches: int, tally, rows) -> str | None:
        """The job was signalled (SIGTERM, SIGUSR1) and training stops after this step, on every
        rank alike: save what must survive (collective); returns where it went, or None."""
        return None

    def on_fit_end(self, trainer) -> None:
        """Training is over (collective: every rank calls it)."""


class AfterBackward(Callback):
    """A plain function(trainer) as an after_backward callback, for one-off gradient edits."""

    def __init__(self, fn):
        self.fn = fn

    def after_backward(self, trainer) -> None:
        self.fn(trainer)
