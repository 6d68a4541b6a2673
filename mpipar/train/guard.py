"""What a step must not do, agreed by every rank at the same step: apply a non-finite loss or
gradient (inf/NaN would be written into the weights and every later checkpoint), or go on after
the job was asked to stop (SIGTERM, or SIGUSR1: SLURM's warning before the time limit).

Each step every rank says what it saw in ONE all-reduce (MIN over three numbers: the lowest rank
whose loss was not finite, whose gradients were not, that was signalled, or the job's size for
none), right before the optimizer step. It is the only job-wide collective of a step: the
gradient all-reduce spans only a stage's replicas and clipping's only the stages, and without dp
or clipping a pipeline has none. It adds a latency, not a synchronisation: a pipeline's flush
already ends every step on every stage. So every rank skips the same step, stops at the same
step, or saves and exits at the same step. The Trainer and mpipar.Checkpoint (a user's loop) both
judge their steps here.
"""
from __future__ import annotations

import math
import signal
import sys
import threading
from dataclasses import dataclass

import torch

from ..comm.mpi import MPI
from ..data_parallel.zero import ShardedOptimizer
from ..errors import ConfigError, MpiparError

PREEMPTED_EXIT = 75   # EX_TEMPFAIL: asked to stop, checkpoint written, run again to resume
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
POLICIES = ("stop", "skip")


class NonFiniteError(MpiparError):
    """A non-finite loss or gradient stopped training (every rank raises it at the same step)."""


class Preempted(SystemExit):
    """Every rank finished its step and the checkpoint is written: the process exits with
    PREEMPTED_EXIT (a SystemExit, so no handler mistakes it for an error)."""

    def __init__(self, message: str):
        super().__init__(PREEMPTED_EXIT)
        self.message = message


def check_policy(on_nonfinite: str, limit: int) -> None:
    if on_nonfinite not in POLICIES:
        raise ConfigError(f"on_nonfinite={on_nonfinite!r}: 'stop' (the first non-finite step stops the job) "
                          f"or 'skip' (skip it; nonfinite_limit in a row stop the job)")
    if not isinstance(limit, int) or limit < 1:
        raise ConfigError(f"nonfinite_limit={limit!r}: must be an integer >= 1")


def all_finite(tensors) -> bool:
    """No inf or NaN in any of `tensors` (None skipped): their sum in float64 is finite (inf and
    NaN carry through a sum, and float32 values cannot overflow a float64 one); one reduction per
    tensor and one sync, several times cheaper on CPU than isfinite per tensor."""
    sums = [t.sum(dtype=torch.float64) for t in tensors if t is not None]
    return bool(torch.stack(sums).sum().isfinite()) if sums else True


def step_gradients(optimizer, params) -> list:
    """The gradients a step would apply: a ZeRO optimizer's (its shard, once reduced), else the
    parameters'."""
    return optimizer.gradients() if isinstance(optimizer, ShardedOptimizer) else [p.grad for p in params]


class Signals:
    """SIGTERM and SIGUSR1 only noted (the step in progress finishes) while training runs; the
    previous handlers come back on close(). Python runs handlers in the main thread only, so
    elsewhere nothing is installed and the signals keep their default action."""

    def __init__(self):
        self.got: int | None = None
        self.old: dict = {}

    def install(self) -> "Signals":
        if threading.current_thread() is threading.main_thread():
            self.old = {s: signal.signal(s, self._note) for s in SIGNALS}
        return self

    def _note(self, signum, frame) -> None:
        self.got = self.got or signum

    def close(self, leaving: bool = False) -> None:
        """`leaving`: the process is on its way out after a preemption. Where the previous
        action was the default (end the process), the signals are ignored instead: the same
        preemption can come twice (SLURM's SIGTERM to every process, and SIGUSR1 through the
        launcher from the supervisor or the batch script), and the second must not kill a rank
        that is exiting PREEMPTED_EXIT."""
        for s, handler in self.old.items():
            handler = signal.SIG_DFL if handler is None else handler
            signal.signal(s, signal.SIG_IGN if leaving and handler == signal.SIG_DFL else handler)
        self.old = {}


@dataclass
class Verdict:
    """What the ranks agreed on for one step: the lowest rank that saw each thing, or None."""
    loss_rank: int | None = None
    grad_rank: int | None = None
    signal_rank: int | None = None
    signum: int = 0

    @property
    def nonfinite(self) -> bool:
        return self.loss_rank is not None or self.grad_rank is not None

    def what(self) -> str:
        return ", ".join(f"non-finite {name} (first on rank {r})" for name, r in
                         (("loss", self.loss_rank), ("gradients", self.grad_rank)) if r is not None)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a signal"


class StepGuard:
    """The per-step agreement on `world` (the whole job: a signal reaches every rank's handler
    at its own time, the verdict is the same everywhere), and the policy for non-finite steps:
    'stop' at the first, or 'skip' them until `limit` in a row. `owner`: the API a user set the
    policy with (e.g. 'mpipar.Checkpoint'), named in a stop's line; None: the command line."""

    def __init__(self, world, on_nonfinite: str = "stop", limit: int = 3, owner: str | None = None):
        check_policy(on_nonfinite, limit)
        self.world, self.policy, self.limit = world, on_nonfinite, limit
        self.owner = owner
        self.signals: Signals | None = None
        self.preempted: Verdict | None = None   # the verdict of the step at which a signal was agreed on
        self.in_a_row = 0        # consecutive non-finite steps (skipped)
        self.skipped = 0         # skipped steps since the owner last reset it

    def listen(self) -> None:
        """Note SIGTERM and SIGUSR1 from now on (until close()); only when `world` is the whole
        job: ranks outside it would not hear of the agreement."""
        job = MPI.COMM_WORLD.Get_size() if MPI.Is_initialized() else 1
        if self.signals is None and self.world.size == job:
            self.signals = Signals().install()

    def close(self) -> None:
        if self.signals is not None:
            self.signals.close(leaving=self.preempted is not None)
            self.signals = None

    def agree(self, loss_ok: bool, grads_ok: bool) -> Verdict:
        """The one collective of a step: every rank calls it once, at the same point."""
        n = self.world.size
        me = self.world.rank
        signum = self.signals.got if self.signals is not None and self.signals.got else 0
        mine = [n if loss_ok else me, n if grads_ok else me, me * 64 + signum if signum else n * 64]
        if n > 1:
            mine = self.world.allreduce_native(torch.tensor(mine, dtype=torch.float64), "min").tolist()
        loss_rank, grad_rank, sig = (int(v) for v in mine)
        v = Verdict(loss_rank if loss_rank < n else None, grad_rank if grad_rank < n else None,
                    sig // 64 if sig < n * 64 else None, sig % 64 if sig < n * 64 else 0)
        self.in_a_row = self.in_a_row + 1 if v.nonfinite else 0
        if v.signal_rank is not None and self.preempted is None:
            self.preempted = v
        return v

    def judge(self, loss_ok: bool, grads_ok: bool, where: str, log=print) -> bool:
        """The ranks' verdict on a step (`where`, e.g. 'step 5 (epoch 1)'), before its update:
        True to apply it, False to skip it (rank 0 logs it), NonFiniteError when the policy
        stops. A signal is kept in `preempted` for the owner to act on after the update."""
        v = self.agree(loss_ok, grads_ok)
        if not v.nonfinite:
            return True
        if self.must_stop():
            raise NonFiniteError(self.describe_stop(v, where))
        self.skipped += 1
        if self.world.rank == 0:
            log(f"{where}: {v.what()}: skipped ({self.in_a_row} in a row; {self.limit} in a row stop the job)")
        return False

    def must_stop(self) -> bool:
        """After a non-finite verdict: does the policy stop the job now (else: skip the step)?"""
        return self.policy == "stop" or self.in_a_row >= self.limit

    def describe_stop(self, v: Verdict, where: str) -> str:
        cli = self.owner is None
        rule = (f"on_nonfinite='stop'{' (--on-nonfinite stop)' if cli else ''}" if self.policy == "stop" else
                f"{self.in_a_row} in a row, nonfinite_limit={self.limit}{' (--nonfinite-limit)' if cli else ''}")
        fix = ("lower the learning rate (--lr), clip gradients (--clip-grad) or skip such steps (--on-nonfinite skip)"
               if cli else f"lower the learning rate, clip gradients or skip such steps ({self.owner}(..., "
               f"on_nonfinite='skip'))")
        return (f"{where}: {v.what()}; {rule}: this step was not applied and nothing non-finite was "
                f"checkpointed; {fix}")

    def stop_preempted(self, after: str, saved: str | None, unsaved: str = "") -> None:
        """Every rank agreed on a signal and what could be saved is: rank 0 says so in one line
        (`after`: the last step applied; `saved`: the checkpoint's folder, or None and why not
        in `unsaved`), and every rank raises Preempted."""
        v = self.preempted
        line = (f"preempted by {v.signal_name} (first on rank {v.signal_rank}) after {after}: "
                + (f"checkpoint {saved} written; the same command resumes from it" if saved else
                   f"no checkpoint written ({unsaved})") + f"; exit {PREEMPTED_EXIT}")
        if self.world.rank == 0:
            sys.stderr.write(f"rank 0 ({self.world.host}): {line}\n")
            sys.stderr.flush()
        raise Preempted(line)


def finite_lr(optimizer) -> None:
    """Refuse a learning rate that is not a finite number >= 0 (torch's SGD takes NaN, Adam inf)."""
    for group in getattr(optimizer, "param_groups", None) or []:
        lr = group.get("lr")
        if isinstance(lr, (int, float)) and not (math.isfinite(lr) and lr >= 0):
            raise ConfigError(f"learning rate {lr!r} (--lr): must be a finite number >= 0")
