"""One 4-rank launch for the pipeline: every schedule's parameters after 20 steps (two epochs)
equal single-process training (PipeDream-2BW: its own one-step-delayed reference), recompute
changes nothing, the timeline is written, and bad configurations fail clearly without a hang.

Each rank trains the single-process reference itself and compares its own layers with it."""
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from mpipar.comm import World, failure
from mpipar.errors import ConfigError, RankMapError, ShapeError
from mpipar.example import Example
from mpipar.model import LayerSpec, param_counts
from mpipar.pipeline.pipe import virtual_stages
from mpipar.rankmap import Grid, RankMap, parse_balance
from mpipar.run import parse
from mpipar.topology import Topology
from mpipar.session import reference_model
from mpipar.session import build_trainer

torch.set_num_threads(1)
world = World()
failure.install(world.host)
assert world.size == 4, "run on 4 ranks"
QUIET = lambda *a, **k: None  # noqa: E731
OUT = Path(tempfile.gettempdir()) / "mpipar_pipeline_checks"


def build(argv, example=None):
    args, ex = parse(["mlp", "--out", str(OUT), *argv])
    ex = example or ex
    grid = Grid.parse(args.grid, world.size)
    specs = ex.layers(args)
    stages = parse_balance(args.balance, [s.name for s in specs], virtual_stages(args.schedule, args.chunks, grid.pp, args.balance),
                           param_counts(specs))
    trainer = build_trainer(Topology.build(world, grid), RankMap(grid, stages), ex, specs, args, QUIET)
    return trainer, args, ex, specs


def train(argv):
    trainer, args, ex, specs = build(argv)
    data, _ = ex.data(args)
    from mpipar.train.batches import epoch_batches
    for epoch in range(args.epochs):
        batches = epoch_batches(len(data.y), args.batch_size, args.seed, epoch)[:args.steps]
        for i, idx in enumerate(batches):
            trainer.train_step(data.x[idx], data.y[idx], None, position=(i, len(batches)))
    return trainer, args, ex, specs, data


def compare(trainer, ref, what):
    mine = trainer.state_dict()
    want = ref.state_dict()
    assert mine and set(mine) <= set(want), (what, sorted(mine))
    for k, v in mine.items():
        torch.testing.assert_close(v, want[k], msg=lambda m: f"{what}: {k}: {m}")


def expect(exc_type, needle, fn):
    try:
        fn()
    except exc_type as e:
        assert needle in str(e), f"expected {needle!r} in: {e}"
        return str(e)
    raise AssertionError(f"expected {exc_type.__name__} with {needle!r}")


COMMON = ["--epochs", "2", "--steps", "10", "--batch-size", "64"]   # Adam at lr 1e-3 (higher lr amplifies the
# rounding difference between micro-batched and whole-batch gradients past fp32 tolerances)
t_start = time.perf_counter()
refs = {}
for schedule, extra in [("gpipe", []), ("1f1b", []), ("1f1b", ["--recompute"]), ("interleaved", []),
                        ("zb", []), ("zb", ["--recompute", "0,2"]), ("pipedream", [])]:
    t0 = time.perf_counter()
    argv = COMMON + ["--schedule", schedule, "--microbatches", "4", *extra]
    if schedule == "1f1b" and not extra:
        argv += ["--timeline", str(OUT / "timeline")]
    trainer, args, ex, specs, data = train(argv)
    if schedule == "pipedream":
        ref = reference_model(ex, specs, data, args, two_bw=True)
        plain = refs.setdefault("sync", reference_model(ex, specs, data, args))
        diff = max(float((a - plain.state_dict()[k]).abs().max()) for k, a in trainer.state_dict().items())
        assert diff > 1e-4, f"2BW must differ from synchronous training (max diff {diff})"
    else:
        ref = refs.setdefault("sync", reference_model(ex, specs, data, args))
    compare(trainer, ref, f"{schedule} {' '.join(extra)}")
    if "--timeline" in argv:
        trainer.pipe.write_timeline(QUIET)
        if world.rank == 0:
            doc = json.loads((OUT / "timeline.json").read_text())
            tids = {e["tid"] for e in doc["traceEvents"] if e["ph"] == "X"}
            cats = {e["cat"] for e in doc["traceEvents"] if e["ph"] == "X"}
            assert tids == {0, 1, 2, 3} and cats == {"F", "B"}, (tids, cats)
            assert (OUT / "timeline.png").stat().st_size > 1000
    held = world.allgather_floats([trainer.pipe.peak_held])[:, 0].tolist()
    if world.rank == 0:
        print(f"parity ok: {schedule:<11} {' '.join(extra):<12} 20 steps, peak held per rank {held}, "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    if schedule in ("1f1b", "zb"):
        assert max(held) <= 4, held

# -- 2BW resumed mid-epoch (a checkpoint restart skips steps): a new stream starts there ------
trainer, args, ex, specs = build(COMMON + ["--schedule", "pipedream", "--microbatches", "4"])
data, _ = ex.data(args)
from mpipar.train.batches import epoch_batches  # noqa: E402
batches = epoch_batches(len(data.y), args.batch_size, args.seed, 0)[:args.steps]
for i in range(3, len(batches)):
    trainer.train_step(data.x[batches[i]], data.y[batches[i]], None, position=(i, len(batches)))
assert not trainer.engine.sends and not trainer.stage.stash

# -- bad configurations: every rank raises the same one-line error before any message ------
expect(ConfigError, "multiple of p=4, got 6", lambda: build(["--schedule", "interleaved", "--microbatches", "6"]))
expect(ConfigError, "at least p=4 micro-batches", lambda: build(["--schedule", "pipedream", "--microbatches", "2"]))
expect(RankMapError, "needs p*v = 8 virtual stages",
       lambda: build(["--schedule", "interleaved", "--microbatches", "4", "--balance", "2,2,2,2"]))
expect(ConfigError, "--chunks 2 needs --schedule interleaved", lambda: build(["--chunks", "2"]))
trainer, args, ex, specs = build(["--schedule", "interleaved", "--microbatches", "4"])
x, y = torch.randn(3, 12), torch.randn(3, 12)     # 3 samples cannot make 4 micro-batches
expect(ConfigError, "multiple of p=4, got 3", lambda: trainer.train_step(x, y))


# -- shape and dtype mismatches: the receiving stage names both ranks and the shapes ----------
def mismatched(last_layer):
    dims = [LayerSpec("a", lambda: nn.Linear(12, 16)), LayerSpec("b", lambda: nn.Linear(16, 16)),
            LayerSpec("c", lambda: nn.Linear(16, 16)), LayerSpec("d", last_layer)]
    mlp = parse(["mlp"])[1]
    return Example(name="bad", summary="", layers=lambda a: dims, data=mlp.data, loss=nn.MSELoss,
                   optimizer=mlp.optimizer, task="regression")


for layer, needle in [(lambda: nn.Linear(32, 12), "cannot take the activation [5, 16] float32 from rank 2"),
                      (lambda: nn.Linear(16, 12).double(), "cannot take the activation [5, 16] float32")]:
    trainer, *_ = build(["--balance", "1,1,1,1"], mismatched(layer))
    run = lambda: trainer.pipe.forward_only(torch.randn(5, 12), torch.randn(5, 12), None)  # noqa: E731
    if world.rank == 3:
        msg = expect(ShapeError, needle, run)
        assert msg.startswith("stage 3 (rank 3, layers d..d)"), msg
    else:
        run()
    world.barrier()

if world.rank == 0:
    print(f"pipeline checks passed in {time.perf_counter() - t_start:.1f} s", flush=True)
sys.exit(0)
