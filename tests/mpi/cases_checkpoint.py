"""Checkpoint/restart on 4 ranks: an uninterrupted pp=4 run checkpoints at steps 4, 8 and 12;
resuming from step 4 is bit-identical; a corrupted or truncated shard makes every rank fall back
to the previous checkpoint (and the rank that read it says why); the pp=4 checkpoint resumes on
pp=2 x dp=2 and on pp=2 with the same model function and trains on to the uninterrupted run's
parameters; async writes give the same result. A signal on one rank stops every rank at the same
step with a checkpoint the resume continues bit-equal from; a NaN gradient on one rank stops every
rank at the same step with nothing non-finite checkpointed, or is skipped by every rank alike; an
epoch resumed mid-way on another grid reports the loss of every replica's batches. The same for
a user's own loop with mpipar.Checkpoint: a signal on one rank (pp=2 x dp=2), a NaN on one
DataParallel replica (skipped as single-process training that skips it, or stopped)."""
import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest
import torch

from mpipar.callbacks import AfterBackward, Callback
from mpipar.checkpoint import store
from mpipar.checkpoint.restart import newest_full_state
from mpipar.model import build_full
from mpipar.rankmap import Grid, RankMap
from mpipar.app.run import parse
from mpipar.app.session import build_trainer, partition, run_facts
from mpipar.topology import Topology
from mpipar.train.checkpointing import CheckpointConfig, attach_checkpoint
from mpipar.train.guard import PREEMPTED_EXIT, NonFiniteError

NP = (4,)
TIMEOUT = 300

torch.set_num_threads(1)
quiet = lambda *a, **k: None  # noqa: E731


@pytest.fixture(scope="module")
def root(world):
    """One folder every rank sees (rank 0 makes it and broadcasts its name); removed at the end."""
    name = torch.zeros(256, dtype=torch.uint8)
    if world.rank == 0:
        raw = tempfile.mkdtemp(prefix="mpipar-ckpt-cases-").encode()
        name[:len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    world.bcast_(name, 0)
    path = Path(bytes(name.tolist()).rstrip(b"\0").decode())
    yield path
    world.barrier()
    if world.rank == 0:
        shutil.rmtree(path, ignore_errors=True)


def run(w, root, grid_text, ckpt, *flags, train_it=True):
    """Build the mlp example on World `w` with `grid_text`, attach a checkpointer (resuming
    from `ckpt` if it holds one), train; returns (trainer, checkpointer, args, example)."""
    args, example = parse(["mlp", "--epochs", "2", "--steps", "6", "--log-level", "quiet", "--out", str(root / "out"),
                           "--checkpoint-dir", str(ckpt), "--checkpoint-every", "4", *flags])
    grid = Grid.parse(grid_text, w.size)
    specs = example.layers(args)
    rankmap = RankMap(grid, partition(w, specs, args, grid, None)[0])
    trainer = build_trainer(Topology.build(w, grid), rankmap, example, specs, args, quiet)   # as the session does
    train, test = example.data(args)
    ck = attach_checkpoint(trainer, rankmap, len(train), CheckpointConfig(
        args.checkpoint_dir, args.checkpoint_every, args.keep or CheckpointConfig.keep, args.async_checkpoint,
        args.inject_fault, str(root / "faults")), run_facts(example, args), quiet)
    if train_it:
        trainer.fit(train, test)
    return trainer, ck, args, example


def stage_params(trainer):
    return {k: v.detach().clone() for k, v in trainer.module.state_dict().items()}


def same_bits(a, b, what):
    assert sorted(a) == sorted(b), f"{what}: keys differ"
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


def keep_only(world, src, dst, steps):
    """Rank 0 copies the chosen checkpoint folders of `src` into `dst`; then everyone goes on."""
    if world.rank == 0:
        dst.mkdir(parents=True)
        for s in steps:
            shutil.copytree(store.step_dir(src, s), store.step_dir(dst, s))
    world.barrier()


@pytest.fixture(scope="module")
def uninterrupted(world, root):
    """The pp=4 run with sync checkpoints at steps 4, 8 and the final 12: (folder, this rank's
    parameters, checkpointer, args, example)."""
    a = root / "a"
    trainer, ck, args, example = run(world, root, "pp=4", a)
    return a, stage_params(trainer), ck, args, example


def test_an_uninterrupted_run_checkpoints_every_4_steps_and_at_the_end(uninterrupted):
    a, _, ck, _, _ = uninterrupted
    assert [s for s, _ in store.step_dirs(a)] == [12, 8, 4]
    assert ck.report["saves"] == 3


def test_resuming_from_step_4_is_bit_identical(world, root, uninterrupted):
    a, reference, *_ = uninterrupted
    b = root / "b"
    keep_only(world, a, b, [4])
    t, ck, _, _ = run(world, root, "pp=4", b)
    assert ck.resumed.step == 4 and (ck.resumed.epoch, ck.resumed.step_in_epoch) == (0, 4)
    same_bits(stage_params(t), reference, "resumed from step 4")


@pytest.mark.parametrize("damage, said", [("corrupt", "corrupted (sha256 differs from the manifest)"),
                                          ("truncate", "truncated (")])
def test_a_damaged_shard_makes_every_rank_fall_back(world, root, uninterrupted, capfd, damage, said):
    a, reference, *_ = uninterrupted
    c = root / f"c-{damage}"
    keep_only(world, a, c, [4, 8])
    if world.rank == 0:
        f = store.step_dir(c, 8) / "rank-00002.pt"
        raw = bytearray(f.read_bytes())
        if damage == "corrupt":
            raw[len(raw) // 2] ^= 0x10
        else:
            raw = raw[:len(raw) // 3]
        f.write_bytes(bytes(raw))
    world.barrier()
    t, ck, _, _ = run(world, root, "pp=4", c)
    assert ck.resumed.step == 4, (damage, ck.resumed.step)
    same_bits(stage_params(t), reference, f"after a {damage}ed shard")
    if world.rank == 2:   # the rank that read the shard says what is wrong with it
        assert said in capfd.readouterr().err


@pytest.mark.parametrize("grid_text", ["pp=2,dp=2", "pp=2"])
def test_a_pp4_checkpoint_resumes_on_another_grid(world, root, uninterrupted, grid_text):
    a, _, _, args, example = uninterrupted
    d = root / f"d-{grid_text.replace(',', '-').replace('=', '')}"
    keep_only(world, a, d, [8])
    _, full_state = newest_full_state(d)
    full = build_full(example.layers(args), args.seed)
    full.load_state_dict(full_state)
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = full(x)
    w = world if grid_text == "pp=2,dp=2" else world.split(int(world.rank >= 2), world.rank, "half")
    if w.size == 2 and world.rank >= 2:
        return   # pp=2 runs on ranks 0-1 only
    t, ck, _, _ = run(w, root, grid_text, d, train_it=False)
    assert ck.resumed.step == 8 and ck.resumed.grid == {"pp": 4, "dp": 1, "tp": 1}
    got = []   # the resumed pipeline computes what the merged single-process model computes
    t.pipe.forward_only(x, x, lambda mb, out: got.append(out))
    if t.topo.is_last_stage:
        torch.testing.assert_close(got[0], want)
    t.fit(*example.data(args))   # and training goes on to the uninterrupted run's parameters
    man, merged = newest_full_state(d)
    assert man.step == 12 and man.grid["pp"] == 2
    _, ref_merged = newest_full_state(a)
    for k in ref_merged:
        torch.testing.assert_close(merged[k], ref_merged[k], msg=lambda m: f"{grid_text}: {k}: {m}")


def test_async_writes_give_the_same_result(world, root, uninterrupted):
    a, reference, *_ = uninterrupted
    f = root / "f"
    t, ck, _, _ = run(world, root, "pp=4", f, "--async-checkpoint")
    same_bits(stage_params(t), reference, "async checkpoints")
    world.barrier()
    _, merged = newest_full_state(f)
    _, ref_merged = newest_full_state(a)
    same_bits(merged, ref_merged, "async final checkpoint")


# -- issue 30: signals, non-finite steps, an epoch's tally across a reshard ----------------------------

class SignalAt(Callback):
    """After optimizer step `step`, rank `rank` alone signals itself (the others never hear of it
    but through the step's agreement)."""

    def __init__(self, rank, step, signum=signal.SIGUSR1):
        self.rank, self.step, self.signum = rank, step, signum

    def after_step(self, trainer, *a):
        if trainer.topo.world.rank == self.rank and trainer.step_count == self.step:
            os.kill(os.getpid(), self.signum)


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step_and_the_resume_is_bit_equal(world, root,
                                                                                            uninterrupted):
    _, reference, *_ = uninterrupted
    g = root / "g"
    t, ck, args, example = run(world, root, "pp=4", g, train_it=False)
    t.callbacks.append(SignalAt(2, 4))
    with pytest.raises(SystemExit) as e:
        t.fit(*example.data(args))
    assert e.value.code == PREEMPTED_EXIT and t.step_count == 5     # the next step's agreement, everywhere
    assert [s for s, _ in store.step_dirs(g)][0] == 5
    t, ck, _, _ = run(world, root, "pp=4", g)
    assert ck.resumed.step == 5
    same_bits(stage_params(t), reference, "resumed after a signal")


def poison_grad(rank, step):
    """After backward of step `step`, rank `rank`'s first gradient holds a NaN (after the
    data-parallel reduction: its replicas do not see it)."""
    def edit(trainer):
        if trainer.topo.world.rank == rank and trainer.step_count == step - 1:
            next(p for p in trainer.params if p.grad is not None).grad.view(-1)[0] = float("nan")
    return AfterBackward(edit)


def test_a_nan_gradient_on_one_rank_stops_every_rank_before_its_step(world, root):
    h = root / "h"
    t, ck, args, example = run(world, root, "pp=2,dp=2", h, train_it=False)
    t.callbacks.insert(0, poison_grad(3, 5))
    with pytest.raises(NonFiniteError, match=r"step 5 \(epoch 1\): non-finite gradients \(first on rank 3\)"):
        t.fit(*example.data(args))
    assert t.step_count == 4
    world.barrier()
    man, state = newest_full_state(h)
    assert man.step == 4 and all(bool(v.isfinite().all()) for v in state.values())


def test_a_nan_gradient_on_one_rank_is_skipped_by_every_rank_alike(world, root):
    """--dp-check-every 1: the replicas prove themselves bit-identical every step."""
    t, ck, args, example = run(world, root, "pp=2,dp=2", root / "i", "--on-nonfinite", "skip", "--dp-check-every", "1",
                               train_it=False)
    t.callbacks.insert(0, poison_grad(3, 5))
    rows = t.fit(*example.data(args))
    assert t.step_count == 12 and rows[0]["skipped_steps"] == 1 and "skipped_steps" not in rows[1]


@pytest.mark.parametrize("before, after", [("pp=2,dp=2", "pp=4"), ("dp=4", "dp=2")])
def test_an_epoch_resumed_mid_way_on_another_grid_reports_every_replicas_loss(world, root, before, after):
    """Resumed from step 8 (epoch 2, batch 2), the epoch's row equals the uninterrupted run's."""
    name = f"j-{before}-{after}".replace(",", "").replace("=", "")
    whole, cut = root / name, root / f"{name}-cut"
    t, _, args, example = run(world, root, before, whole, train_it=False)
    want = t.fit(*example.data(args))
    keep_only(world, whole, cut, [8])
    w = world if after != "dp=2" else world.split(int(world.rank >= 2), world.rank, "half")
    if w.size == 2 and world.rank >= 2:
        return   # dp=2 runs on ranks 0-1 only
    t, ck, _, _ = run(w, root, after, cut, train_it=False)
    assert (ck.resumed.step, ck.resumed.epoch, ck.resumed.step_in_epoch) == (8, 1, 2)
    got = t.fit(*example.data(args))
    for key in ("train_loss", "train_rmse"):
        torch.testing.assert_close(got[1][key], want[1][key], rtol=1e-5, atol=0, msg=lambda m: f"{key}: {m}")


def test_every_kept_checkpoint_corrupt_stops_every_rank_alike_and_deletes_nothing(world, root, uninterrupted):
    """One flipped byte in each of the 3 kept checkpoints, each in another rank's shard: every
    rank raises the same one-line CheckpointError, and the 3 folders are in quarantine/ as found."""
    import zlib
    from mpipar.checkpoint.store import CheckpointError
    a, *_ = uninterrupted
    k = root / "k"
    keep_only(world, a, k, [4, 8, 12])
    if world.rank == 0:
        for step in (4, 8, 12):
            f = store.step_dir(k, step) / store.shard_name(step // 4)
            raw = bytearray(f.read_bytes())
            raw[len(raw) // 2] ^= 0x08
            f.write_bytes(bytes(raw))
    world.barrier()
    before = {p.name: {f.name: f.read_bytes() for f in p.iterdir()} for _, p in store.step_dirs(k)}
    with pytest.raises(CheckpointError) as e:
        run(world, root, "pp=4", k, train_it=False)
    msg = str(e.value)
    assert "\n" not in msg and "all 3 were rejected" in msg and "--restart-from-scratch" in msg, msg
    assert len(set(world.allgather_floats([zlib.crc32(msg.encode())])[:, 0])) == 1, "ranks differ"
    assert sorted(before) == ["step-000000004", "step-000000008", "step-000000012"] and not store.step_dirs(k)
    for name, files in before.items():
        kept = k / "quarantine" / name
        assert {f.name: f.read_bytes() for f in kept.iterdir() if not f.name.startswith("WHY-")} == files, name
        assert "corrupted" in (kept / f"WHY-rank-{int(name[-9:]) // 4:05d}.txt").read_text(), name


# -- issue 30: mpipar.Checkpoint guards a user's loop on every rank at the same step --------------------

def user_pipeline_loop(world, folder, until, signal_after=None):
    """README (d)'s loop (ckpt.finite before opt.step) on pp=2 x dp=2 in float64, checkpoints
    every 3 steps; `signal_after`: (rank, step) that sends itself SIGUSR1. Returns this rank's
    parameters (single-process names)."""
    import mpipar
    from torch import nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)).double()
    pipe = mpipar.Pipeline(model, Topology.build(world, Grid.parse("pp=2,dp=2", world.size)), microbatches=2,
                           loss_fn=nn.MSELoss())
    opt = torch.optim.Adam(pipe.parameters(), lr=1e-2)
    ckpt = mpipar.Checkpoint(folder, pipe, opt, every=3, log=quiet)
    try:
        step = ckpt.resume()
        while step < until:
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(32, 16, generator=g, dtype=torch.float64), torch.randn(32, 4, generator=g, dtype=torch.float64)
            opt.zero_grad()
            if ckpt.finite(pipe.step(x, y)):
                opt.step()
            step += 1
            if signal_after == (world.rank, step):
                os.kill(os.getpid(), signal.SIGUSR1)
            ckpt.step(step)
        ckpt.close()
    finally:
        ckpt.guard.close()
    return {k: v.detach().clone() for k, v in pipe.state_dict().items()}


def test_a_signal_on_one_rank_of_a_user_loop_stops_every_rank_at_the_same_step_and_resumes_bit_equal(world, root):
    want = user_pipeline_loop(world, root / "user-whole", 9)
    with pytest.raises(SystemExit) as e:
        user_pipeline_loop(world, root / "user-cut", 9, signal_after=(2, 4))
    assert e.value.code == PREEMPTED_EXIT
    world.barrier()
    assert [s for s, _ in store.step_dirs(root / "user-cut")] == [5, 3]   # the next step's agreement, everywhere
    same_bits(user_pipeline_loop(world, root / "user-cut", 9), want, "a user loop resumed after a signal")


def user_dp_loop(world, folder, steps, policy, bad=(3, 2)):
    """A user's DataParallel loop on dp=4 (the optimizer syncs), float64, global batches of 32
    and 30 in turn (shards 8/8/8/8, 8/8/7/7: a skipped step left unsynced would weigh the next
    one wrongly); rank bad[0]'s shard of step bad[1] (0-based) holds a NaN. Returns the model."""
    import mpipar
    from torch import nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    topo = Topology.build(world, Grid.parse("dp=4", world.size))
    dp = mpipar.DataParallel(model, topo)
    opt = dp.optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    ckpt = mpipar.Checkpoint(folder, model, opt, topo, every=2, on_nonfinite=policy, log=quiet)
    try:
        for step in range(steps):
            x, y = (t.tensor_split(4)[world.rank].clone() for t in dp_batch(step))
            if (world.rank, step) == bad:
                x[0, 0] = float("nan")
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            if ckpt.finite(loss):      # syncs the replicas' gradients first: every rank sees the NaN
                opt.step()
            ckpt.step(step + 1)
        ckpt.close()
    finally:
        ckpt.guard.close()
        dp.remove()
    return model


def dp_batch(step):
    g, n = torch.Generator().manual_seed(100 + step), 32 - 2 * (step % 2)
    return torch.randn(n, 8, generator=g, dtype=torch.float64), torch.randn(n, 4, generator=g, dtype=torch.float64)


def dp_reference(steps, skip):
    """Single-process training on the whole batches, without the updates of steps `skip`."""
    from torch import nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        if step not in skip:
            x, y = dp_batch(step)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    return model.state_dict()


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_a_nan_on_one_replica_of_a_user_loop_is_skipped_or_stops_every_rank_alike(world, root, policy):
    import zlib
    folder = root / f"user-dp-{policy}"
    if policy == "skip":
        got = user_dp_loop(world, folder, 6, policy).state_dict()
        want = dp_reference(6, skip={2})
    else:
        with pytest.raises(NonFiniteError) as e:
            user_dp_loop(world, folder, 6, policy)
        msg = str(e.value)   # rank 3's loss, and after the sync every replica's gradients
        assert msg.startswith("step 3: non-finite loss (first on rank 3), non-finite gradients (first on rank 0); "
                              "on_nonfinite='stop'"), msg
        assert len(set(world.allgather_floats([zlib.crc32(msg.encode())])[:, 0])) == 1, "ranks differ"
        world.barrier()
        man, got = newest_full_state(folder)
        assert man.step == 2
        want = dp_reference(2, skip=())
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, msg=lambda m: f"{policy}: {k}: {m}")
