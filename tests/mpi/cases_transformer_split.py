"""2 ranks (encoder | decoder): the pipeline loss scaler scales exactly, skips a step on every
stage when any stage sees inf, grows after clean steps, keeps one scale everywhere; the fp16
path runs end to end; greedy decoding agrees on all ranks. Each case builds its own trainers."""
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mpipar.callbacks import AfterBackward
from mpipar.rankmap import Grid, RankMap
from mpipar.app.run import parse
from mpipar.app.session import build_trainer, partition
from mpipar.topology import Topology
from mpipar.train.batches import epoch_batches

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import transformer_split as ts  # noqa: E402

NP = (2,)
TIMEOUT = 240

torch.set_num_threads(1)
SMALL = ["--max-number", "999", "--batch-size", "32", "--d-model", "32", "--ff", "64", "--samples", "-1"]
quiet = lambda *a, **k: None  # noqa: E731


def trainer_for(world, out, *extra):
    """The trainer as session.run_example builds it: rank map, the pipeline, then on_trainer."""
    args, example = parse(["transformer-split", *SMALL, "--out", str(out), *extra])
    grid = Grid.parse(args.grid, world.size)
    specs = example.layers(args)
    train_split, test_split = example.data(args)
    rankmap = RankMap(grid, partition(world, specs, args, grid, train_split)[0])
    trainer = build_trainer(Topology.build(world, grid), rankmap, example, specs, args, quiet)
    scaler = example.on_trainer(trainer, args)
    return SimpleNamespace(train=train_split, test=test_split, trainer=trainer, scaler=scaler, args=args)


def train(run, steps, first=0):
    for idx in epoch_batches(len(run.train.y), 32, 0, 0)[first:first + steps]:
        run.trainer.train_step(run.train.x[idx], run.train.y[idx])


def params(run):
    return {k: v.clone() for k, v in run.trainer.state_dict().items()}


def same_everywhere(world, value: float, what: str):
    got = world.allgather_floats([value])[:, 0]
    assert (got == got[0]).all(), f"{what} differs between ranks: {got.tolist()}"


def scaled_run(world, out, steps=6):
    run = trainer_for(world, out, "--amp", "off")
    scaler = ts.PipelineGradScaler(world, init_scale=2.0**12).attach(run.trainer)
    train(run, steps)
    return run, scaler


def test_a_power_of_two_loss_scale_gives_unscaled_training_exactly(world, mpi_tmp_path):
    plain = trainer_for(world, mpi_tmp_path, "--amp", "off")
    train(plain, 6)
    scaled, scaler = scaled_run(world, mpi_tmp_path)
    for k, v in params(plain).items():
        torch.testing.assert_close(params(scaled)[k], v, rtol=0, atol=0, msg=lambda m: f"{k}: {m}")
    assert scaler.skipped == 0 and scaler.scale == 2.0**12


def test_inf_on_one_stage_skips_the_step_on_every_stage(world, mpi_tmp_path):
    scaled, scaler = scaled_run(world, mpi_tmp_path)

    def poison(trainer):
        if world.rank == 0:
            trainer.params[0].grad[0].fill_(float("inf"))

    poisoner = AfterBackward(poison)
    scaled.trainer.callbacks.insert(0, poisoner)
    before = params(scaled)
    train(scaled, 1, first=6)
    scaled.trainer.callbacks.remove(poisoner)
    for k, v in params(scaled).items():
        assert torch.equal(v, before[k]), f"{k} changed in a skipped step"
    assert scaler.skipped == 1 and scaler.scale == 2.0**11, (scaler.skipped, scaler.scale)
    train(scaled, 2, first=7)
    assert scaler.skipped == 1
    assert any(not torch.equal(v, before[k]) for k, v in params(scaled).items()), "no step after the skip"
    same_everywhere(world, scaler.scale, "loss scale")


def test_the_scale_grows_after_clean_steps_on_every_rank(world, mpi_tmp_path):
    scaled, scaler = scaled_run(world, mpi_tmp_path, steps=1)
    scaler.interval, scaler.clean_steps = 2, 0
    train(scaled, 2, first=1)
    assert scaler.scale == 2.0**13, scaler.scale
    same_everywhere(world, scaler.scale, "loss scale after growth")


def test_the_fp16_path_end_to_end(world, mpi_tmp_path):
    """autocast float16 on CPU + the scaler that on_trainer attaches."""
    fp16 = trainer_for(world, mpi_tmp_path, "--amp", "fp16")
    assert fp16.scaler is not None
    train(fp16, 3)
    same_everywhere(world, fp16.scaler.scale, "fp16 loss scale")
    for p in fp16.trainer.params:
        assert p.dtype == torch.float32 and torch.isfinite(p).all()
    after = ts.after_fit(fp16.trainer, fp16.train, fp16.test, SimpleNamespace(**{**vars(fp16.args), "samples": -1}),
                         quiet)
    assert after.startswith("fp16 loss scale "), after


def test_greedy_decoding_agrees_on_every_rank(world, mpi_tmp_path):
    plain = trainer_for(world, mpi_tmp_path, "--amp", "off")
    train(plain, 6)
    preds = ts.greedy_decode(plain.trainer, plain.test.x[:50], plain.test.meta["src_len"], batch_size=20)
    same_everywhere(world, float((preds * torch.arange(1, preds.numel() + 1).view_as(preds)).sum()),
                    "greedy predictions")


@pytest.mark.parametrize("stage", ["2", "3"])
def test_the_scaler_under_zero_unscales_the_reduced_gradients_and_skips_together(world, mpi_tmp_path, stage):
    """dp=2 with --zero 2|3: the gradients are reduced in backward, so the scaler unscales the
    segment each replica holds (a power-of-two scale: exactly unscaled training) and an inf on
    one replica's segment skips the step on both."""
    zero = ["--grid", "dp=2", "--zero", stage]
    plain = trainer_for(world, mpi_tmp_path, "--amp", "off", *zero)
    train(plain, 4)
    scaled = trainer_for(world, mpi_tmp_path, "--amp", "off", *zero)
    scaler = ts.PipelineGradScaler(world, init_scale=2.0**12).attach(scaled.trainer)
    train(scaled, 4)
    want, got = params(plain), params(scaled)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=lambda m: f"{k}: {m}")

    def poison(trainer):
        if world.rank == 1:
            trainer.optimizer.gradients()[0][0] = float("inf")

    scaled.trainer.callbacks.insert(0, AfterBackward(poison))
    train(scaled, 1, first=4)
    for k, v in params(scaled).items():
        assert torch.equal(v, got[k]), f"{k} changed in a skipped step"
    assert scaler.skipped == 1 and scaler.scale == 2.0**11, (scaler.skipped, scaler.scale)
