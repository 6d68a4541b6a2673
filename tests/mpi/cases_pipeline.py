"""The pipeline on 4 ranks: every schedule's parameters after 20 steps (two epochs) equal
single-process training (PipeDream-2BW: its own one-step-delayed reference, and it really does
differ from synchronous training), recompute changes nothing, interleaving runs its steady state
(8 micro-batches on p = 4), the timeline is written, a 2BW stream resumed mid-epoch leaves
nothing behind, and bad configurations and shape mismatches fail clearly on the right ranks.

Each rank trains the single-process reference itself and compares its own layers with it."""
import json

import pytest
import torch
from torch import nn

from mpipar.errors import ConfigError, RankMapError, ShapeError
from mpipar.app.example import Example
from mpipar.model import LayerSpec, param_counts
from mpipar.pipeline import simulate
from mpipar.pipeline.pipe import virtual_stages
from mpipar.rankmap import Grid, RankMap, parse_balance
from mpipar.app.run import parse
from mpipar.app.session import build_trainer, reference_model
from mpipar.topology import Topology
from mpipar.train.batches import epoch_batches

NP = (4,)
TIMEOUT = 240

torch.set_num_threads(1)
QUIET = lambda *a, **k: None  # noqa: E731
COMMON = ["--epochs", "2", "--steps", "10", "--batch-size", "64"]   # Adam at lr 1e-3 (a higher lr amplifies
# the rounding difference between micro-batched and whole-batch gradients past fp32 tolerances)
REFS = {}   # the same single-process references on every rank, trained once per job


def build(world, argv, out, example=None):
    args, ex = parse(["mlp", "--out", str(out), *argv])
    ex = example or ex
    grid = Grid.parse(args.grid, world.size)
    specs = ex.layers(args)
    stages = parse_balance(args.balance, [s.name for s in specs],
                           virtual_stages(args.schedule, grid.pp, args.balance), param_counts(specs))
    trainer = build_trainer(Topology.build(world, grid), RankMap(grid, stages), ex, specs, args, QUIET)
    return trainer, args, ex, specs


def train(world, argv, out):
    trainer, args, ex, specs = build(world, argv, out)
    data, _ = ex.data(args)
    for epoch in range(args.epochs):
        batches = epoch_batches(len(data.y), args.batch_size, args.seed, epoch)[:args.steps]
        for i, idx in enumerate(batches):
            trainer.train_step(data.x[idx], data.y[idx], None, position=(i, len(batches)))
    return trainer, args, ex, specs, data


def reference(kind, ex, specs, data, args):
    if kind not in REFS:
        REFS[kind] = reference_model(ex, specs, data, args, two_bw=kind == "2bw").state_dict()
    return REFS[kind]


def compare(trainer, want, what):
    mine = trainer.state_dict()
    assert mine and set(mine) <= set(want), (what, sorted(mine))
    for k, v in mine.items():
        torch.testing.assert_close(v, want[k], msg=lambda m: f"{what}: {k}: {m}")


SCHEDULES = [("gpipe", 4, []), ("1f1b", 4, []), ("1f1b", 4, ["--recompute"]), ("eager-1f1b", 8, []), ("interleaved", 8, []),
             ("zb", 4, []), ("zb", 4, ["--recompute", "0,2"]), ("pipedream", 4, [])]


@pytest.mark.parametrize("schedule, m, extra", SCHEDULES,
                         ids=[f"{s}-m{m}{''.join(e)}" for s, m, e in SCHEDULES])
def test_schedule_equals_single_process_training(world, mpi_tmp_path, schedule, m, extra):
    argv = COMMON + ["--schedule", schedule, "--microbatches", str(m), *extra]
    trainer, args, ex, specs, data = train(world, argv, mpi_tmp_path)
    if schedule == "pipedream":
        plain = reference("sync", ex, specs, data, args)
        diff = max(float((a - plain[k]).abs().max()) for k, a in trainer.state_dict().items())
        assert diff > 1e-4, f"2BW must differ from synchronous training (max diff {diff})"
    compare(trainer, reference("2bw" if schedule == "pipedream" else "sync", ex, specs, data, args), schedule)
    held = world.allgather_floats([trainer.pipe.peak_held])[:, 0].tolist()
    if schedule != "pipedream":   # what the simulator predicts for each rank (2BW streams across steps)
        v = 2 if schedule == "interleaved" else 1
        assert held == simulate.run(schedule, 4, m, v).peak_held, (held, schedule, m)


def test_ranks_share_the_profiling_and_measure_once_per_key(world, mpi_tmp_path, monkeypatch):
    """--balance time: the ranks on rank 0's host (one per core) each time an even share of the
    layers, every rank gets the same costs, and the second call reads rank 0's cache."""
    import os
    from mpipar import profile
    from mpipar.pipeline.balance import shared_costs
    monkeypatch.setenv("MPIPAR_CACHE", str(mpi_tmp_path / "cache"))
    mine = []
    real = profile.profile_layers
    monkeypatch.setattr(profile, "profile_layers", lambda *a, **k: mine.extend(k["which"]) or real(*a, **k))
    specs = [LayerSpec(f"l{i}", lambda: nn.Linear(8, 8)) for i in range(6)]
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    first = shared_costs(specs, x, world)
    table = lambda costs: [v for c in costs for v in (c.seconds, c.saved_bytes, c.param_bytes)]  # noqa: E731
    every = world.allgather_floats(table(first))
    assert (every == every[0]).all() and all(c.seconds > 0 for c in first)
    counts = world.allgather_floats([len(mine)])[:, 0]
    k = min(6, world.size, os.cpu_count() or 1)          # one host here
    assert counts.sum() == 6 and (counts > 0).sum() == k, counts
    world.barrier()
    again = shared_costs(specs, x, world)
    assert again == first and world.allgather_floats([len(mine)])[:, 0].tolist() == counts.tolist()


def test_timeline_is_written(world, mpi_tmp_path):
    out = mpi_tmp_path / "timeline"
    trainer, *_ = train(world, COMMON + ["--schedule", "1f1b", "--microbatches", "4", "--timeline", str(out)],
                        mpi_tmp_path)
    trainer.pipe.write_timeline(QUIET)
    world.barrier()
    if world.rank == 0:
        doc = json.loads(out.with_suffix(".json").read_text())
        events = [e for e in doc["traceEvents"] if e["ph"] == "X"]
        assert {e["tid"] for e in events} == {0, 1, 2, 3} and {e["cat"] for e in events} == {"F", "B"}
        assert out.with_suffix(".png").stat().st_size > 1000


def test_pipedream_resumed_mid_epoch_leaves_nothing_in_flight(world, mpi_tmp_path):
    """A checkpoint restart skips steps: a new stream starts there and drains at the epoch end."""
    trainer, args, ex, specs = build(world, COMMON + ["--schedule", "pipedream", "--microbatches", "4"],
                                     mpi_tmp_path)
    data, _ = ex.data(args)
    batches = epoch_batches(len(data.y), args.batch_size, args.seed, 0)[:args.steps]
    for i in range(3, len(batches)):
        trainer.train_step(data.x[batches[i]], data.y[batches[i]], None, position=(i, len(batches)))
    assert not trainer.engine.sends and not trainer.stage.stash


BAD = [(ConfigError, "multiple of p=4, got 6", ["--schedule", "interleaved", "--microbatches", "6"]),
       (ConfigError, "at least p=4 micro-batches", ["--schedule", "pipedream", "--microbatches", "2"]),
       (RankMapError, "needs p*v = 8 virtual stages",
        ["--schedule", "interleaved", "--microbatches", "4", "--balance", "2,2,2,2"]),
       (ConfigError, "--chunks 2 needs --schedule interleaved", ["--chunks", "2"])]


@pytest.mark.parametrize("exc, needle, argv", BAD, ids=[b[1] for b in BAD])
def test_bad_configuration_fails_on_every_rank_before_any_message(world, mpi_tmp_path, exc, needle, argv):
    with pytest.raises(exc, match=needle.replace("*", r"\*")):
        build(world, argv, mpi_tmp_path)


def test_a_batch_too_small_for_the_micro_batches_fails_on_every_rank(world, mpi_tmp_path):
    trainer, *_ = build(world, ["--schedule", "interleaved", "--microbatches", "4"], mpi_tmp_path)
    x, y = torch.randn(3, 12), torch.randn(3, 12)     # 3 samples cannot make 4 micro-batches
    with pytest.raises(ConfigError, match="multiple of p=4, got 3"):
        trainer.train_step(x, y)


def mismatched(last_layer):
    dims = [LayerSpec("a", lambda: nn.Linear(12, 16)), LayerSpec("b", lambda: nn.Linear(16, 16)),
            LayerSpec("c", lambda: nn.Linear(16, 16)), LayerSpec("d", last_layer)]
    mlp = parse(["mlp"])[1]
    return Example(name="bad", summary="", layers=lambda a: dims, data=mlp.data, loss=nn.MSELoss,
                   optimizer=mlp.optimizer, task="regression")


@pytest.mark.parametrize("layer, needle", [
    (lambda: nn.Linear(32, 12), "cannot take the activation [5, 16] float32 from rank 2"),
    (lambda: nn.Linear(16, 12).double(), "cannot take the activation [5, 16] float32")], ids=["shape", "dtype"])
def test_a_mismatch_names_both_ranks_and_the_shape(world, mpi_tmp_path, layer, needle):
    trainer, *_ = build(world, ["--balance", "1,1,1,1"], mpi_tmp_path, mismatched(layer))
    run = lambda: trainer.pipe.forward_only(torch.randn(5, 12), torch.randn(5, 12), None)  # noqa: E731
    if world.rank == 3:
        with pytest.raises(ShapeError) as e:
            run()
        assert needle in str(e.value) and str(e.value).startswith("stage 3 (rank 3, layers d..d)"), str(e.value)
    else:
        run()
