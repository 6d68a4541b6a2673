"""What a training step must not do, in one process (the Trainer on one rank, the whole engine):
apply a non-finite loss or gradient (stopped, or skipped as single-process training that skips
it would), checkpoint non-finite state, ignore SIGTERM/SIGUSR1 (the step finishes, a checkpoint
is written, the process exits PREEMPTED_EXIT and the resume is bit-equal to an uninterrupted
run), or take a flag value that would break silently. Several ranks agreeing on the same step:
tests/mpi/cases_checkpoint.py; a real job's exit code and line: tests/test_run.py."""
import math
import os
import signal

import pytest
import torch

from mpipar.app.run import parse
from mpipar.app.session import build_trainer, run_facts
from mpipar.callbacks import Callback
from mpipar.checkpoint import store
from mpipar.checkpoint.restart import newest_full_state
from mpipar.comm import World
from mpipar.errors import ConfigError
from mpipar.model import build_full
from mpipar.rankmap import Grid, RankMap
from mpipar.topology import Topology
from mpipar.train.batches import epoch_batches
from mpipar.train.checkpointing import CheckpointConfig, attach_checkpoint
from mpipar.train.guard import PREEMPTED_EXIT, NonFiniteError
from mpipar.train.metrics import Tally
from mpipar.train.trainer import TrainConfig, Trainer

torch.set_num_threads(1)
quiet = lambda *a, **k: None  # noqa: E731
BAD_STEP = 2    # 0-based: the third batch of the first epoch holds a NaN input


def mlp(tmp_path, *flags, ckpt=None, every=1, poison=None):
    """The mlp example on one rank, 2 epochs x 6 steps, its training inputs optionally
    poisoned (`poison`: sample indices whose first feature becomes NaN); a checkpointer when
    `ckpt` is given. Returns (trainer, train, test, args, example)."""
    args, ex = parse(["mlp", "--epochs", "2", "--steps", "6", "--log-level", "quiet",
                      "--out", str(tmp_path / "out"), *flags])
    specs = ex.layers(args)
    rankmap = RankMap(Grid(1), [[s.name for s in specs]])
    trainer = build_trainer(Topology.build(World(), Grid(1)), rankmap, ex, specs, args, quiet)
    train, test = ex.data(args)
    if poison is not None:
        train.x = train.x.clone()
        train.x[poison, 0] = float("nan")
    if ckpt is not None:
        attach_checkpoint(trainer, rankmap, len(train), CheckpointConfig(str(ckpt), every), run_facts(ex, args), quiet)
    return trainer, train, test, args, ex


def bad_batch(args, epoch=0, index=BAD_STEP):
    return epoch_batches(2048, args.batch_size, args.seed, epoch)[index]


def skipping_reference(ex, args, train):
    """Single-process training that skips every batch whose loss is not finite: (parameters, per
    epoch (mean training loss over the batches it applied, batches skipped))."""
    model = build_full(ex.layers(args), args.seed)
    opt, loss_fn = ex.optimizer(model.parameters(), args), ex.loss()
    epochs = []
    for epoch in range(args.epochs):
        tally, skipped = Tally(loss_fn, "regression"), 0
        for idx in epoch_batches(len(train.y), args.batch_size, args.seed, epoch)[:args.steps]:
            opt.zero_grad()
            out = model(train.x[idx])
            loss = loss_fn(out, train.y[idx])
            if not math.isfinite(loss.item()):
                skipped += 1
                continue
            loss.backward()
            opt.step()
            tally.add(out, train.y[idx])
        epochs.append((tally.loss / tally.weight, skipped))
    return model.state_dict(), epochs


def close(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=lambda m: f"{k}: {m}")


# -- non-finite steps ------------------------------------------------------------------------------

def test_a_nan_loss_stops_before_its_update_and_is_never_checkpointed(tmp_path):
    """--on-nonfinite stop (the default): the step with the NaN is not applied, the job stops
    there with one line, and the checkpoints hold only the steps before it, all finite."""
    args = parse(["mlp"])[0]
    trainer, train, test, args, ex = mlp(tmp_path, ckpt=tmp_path / "ck", poison=bad_batch(args)[:1])
    with pytest.raises(NonFiniteError) as e:
        trainer.fit(train, test)
    line = str(e.value)
    assert f"step {BAD_STEP + 1} (epoch 1): non-finite loss (first on rank 0)" in line and "\n" not in line, line
    assert "--on-nonfinite skip" in line and "--lr" in line
    assert [s for s, _ in store.step_dirs(tmp_path / "ck")] == list(range(BAD_STEP, 0, -1))
    man, state = newest_full_state(tmp_path / "ck")
    assert man.step == BAD_STEP and all(bool(v.isfinite().all()) for v in state.values())
    steps_before = parse(["mlp", "--epochs", "1", "--steps", str(BAD_STEP)])[0]   # the parameters as they were
    want, _ = skipping_reference(ex, steps_before, train)
    close(trainer.state_dict(), want)


def test_skipped_steps_equal_single_process_training_that_skips_them(tmp_path):
    args = parse(["mlp"])[0]
    poison = bad_batch(args)[:1]
    trainer, train, test, args, ex = mlp(tmp_path, "--on-nonfinite", "skip", poison=poison)
    rows = trainer.fit(train, test)
    want, epochs = skipping_reference(ex, args, train)
    close(trainer.state_dict(), want)
    assert epochs[0][1] == 1
    for row, (loss, skipped) in zip(rows, epochs):
        assert row.get("skipped_steps", 0) == skipped
        torch.testing.assert_close(row["train_loss"], loss)   # a skipped batch's loss is not tallied


def test_nonfinite_limit_steps_in_a_row_stop_a_skipping_run(tmp_path):
    trainer, train, test, args, ex = mlp(tmp_path, "--on-nonfinite", "skip", "--nonfinite-limit", "2",
                                         poison=slice(None))
    before = {k: v.clone() for k, v in trainer.state_dict().items()}
    with pytest.raises(NonFiniteError, match=r"step 2 \(epoch 1\): .*2 in a row, nonfinite_limit=2"):
        trainer.fit(train, test)
    for k, v in trainer.state_dict().items():   # neither step was applied
        assert torch.equal(v, before[k]), k


def test_pipedream_stops_at_a_nan_and_cannot_skip_it(tmp_path):
    """Its updates run inside the step's lists, before the step's verdict: 'stop' only."""
    args = parse(["mlp"])[0]
    trainer, train, test, args, ex = mlp(tmp_path, "--schedule", "pipedream", "--microbatches", "2",
                                         poison=bad_batch(args)[:1])
    with pytest.raises(NonFiniteError, match=rf"step {BAD_STEP + 1} \(epoch 1\): non-finite loss"):
        trainer.fit(train, test)
    assert all(bool(p.isfinite().all()) for p in trainer.params)   # the NaN update was kept out
    with pytest.raises(ConfigError, match="on_nonfinite='skip'.*schedule pipedream"):
        mlp(tmp_path, "--schedule", "pipedream", "--microbatches", "2", "--on-nonfinite", "skip")


# -- preemption ------------------------------------------------------------------------------------

class SignalAt(Callback):
    """Sends this process `signum` after optimizer step `step` (as SLURM or a user would, at any
    moment: the handler only notes it)."""

    def __init__(self, step, signum):
        self.step, self.signum = step, signum

    def after_step(self, trainer, *a):
        if trainer.step_count == self.step:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_finishes_the_step_checkpoints_exits_75_and_resumes_bit_equal(tmp_path, signum, capfd):
    noted = []
    previous = signal.signal(signum, lambda s, f: noted.append(s))   # what runs if the Trainer installs nothing
    try:
        whole, train, test, _, _ = mlp(tmp_path / "whole")
        whole.fit(train, test)
        trainer, train, test, _, _ = mlp(tmp_path, ckpt=tmp_path / "ck", every=100)
        trainer.callbacks.append(SignalAt(8, signum))
        with pytest.raises(SystemExit) as e:
            trainer.fit(train, test)
        assert e.value.code == PREEMPTED_EXIT and not noted
        line = capfd.readouterr().err.strip().splitlines()[-1]
        assert f"preempted by {signal.Signals(signum).name} (first on rank 0) after step 9 (epoch 2, batch 3 of 6): " \
               f"checkpoint {store.step_dir(tmp_path / 'ck', 9)} written" in line, line
        assert signal.getsignal(signum) is not previous and signal.getsignal(signum).__name__ == "<lambda>"
        resumed, train, test, _, _ = mlp(tmp_path, ckpt=tmp_path / "ck", every=100)
        assert resumed.step_count == 9
        resumed.fit(train, test)
        for k, v in resumed.state_dict().items():
            assert torch.equal(v, whole.state_dict()[k]), k
    finally:
        signal.signal(signum, previous)


# -- values refused at the edge, naming the flag -----------------------------------------------------

@pytest.mark.parametrize("flags, said", [
    (["--lr", "nan"], "--lr nan: must be a finite number >= 0"),
    (["--lr", "inf"], "--lr inf: must be a finite number >= 0"),
    (["--checkpoint-every", "-5"], "--checkpoint-every -5: must be an integer >= 1"),
    (["--keep", "0"], "--keep 0: must be an integer >= 1"),
    (["--stall-timeout", "-1"], "--stall-timeout -1.0: must be a finite number >= 0 (0: no watchdog)"),
    (["--clip-grad", "nan"], "--clip-grad nan: must be a finite number >= 0"),
    (["--nonfinite-limit", "0"], "--nonfinite-limit 0: must be an integer >= 1"),
])
def test_a_flag_value_that_would_break_silently_is_refused_naming_the_flag(flags, said):
    with pytest.raises(ConfigError) as e:
        parse(["mlp", *flags])
    assert str(e.value).startswith(said), str(e.value)


def test_the_engine_refuses_non_finite_settings_too(tmp_path):
    with pytest.raises(ConfigError, match="clip_grad=nan"):
        TrainConfig(clip_grad=float("nan"))
    with pytest.raises(ConfigError, match="on_nonfinite='maybe'"):
        TrainConfig(on_nonfinite="maybe")
    trainer, *_ = mlp(tmp_path)
    sgd = torch.optim.SGD(trainer.params, lr=float("nan"))     # torch's SGD takes it
    with pytest.raises(ConfigError, match=r"learning rate nan \(--lr\)"):
        Trainer(trainer.pipe, sgd, TrainConfig())
