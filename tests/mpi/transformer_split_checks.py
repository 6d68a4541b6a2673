"""2 ranks (encoder | decoder): the pipeline loss scaler scales exactly, skips a step on every
stage when any stage sees inf, keeps one scale everywhere; greedy decoding agrees on all ranks."""
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

import torch  # noqa: E402

from mpipar.comm import World, failure  # noqa: E402

world = World()
failure.install(world.host)
torch.set_num_threads(1)

import transformer_split as ts  # noqa: E402
from mpipar.rankmap import Grid, RankMap  # noqa: E402
from mpipar.run import parse  # noqa: E402
from mpipar.session import build_trainer, partition  # noqa: E402
from mpipar.topology import Topology  # noqa: E402
from mpipar.callbacks import AfterBackward  # noqa: E402
from mpipar.train.batches import epoch_batches  # noqa: E402

SMALL = ["--max-number", "999", "--batch-size", "32", "--d-model", "32", "--ff", "64", "--samples", "-1",
         "--out", tempfile.mkdtemp()]
quiet = lambda *a, **k: None  # noqa: E731


def trainer_for(*extra):
    """The trainer as session.run_example builds it: rank map, data-parallel attach, then on_trainer."""
    args, example = parse(["transformer-split", *SMALL, *extra])
    grid = Grid.parse(args.grid, world.size)
    specs = example.layers(args)
    train_split, test_split = example.data(args)
    rankmap = RankMap(grid, partition(world, specs, args, grid, train_split))
    topo = Topology.build(world, grid)
    trainer = build_trainer(topo, rankmap, example, specs, args, quiet)
    scaler = example.on_trainer(trainer, args)
    return SimpleNamespace(train=train_split, test=test_split, trainer=trainer, scaler=scaler, args=args)


def train(run, steps, first=0):
    batches = epoch_batches(len(run.train.y), 32, 0, 0)
    for idx in batches[first:first + steps]:
        run.trainer.train_step(run.train.x[idx], run.train.y[idx])


def params(run):
    return {k: v.clone() for k, v in run.trainer.state_dict().items()}


def same_everywhere(value: float, what: str):
    got = world.allgather_floats([value])[:, 0]
    assert (got == got[0]).all(), f"{what} differs between ranks: {got.tolist()}"


# 1. fp32 with a power-of-two loss scale gives the unscaled training exactly
plain, scaled = trainer_for("--amp", "off"), trainer_for("--amp", "off")
scaler = ts.PipelineGradScaler(world, init_scale=2.0**12).attach(scaled.trainer)
train(plain, 6)
train(scaled, 6)
for k, v in params(plain).items():
    torch.testing.assert_close(params(scaled)[k], v, rtol=0, atol=0, msg=lambda m: f"{k}: {m}")
assert scaler.skipped == 0 and scaler.scale == 2.0**12

# 2. inf on one stage only: every stage skips the step and halves the scale
def poison(trainer):
    if world.rank == 0:
        trainer.params[0].grad[0].fill_(float("inf"))

poisoner = AfterBackward(poison)
scaled.trainer.callbacks.insert(0, poisoner)
before = params(scaled)
train(scaled, 1, first=6)
scaled.trainer.callbacks.remove(poisoner)
for k, v in params(scaled).items():
    assert torch.equal(v, before[k]), f"rank {world.rank}: {k} changed in a skipped step"
assert scaler.skipped == 1 and scaler.scale == 2.0**11, (scaler.skipped, scaler.scale)
train(scaled, 2, first=7)
assert scaler.skipped == 1
assert any(not torch.equal(v, before[k]) for k, v in params(scaled).items()), "no step after the skip"
same_everywhere(scaler.scale, "loss scale")

# 3. growth after `interval` clean steps, on every rank alike
scaler.interval, scaler.clean_steps = 2, 0
train(scaled, 2, first=9)
assert scaler.scale == 2.0**12, scaler.scale
same_everywhere(scaler.scale, "loss scale after growth")

# 4. the fp16 path end to end (autocast float16 on CPU + the scaler on_trainer attaches)
fp16 = trainer_for("--amp", "fp16")
assert fp16.scaler is not None
train(fp16, 3)
same_everywhere(fp16.scaler.scale, "fp16 loss scale")
for p in fp16.trainer.params:
    assert p.dtype == torch.float32 and torch.isfinite(p).all()

after = ts.after_fit(fp16.trainer, fp16.train, fp16.test, SimpleNamespace(**{**vars(fp16.args), "samples": -1}),
                     quiet)
assert after.startswith("fp16 loss scale "), after

# 5. greedy decoding: every rank ends with the same predictions
preds = ts.greedy_decode(plain.trainer, plain.test.x[:50], plain.test.meta["src_len"], batch_size=20)
same_everywhere(float((preds * torch.arange(1, preds.numel() + 1).view_as(preds)).sum()), "greedy predictions")

world.barrier()
if world.rank == 0:
    print("transformer_split_checks: all passed")
