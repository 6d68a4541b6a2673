"""What a training step must not do, in one process (the Trainer on one rank, the whole engine):
apply a non-finite loss or gradient (stopped, or skipped as single-process training that skips
it would), checkpoint non-finite state, ignore SIGTERM/SIGUSR1 (the step finishes, a checkpoint
is written, the process exits PREEMPTED_EXIT and the resume is bit-equal to an uninterrupted
run), or take a flag value that would break silently. In a user's own loop: a loss function averaging
over ignored targets only (Pipeline weighs by samples), the loss checks under fp16's loss scaler,
and torch's clip (or a lost backward pass) under ZeRO 2 and 3 are refused at the user's line.
Several ranks agreeing on the same step: tests/mpi/cases_checkpoint.py; a real job's exit code and
line: tests/test_run.py; ZeRO's gradient accumulation over replicas: tests/mpi/cases_zero.py."""
import functools
import math
import os
import signal

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mpipar import Pipeline
from mpipar.app.run import parse
from mpipar.app.session import build_trainer, run_facts
from mpipar.callbacks import Callback
from mpipar.checkpoint import store
from mpipar.checkpoint.restart import newest_full_state
from mpipar.comm import World
from mpipar.comm.failure import place
from mpipar.data_parallel.zero import ShardedOptimizer
from mpipar.errors import ConfigError, ShapeError
from mpipar.model import build_full
from mpipar.rankmap import Grid, RankMap
from mpipar.topology import Topology
from mpipar.train.batches import epoch_batches
from mpipar.train.checkpointing import CheckpointConfig, attach_checkpoint
from mpipar.train.guard import PREEMPTED_EXIT, NonFiniteError
from mpipar.train.metrics import Tally
from mpipar.train.amp import PipelineGradScaler
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


# -- your own loop: what would silently differ from one process is refused, naming your line ---------

def one_rank() -> Topology:
    return Topology.build(World(), Grid(1))


def tiny(width: int = 2):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, width))


def with_ignored():
    """16 class indices in 0..1, three of them torch's ignore_index (-100), unevenly over the
    4 micro-batches of 4 (none, one, none, two): a mean over the counted targets weighs them unlike
    a mean over samples."""
    y = torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(1))
    y[[5, 13, 14]] = -100
    return y


def sequences(alike: bool):
    """16 samples of 3 class indices each, the first ignored in every sample (and, unless `alike`,
    the second too in one sample)."""
    y = torch.randint(0, 2, (16, 3), generator=torch.Generator().manual_seed(1))
    y[:, 0] = -100
    if not alike:
        y[13, 1] = -100
    return y


def token_mean(out, y):
    return F.cross_entropy(out.reshape(-1, 2), y.reshape(-1))        # a mean over the counted targets only


def mean_over_all(out, y):
    return F.cross_entropy(out, y, reduction="sum") / y.numel()     # the refusal's fix: ignored count as zero


def signs(out, y):
    return F.soft_margin_loss(out[:, 0], y.to(out.dtype))            # labels -1/+1: a plain mean over samples


FIX = r".*is no plain mean over samples.*return one, e\.g\. F\.cross_entropy\(out, y, reduction='sum'\) / y\.numel\(\)"
LOSS_CASES = {   # loss, targets, micro-batches, what the refusal says (None: trains as one process)
    "token-mean": (lambda out, y: F.cross_entropy(out, y), with_ignored, 4,
                   r"loss function <lambda> gets integer targets below 0 \(-100: " + FIX),
    "cross_entropy": (F.cross_entropy, with_ignored, 4,
                      r"loss function cross_entropy gets integer targets below 0" + FIX),
    "partial-ignore_index": (functools.partial(F.cross_entropy, ignore_index=2), lambda: with_ignored() % 3, 4,
                             r"CrossEntropyLoss with targets equal to ignore_index=2"),    # -100 % 3: class 2
    "sequences-unlike": (token_mean, lambda: sequences(alike=False), 4, r"loss function token_mean" + FIX),
    "padding-zero": (lambda out, y: F.cross_entropy(out, y, ignore_index=0), lambda: with_ignored() % 3, 4,
                     r"loss function <lambda> takes a mean cross entropy / NLL with ignore_index=0"),  # hidden in the function
    "class-weights": (lambda out, y: F.cross_entropy(out, y, weight=torch.tensor([1.0, 2.0, 3.0])),
                      lambda: with_ignored() % 3, 4, r"loss function <lambda> takes a mean cross entropy / NLL with class weights"),
    "padding-zero-one-micro-batch": (lambda out, y: F.cross_entropy(out, y, ignore_index=0), lambda: with_ignored() % 3, 1,
                                     None),
    "mean-over-all": (mean_over_all, with_ignored, 4, None),
    "labels-minus-one": (signs, lambda: torch.where(with_ignored() == 1, 1, -1), 4, None),
    "one-micro-batch": (lambda out, y: F.cross_entropy(out, y), with_ignored, 1, None),
    "sequences-alike": (token_mean, lambda: sequences(alike=True), 4, None)}


@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_a_loss_function_on_ignored_targets_is_exact_or_refused(case):
    """A plain function given class indices of torch's ignore_index (-100) that averages over the
    counted targets only cannot be weighed by samples as Pipeline weighs micro-batches: refused at
    the user's line, with the fix. The fix itself, -1/+1 labels (pipeline/stage.py check_mean_loss
    shows such a function to be a mean over samples), a batch not split, and samples that each hold
    as many counted targets train as one process does."""
    loss_fn, y, microbatches, refused = LOSS_CASES[case]
    x, y = torch.randn(16, 3, generator=torch.Generator().manual_seed(2)), y()
    width = 2 * y.shape[1] if y.dim() == 2 else int(y.max()) + 1
    pipe = Pipeline(tiny(width), one_rank(), loss_fn=loss_fn, microbatches=microbatches)
    if refused:
        with pytest.raises(ConfigError, match=refused) as e:
            pipe.step(x, y)
        assert "test_guards.py:" in place(e.value), place(e.value)
        return
    pipe.step(x, y)
    ref = tiny(width)
    loss_fn(ref(x), y).backward()
    for got, want in zip(pipe.parameters(), ref.parameters()):
        torch.testing.assert_close(got.grad, want.grad)


@pytest.mark.parametrize("loss_fn, out_width, refused", [
    (nn.CrossEntropyLoss(reduction="sum"), 2, (ConfigError, r"CrossEntropyLoss with reduction='sum'")),
    (nn.MSELoss(), 1, (ShapeError, r"MSELoss gets an output of shape \(4, 1\) and targets of shape \(4, 3\)"))],
    ids=["sum", "broadcast"])
def test_amp_loss_scaling_keeps_the_pipelines_loss_checks(loss_fn, out_width, refused):
    """fp16's loss scaler wraps the last stage's loss (amp.ScaledLoss): the checks still judge the
    loss inside, a sum over samples and an output the loss would broadcast ((4, 1) against
    (4, 3): the numbers of elements differ) as without it."""
    torch.manual_seed(0)
    pipe = Pipeline(nn.Sequential(nn.Linear(3, out_width)), one_rank(), loss_fn=loss_fn, microbatches=4)
    trainer = Trainer(pipe, torch.optim.SGD(pipe.parameters(), lr=0.1), TrainConfig())
    PipelineGradScaler(pipe.topo.world).attach(trainer)
    y = torch.randint(0, 2, (16,)) if out_width == 2 else torch.randn(16, 3)
    with pytest.raises(refused[0], match=refused[1]) as e:
        pipe.step(torch.randn(16, 3), y)
    assert "test_guards.py:" in place(e.value), place(e.value)


class WithUnused(nn.Module):
    """A layer backward never reaches, registered last: ZeRO 2's first bucket (and 3's first unit
    in its reduce order) never completes in backward, so every gradient is still whole at the step."""

    def __init__(self):
        super().__init__()
        self.body, self.unused = tiny(), nn.Linear(2, 2)

    def forward(self, x):
        return self.body(x)


def clip_norm(params):
    torch.nn.utils.clip_grad_norm_(params, 1e-3)


def clip_value(params):
    torch.nn.utils.clip_grad_value_(params, 1e-3)


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("misuse", ["clip-norm", "clip-value", "clip-unreduced", "no-zero-grad", "extra-pass"])
def test_zero_2_and_3_refuse_what_would_silently_drop_a_gradient_change(stage, misuse):
    """ZeRO stages 2 and 3 keep no whole gradient after backward: torch's clip_grad_norm_ or
    clip_grad_value_ there would clip nothing (.grad used to be None), is refused at the clip; on
    gradients still whole (a layer backward never reaches holds their reduction back) it is
    refused at the step; so are a backward without opt.zero_grad() since the last step (its
    gradients used to be dropped) and a backward pass more than begin_step said (used to be lost)."""
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    model = WithUnused() if misuse == "clip-unreduced" else tiny()
    opt = ShardedOptimizer(model, one_rank(), torch.optim.SGD, stage=stage, lr=0.1)
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    if misuse == "no-zero-grad":
        opt.step()
        F.mse_loss(model(x), y).backward()
        with pytest.raises(ConfigError, match=r"has a gradient that no reduction took.*call opt\.zero_grad\(\) before "
                                              r"each step's backward") as e:
            opt.step()
    elif misuse == "extra-pass":
        with pytest.raises(ConfigError, match=r"add_ on a \.grad that ZeRO stage 2 or 3 already reduced.*"
                                              r"call opt\.begin_step\(passes\) before the first") as e:
            F.mse_loss(model(x), y).backward()
    elif misuse == "clip-unreduced":
        clip_norm(model.parameters())
        with pytest.raises(ConfigError, match=r"changed in place after backward.*clip with opt\.step\(clip=\.\.\.\) "
                                              r"instead") as e:
            opt.step()
    else:
        with pytest.raises(ConfigError, match=r"on a \.grad that ZeRO stage 2 or 3 already reduced .*torch's "
                                              r"clip_grad_norm_ or clip_grad_value_ would clip nothing\): clip with "
                                              r"opt\.step\(clip=\.\.\.\)") as e:
            (clip_norm if misuse == "clip-norm" else clip_value)(model.parameters())
    assert "test_guards.py:" in place(e.value), place(e.value)


def test_checkpoint_refuses_the_whole_module_under_pipeline_parallelism(tmp_path):
    """mpipar.Checkpoint given the nn.Module instead of the Pipeline while the grid has pp > 1 would
    save every stage's stale copy of the other stages' layers and resume from one of them: refused
    with one line naming the fix (pp = 1, one rank, is fine)."""
    from types import SimpleNamespace
    import mpipar
    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    topo = one_rank()
    fake = SimpleNamespace(grid=SimpleNamespace(pp=2), world=topo.world)
    with pytest.raises(ConfigError, match=r"give Checkpoint the Pipeline: mpipar\.Checkpoint\(dir, pipe, opt\)") as e:
        mpipar.Checkpoint(tmp_path / "ck", model, opt, topo=fake)
    assert "\n" not in str(e.value)
    mpipar.Checkpoint(tmp_path / "ck1", model, opt, topo=topo)      # pp = 1: the module is the whole model


def test_zero_3_refuses_a_state_dict_outside_gathered():
    """Under ZeRO stage 3 a model.state_dict() outside `with opt.gathered():` used to hold zeros
    (each unit keeps only this replica's segment): refused with one line naming the fix; inside
    gathered() it is the model's, and stays valid after the block."""
    model = tiny()
    want = {k: v.clone() for k, v in model.state_dict().items()}
    opt = ShardedOptimizer(model, one_rank(), torch.optim.SGD, stage=3, lr=0.1)
    for take in (model.state_dict, model[0].state_dict):
        with pytest.raises(ConfigError, match=r"take the state dict inside `with opt\.gathered\(\):`") as e:
            take()
        assert "\n" not in str(e.value)
    with opt.gathered():
        got = model.state_dict()
    close(got, want)
