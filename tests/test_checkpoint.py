"""Checkpoint logic in one process: atomic writes, manifests, verification (truncated and
corrupted shards fall back to the previous checkpoint), weights_only loading (no pickle),
keep-K, re-keying optimizer state by layer name across partitions, bit-identical resume, the
auto interval; mpipar.Checkpoint guarding a user's loop (non-finite steps stopped or skipped,
SIGTERM saving and exiting 75). The 4-rank cases (resume, fallback, resharding, async, the
guarded user loop) are tests/mpi/cases_checkpoint.py."""
import os
import pickle
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from mpipar.checkpoint import fault, restart, state, store
from mpipar.checkpoint.store import atomic_write, sha256_hex
from mpipar.checkpoint.checkpointer import Checkpointer
from mpipar.checkpoint.restart import newest_full_state
from mpipar.checkpoint.store import CheckpointError, Manifest, ShardInfo
from mpipar.checkpoint.state import deserialize, rng_state, serialize, set_rng_state
from mpipar.errors import ConfigError
from mpipar.model import LayerSpec, build_stage
from mpipar.rankmap import Grid, RankMap
from mpipar.train.metrics import Tally

torch.set_num_threads(1)
SPECS = [LayerSpec(f"l{i}", (lambda a=a, b=b: nn.Sequential(nn.Linear(a, b), nn.Tanh())))
         for i, (a, b) in enumerate([(6, 16), (16, 16), (16, 8), (8, 6)])]
NAMES = [s.name for s in SPECS]
DATA = torch.randn(48, 6, generator=torch.Generator().manual_seed(1))


class SoloWorld:
    """A one-rank World: collectives are identities."""
    rank, size, name = 0, 1, "solo"

    def allgather_floats(self, v):
        return np.asarray(v, dtype=np.float64).reshape(1, -1)

    def allreduce_native(self, t, op="sum"):
        return t

    def bcast_(self, t, root=0):
        return t

    def barrier(self):
        pass


def topo(pp=1, pp_rank=0):
    return SimpleNamespace(world=SoloWorld(), grid=Grid(pp, 1, 1), pp_rank=pp_rank, dp_rank=0, tp_rank=0, reporter=0)


def noisy(x):
    """The input with noise from torch's global RNG: a resume that does not restore the RNG state
    trains on other noise and ends with other parameters."""
    return x + 0.1 * torch.randn_like(x)


class MiniTrainer:
    """What the checkpointer touches of the Trainer, over a whole model or one stage."""

    def __init__(self, layers=NAMES, epochs=3):
        self.module = build_stage(SPECS, layers, seed=0)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=1e-2)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, 4, gamma=0.5)
        self.step_count, self.step_seconds = 0, []

    def train_step(self, x):
        self.optimizer.zero_grad()
        out = self.module(noisy(x))        # draws from torch's RNG on purpose: the draws move the parameters
        loss = ((out - x) ** 2).mean()
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.step_count += 1
        self.step_seconds.append(1e-3)
        return out


def fit(trainer, ck=None, epochs=3, batches=4, stop_at=None):
    """The trainer's loop, with the same hook calls Trainer.fit makes."""
    rows = ck.on_fit_start(trainer, None) if ck else []
    for epoch in range(ck.first_epoch(trainer) if ck else 0, epochs):
        tally = Tally(nn.MSELoss(), "regression")
        if ck:
            ck.on_epoch_start(trainer, epoch, tally)
        for i in range(batches):
            if ck and ck.skip_batch(trainer, epoch, i):
                continue
            if stop_at is not None and trainer.step_count == stop_at:
                return rows   # "crash": nothing after this point happens
            x = DATA[(i * 12) % 48:(i * 12) % 48 + 12]
            tally.add(trainer.train_step(x).detach(), x)
            if ck:
                ck.after_step(trainer, epoch, i + 1, batches, tally, rows)
        rows.append({"epoch": epoch + 1, "train_loss": tally.loss / tally.n})
        if ck:
            ck.after_epoch(trainer, epoch, rows)
    if ck:
        ck.on_fit_end(trainer)
    return rows


def checkpointer(root, every=3, keep=10, background=False, layers=NAMES, faults=None):
    rm = RankMap(Grid(1, 1, 1), [list(layers)])
    return Checkpointer(root, topo(), rm, every, keep, background, faults, lambda *a, **k: None,
                        {"seed": 0, "batch_size": 12, "microbatches": 1}, epochs=3)


def params(trainer):
    return {k: v.clone() for k, v in trainer.module.state_dict().items()}


def assert_bit_equal(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture
def reference():
    torch.manual_seed(123)
    t = MiniTrainer()
    rows = fit(t)
    return params(t), rows


# -- atomic writes, verification, no pickle --------------------------------------------------------

def test_atomic_write_interrupted_keeps_the_old_file(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write(path, b"old")

    def crash():
        raise KeyboardInterrupt("killed mid-write")

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, b"new contents" * 100, on_half_written=crash)
    assert path.read_bytes() == b"old"


def test_truncated_and_corrupted_shards_are_named(tmp_path):
    data = serialize({"model": {"w": torch.ones(100)}})
    (tmp_path / "rank-00000.pt").write_bytes(data[:-10])
    info = ShardInfo("rank-00000.pt", 0, [0, 0, 0], ["l0"], len(data), sha256_hex(data))
    assert store.read_verified(tmp_path, info)[1].endswith(f"truncated ({len(data) - 10} of {len(data)} bytes)")
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0xFF
    (tmp_path / "rank-00000.pt").write_bytes(bytes(bad))
    assert "corrupted (sha256 differs" in store.read_verified(tmp_path, info)[1]
    (tmp_path / "rank-00000.pt").write_bytes(data)
    assert store.read_verified(tmp_path, info) == (data, None)


class Evil:
    """Unpickling it would create the file `marker`: the proof that pickle code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_loading_never_executes_pickle(tmp_path):
    marker = tmp_path / "pickle-code-ran"
    data = serialize({"rng": Evil(marker)})
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        deserialize(data)
    assert not marker.exists()
    man = Manifest(1, 0, 1, {"pp": 1, "dp": 1, "tp": 1}, [NAMES],
                   [ShardInfo("rank-00000.pt", 0, [0, 0, 0], NAMES, len(data), sha256_hex(data))])
    (tmp_path / "rank-00000.pt").write_bytes(data)
    state, problem = restart.load_mine(man, tmp_path, Grid(1, 1, 1), 0, (0, 0, 0), NAMES, [])
    assert state is None and "cannot be loaded safely" in problem and not marker.exists()


def test_rng_and_optimizer_state_survive_weights_only():
    t = MiniTrainer()
    t.train_step(DATA[:8])
    snap = deserialize(serialize(state.snapshot(t, topo(), copy=True)))
    assert snap["optim"]["state"]["l0.0.weight"]["exp_avg"].shape == (16, 6)
    before = rng_state()
    a = torch.rand(3)
    set_rng_state(deserialize(serialize(before)))
    assert torch.equal(a, torch.rand(3))


# -- resume: bit-identical, fallback, keep-K ---------------------------------------------------------

@pytest.mark.smoke
def test_resume_is_bit_identical_and_rows_carry_over(tmp_path, reference):
    ref_params, ref_rows = reference
    torch.manual_seed(123)
    fit(MiniTrainer(), checkpointer(tmp_path), stop_at=7)   # checkpoints at steps 3 and 6
    assert [s for s, _ in store.step_dirs(tmp_path)] == [6, 3]
    torch.manual_seed(999)   # a relaunch starts with another RNG state: the checkpoint restores it
    t, ck = MiniTrainer(), checkpointer(tmp_path)
    assert ck.resume(t).step == 6 and (ck.start_epoch, ck.start_step) == (1, 2)
    rows = fit(t, ck)
    assert_bit_equal(params(t), ref_params)
    assert rows == ref_rows   # the per-epoch sums include the batches before the restart
    torch.manual_seed(999)    # the RNG's draws matter: other noise, other parameters (no restore, no equality)
    other = MiniTrainer()
    fit(other)
    assert any(not torch.equal(v, ref_params[k]) for k, v in params(other).items())


@pytest.mark.parametrize("damage", ["truncate", "corrupt", "no manifest"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, reference, damage):
    torch.manual_seed(123)
    fit(MiniTrainer(), checkpointer(tmp_path), stop_at=10)   # steps 3, 6, 9
    newest = store.step_dir(tmp_path, 9)
    shard_file = newest / "rank-00000.pt"
    if damage == "truncate":
        shard_file.write_bytes(shard_file.read_bytes()[:100])
    elif damage == "corrupt":
        raw = bytearray(shard_file.read_bytes())
        raw[-200] ^= 0x01
        shard_file.write_bytes(bytes(raw))
    else:
        (newest / "manifest.json").unlink()   # the job died before rank 0 wrote it
    before = {f.name: f.read_bytes() for f in newest.iterdir()}
    t, ck = MiniTrainer(), checkpointer(tmp_path)
    assert ck.resume(t).step == 6
    assert not newest.exists()   # moved out of the way: the resumed run writes step 9 again
    moved = tmp_path / "quarantine" / newest.name
    if damage == "no manifest":   # incomplete (the job died before its manifest): never a checkpoint
        assert not moved.exists()
    else:                         # rejected: kept as found, with the reason
        assert {f.name: f.read_bytes() for f in moved.iterdir() if not f.name.startswith("WHY-")} == before
        assert ("truncated" if damage == "truncate" else "corrupted") in (moved / "WHY-rank-00000.txt").read_text()
    fit(t, ck)
    assert_bit_equal(params(t), reference[0])


def test_every_kept_checkpoint_corrupt_stops_with_one_line_and_deletes_nothing(tmp_path, reference):
    """One flipped byte in each of the 3 kept checkpoints: resume moves them all to quarantine/
    untouched (with the reasons) and stops with one line naming the way out, instead of deleting
    them and training from step 0; told to start over, it does, and the quarantine stays."""
    torch.manual_seed(123)
    fit(MiniTrainer(), checkpointer(tmp_path, keep=3), stop_at=10)   # steps 3, 6, 9
    found = {}
    for step, path in store.step_dirs(tmp_path):
        raw = bytearray((path / "rank-00000.pt").read_bytes())
        raw[len(raw) // 2] ^= 0x04
        (path / "rank-00000.pt").write_bytes(bytes(raw))
        found[path.name] = {f.name: f.read_bytes() for f in path.iterdir()}
    assert sorted(found) == ["step-000000003", "step-000000006", "step-000000009"]
    with pytest.raises(CheckpointError) as e:
        checkpointer(tmp_path).resume(MiniTrainer())
    msg = str(e.value)
    assert "\n" not in msg and "no usable checkpoint" in msg and "all 3 were rejected" in msg, msg
    assert "corrupted (sha256 differs" in msg and "--restart-from-scratch" in msg, msg
    quarantined = tmp_path / "quarantine"
    for name, files in found.items():   # nothing deleted: every byte of every folder kept
        kept = quarantined / name
        assert {f.name: f.read_bytes() for f in kept.iterdir() if not f.name.startswith("WHY-")} == files, name
        assert "corrupted" in (kept / "WHY-rank-00000.txt").read_text()
    assert store.step_dirs(tmp_path) == []
    with pytest.raises(CheckpointError) as e:      # the same command again (a resubmit): still stops
        checkpointer(tmp_path).resume(MiniTrainer())
    msg = str(e.value)
    assert "\n" not in msg and "no usable checkpoint" in msg and "earlier run rejected 3" in msg, msg
    assert "--restart-from-scratch" in msg, msg
    assert sorted(p.name for p in quarantined.iterdir()) == sorted(found)
    torch.manual_seed(123)
    t = MiniTrainer()
    ck = Checkpointer(tmp_path, topo(), RankMap(Grid(1, 1, 1), [NAMES]), 3, 3, False, None, lambda *a, **k: None,
                      {"seed": 0, "batch_size": 12, "microbatches": 1}, epochs=3, restart_from_scratch=True)
    assert ck.resume(t) is None
    fit(t, ck)
    assert_bit_equal(params(t), reference[0])
    assert sorted(p.name for p in quarantined.iterdir()) == sorted(found)


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs mounted for the test (needs root: skipped elsewhere, failed under CI=true)."""
    from cluster import netns
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        netns.unavailable("mounting a small tmpfs needs root", "small_disk")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], check=True, timeout=30)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=30)


@pytest.mark.parametrize("background", [False, True], ids=["sync", "async"])
def test_a_full_disk_names_the_file_leaves_no_temp_file_and_keeps_the_last_checkpoint(small_disk, reference,
                                                                                         background):
    root = small_disk / "ckpt"
    torch.manual_seed(123)
    first = checkpointer(root, background=background)
    fit(MiniTrainer(), first, stop_at=6 if background else 4)   # step 3 committed (async: 6 in flight)
    first.writer.wait()
    t, ck = MiniTrainer(), checkpointer(root, background=background)
    assert ck.resume(t).step == 3
    filler = small_disk / "filler"
    with open(filler, "wb", buffering=0) as f:   # fill the disk, then free 8 KiB: the next shard fits in part
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    os.truncate(filler, max(0, filler.stat().st_size - 8192))
    with pytest.raises(CheckpointError) as e:
        fit(t, ck)
    msg, shard = str(e.value), store.step_dir(root, 6) / "rank-00000.pt"
    assert "\n" not in msg and f"this rank's checkpoint shard" in msg and str(shard) in msg, msg
    assert "No space left on device (ENOSPC)" in msg and "--checkpoint-dir" in msg, msg
    assert [p.name for p in small_disk.rglob("*.tmp*")] == []
    filler.unlink()   # space again: the last good checkpoint resumes to the uninterrupted run's bits
    t, ck = MiniTrainer(), checkpointer(root, background=background)
    assert ck.resume(t).step == 3
    fit(t, ck)
    assert_bit_equal(params(t), reference[0])


def test_crash_in_the_middle_of_a_write_never_becomes_latest(tmp_path, reference):
    class Crash(Exception):
        pass

    plan = fault.FaultPlan([fault.Fault(0, 7, "write")], tmp_path / "faults", 0)
    plan.die = lambda *a: (_ for _ in ()).throw(Crash())   # instead of SIGKILL
    torch.manual_seed(123)
    with pytest.raises(Crash):
        fit(MiniTrainer(), checkpointer(tmp_path, faults=plan))
    assert not (store.step_dir(tmp_path, 9) / "manifest.json").exists()
    assert (tmp_path / "LATEST").read_text().strip() == "step-000000006"
    t, ck = MiniTrainer(), checkpointer(tmp_path)
    assert ck.resume(t).step == 6
    fit(t, ck)
    assert_bit_equal(params(t), reference[0])


def test_async_writes_and_keep_k(tmp_path, reference):
    torch.manual_seed(123)
    t, ck = MiniTrainer(), checkpointer(tmp_path, every=2, keep=2, background=True)
    fit(t, ck)
    assert_bit_equal(params(t), reference[0])
    assert [s for s, _ in store.step_dirs(tmp_path)] == [12, 10]   # the final one, and one before
    man, state = newest_full_state(tmp_path)
    assert man.step == 12 and man.epoch == 3
    assert_bit_equal(state, reference[0])


# -- resharding: optimizer state keyed by layer name ---------------------------------------------

def test_two_stage_shards_load_into_one_stage(tmp_path):
    """A pp=2 checkpoint (two shards) loads into a pp=1 trainer; training goes on identically."""
    torch.manual_seed(5)
    whole = MiniTrainer()
    stages = [MiniTrainer(NAMES[:2]), MiniTrainer(NAMES[2:])]   # per-layer seeds: the same weights
    x = DATA[:12]
    torch.manual_seed(6)
    whole.train_step(x)
    # train the split model by hand: stage 0 then stage 1, same noise, same loss
    for s in stages:
        s.optimizer.zero_grad()
    torch.manual_seed(6)
    out = stages[1].module(stages[0].module(noisy(x)))
    ((out - x) ** 2).mean().backward()
    for s in stages:
        s.optimizer.step()
        s.scheduler.step()
        s.step_count = 1
    folder = store.step_dir(tmp_path, 1)
    folder.mkdir(parents=True)
    infos = []
    for r, s in enumerate(stages):
        data = serialize(state.snapshot(s, topo(2, r), copy=False))
        (folder / store.shard_name(r)).write_bytes(data)
        infos.append(ShardInfo(store.shard_name(r), r, [r, 0, 0], NAMES[2 * r:2 * r + 2], len(data), sha256_hex(data)))
    man = Manifest(1, 0, 1, {"pp": 2, "dp": 1, "tp": 1}, [NAMES[:2], NAMES[2:]], infos)
    assert [i.file for i in restart.needed(man, Grid(1, 1, 1), 0, (0, 0, 0), NAMES)] == ["rank-00000.pt", "rank-00001.pt"]
    merged = MiniTrainer()
    loaded, problem = restart.load_mine(man, folder, Grid(1, 1, 1), 0, (0, 0, 0), NAMES, list(merged.module.state_dict()))
    assert problem is None
    state.apply(merged, loaded)
    for k, v in whole.module.state_dict().items():
        torch.testing.assert_close(merged.module.state_dict()[k], v)
    torch.manual_seed(0)
    merged.train_step(DATA[12:24])
    torch.manual_seed(0)
    whole.train_step(DATA[12:24])
    for k, v in whole.module.state_dict().items():
        torch.testing.assert_close(merged.module.state_dict()[k], v)


def test_a_changed_model_is_a_clear_error():
    man = Manifest(1, 0, 1, {"pp": 1, "dp": 1, "tp": 1}, [["a", "b"]], [ShardInfo("r", 0, [0, 0, 0], ["a", "b"], 1, "")])
    with pytest.raises(CheckpointError, match="no state for layer"):
        restart.model_sources(man, ["a", "c"], 0, 1)
    with pytest.raises(CheckpointError, match="tp=1 and this run has tp=2"):
        restart.model_sources(man, ["a"], 0, 2)


def test_auto_interval_keeps_saving_near_the_budget():
    from mpipar.checkpoint.checkpointer import BUDGET, FIRST, Interval
    iv = Interval(None)
    assert iv.auto and iv.every == FIRST and iv.due(FIRST) and not iv.due(FIRST - 1)
    iv.saved(FIRST)
    assert iv.adapt(save_seconds=0.010, step_seconds=0.004)   # 10 ms per save, 4 ms per step
    assert iv.every == 125 and 0.010 / (iv.every * 0.004) <= BUDGET
    assert not iv.due(FIRST + 124) and iv.due(FIRST + 125)
    fixed = Interval(5)
    assert fixed.due(10) and not fixed.due(11) and not fixed.adapt(1.0, 0.001)


def test_resume_with_tensor_parallel_shards(tmp_path):
    """pp=2 x tp=2: each tp rank writes its own shard; a run of 3 epochs checkpoints as it goes,
    the newest checkpoints are then removed as if it had died in epoch 3, and resuming to 3
    epochs gives the same parameters, bit for bit, as the 3 uninterrupted epochs."""
    from mpirun import mpirun
    run = ["-m", "mpipar.run", "mlp", "--grid", "pp=2,tp=2", "--microbatches", "2", "--schedule", "1f1b",
           "--steps", "12", "--epochs", "3", "--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-every", "5"]
    p = mpirun(4, *run, "--out", str(tmp_path / "a"), "--save-params", str(tmp_path / "pa"), timeout=180)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    steps = store.step_dirs(tmp_path / "ck")           # newest first
    for _, folder in steps[:-1]:                        # died after the oldest one kept
        shutil.rmtree(folder)
    p = mpirun(4, *run, "--out", str(tmp_path / "c"), "--save-params", str(tmp_path / "pc"), timeout=180)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert f"resumed from {steps[-1][1].name}" in p.stdout and "tp=2" in p.stdout, p.stdout[-2000:]
    assert steps[-1][0] < 36, steps                    # an earlier step than the end: training resumed
    for s in (0, 1):
        a = torch.load(tmp_path / "pa" / f"stage{s}.pt", weights_only=True)
        c = torch.load(tmp_path / "pc" / f"stage{s}.pt", weights_only=True)
        assert sorted(a) == sorted(c)
        for k in a:
            assert torch.equal(a[k], c[k]), k


def test_zero_stage2_resumes_bit_identical_and_on_another_dp_size(tmp_path):
    """--zero 2 on dp=2: each replica writes its own part of the parameters and of Adam's state
    (nothing gathered: the two shards are the same size), and a resume assembles them, so
    stopping after 2 epochs and resuming to 3 gives the very parameters of 3 uninterrupted
    epochs, and resuming on dp=3 under --zero 3 (the parameters sharded too) continues (close:
    3 replicas sum the batch in another order)."""
    from mpirun import mpirun
    base = ["-m", "mpipar.run", "mlp", "--steps", "8", "--batch-size", "48"]
    run = [*base, "--zero", "2"]
    ck = ["--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-every", "5"]
    jobs = [(2, [*run, "--grid", "dp=2", "--epochs", "3", "--out", str(tmp_path / "a"), "--save-params", str(tmp_path / "pa")]),
            (2, [*run, "--grid", "dp=2", *ck, "--epochs", "2", "--out", str(tmp_path / "b")])]
    for np_, argv in jobs:
        p = mpirun(np_, *argv, timeout=180)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    from mpipar.checkpoint import store
    man, _ = store.read(store.step_dirs(tmp_path / "ck")[0][1])
    sizes = [s.bytes for s in man.shards]
    assert all(s.zero for s in man.shards) and max(sizes) < 1.1 * min(sizes), man.shards
    _, whole = newest_full_state(tmp_path / "ck")           # the parts merge into the whole model
    want = torch.load(tmp_path / "pa" / "stage0.pt", weights_only=True)
    assert {k: v.shape for k, v in whole.items()} == {k: v.shape for k, v in want.items()}
    shutil.copytree(tmp_path / "ck", tmp_path / "ck3")
    for np_, grid, folder, out, stage in ((2, "dp=2", "ck", "pc", "2"), (3, "dp=3", "ck3", "pd", "3")):
        p = mpirun(np_, *base, "--zero", stage, "--grid", grid, "--checkpoint-dir", str(tmp_path / folder), "--epochs", "3",
                   "--out", str(tmp_path / out), "--save-params", str(tmp_path / out), timeout=180)
        assert p.returncode == 0 and "resumed from" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
    a = torch.load(tmp_path / "pa" / "stage0.pt", weights_only=True)
    c = torch.load(tmp_path / "pc" / "stage0.pt", weights_only=True)
    d = torch.load(tmp_path / "pd" / "stage0.pt", weights_only=True)
    assert sorted(a) == sorted(c) == sorted(d)
    for k in a:
        assert torch.equal(a[k], c[k]), k
        torch.testing.assert_close(d[k], a[k], msg=lambda m: f"dp=3 resume: {k}: {m}")


# -- issue 30: mpipar.Checkpoint guards a user's loop as the Trainer's is guarded -------------------
# (one rank here; every rank agreeing on the same step: tests/mpi/cases_checkpoint.py; SIGTERM to a
# real job's launcher and ranks: tests/test_run.py)
import signal  # noqa: E402

import mpipar  # noqa: E402
from mpipar.train.guard import PREEMPTED_EXIT, NonFiniteError, Signals  # noqa: E402

BAD = 4   # 0-based: the fifth step's batch holds a NaN


def solo_topology():
    from mpipar.comm import World
    from mpipar.topology import Topology
    return Topology.build(World(), Grid(1))


def user_batch(step: int, poison=()):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(12, 6, generator=g, dtype=torch.float64)
    if step in poison:
        x[0, 0] = float("nan")
    return x


def user_loop(root, steps: int, *, poison=(), signal_after=None, guard=True, data_parallel=False, **options):
    """README (d)'s loop over a whole model on one rank (Adam, noise from torch's RNG), with
    `ckpt.finite(loss)` before opt.step() unless not `guard`; `signal_after`: SIGTERM to this
    process after that step (the handler only notes it). Returns the model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 6)).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    if data_parallel:
        opt = mpipar.DataParallel(model, solo_topology()).optimizer(opt)   # syncs on opt.step()
    ckpt = mpipar.Checkpoint(root, model, opt, solo_topology(), log=lambda *a: None, **{"every": 3, **options})
    try:
        step = ckpt.resume()
        while step < steps:
            x = user_batch(step, poison)
            opt.zero_grad()
            loss = ((model(noisy(x)) - x) ** 2).mean()
            loss.backward()
            if not guard or ckpt.finite(loss):
                opt.step()
            step += 1
            if step == signal_after:
                os.kill(os.getpid(), signal.SIGTERM)
            ckpt.step(step)
        ckpt.close()
    finally:
        ckpt.guard.close()   # this test process's handlers back, however the loop ended
    return model


def plain_loop(steps: int, skip=()):
    """The same training in a plain loop without mpipar, skipping the updates of steps `skip`."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 6)).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(steps):
        x = user_batch(step, skip)
        opt.zero_grad()
        ((model(noisy(x)) - x) ** 2).mean().backward()
        if step not in skip:
            opt.step()
    return model.state_dict()


def finite_checkpoints(root) -> list[int]:
    steps = []
    for step, folder in store.step_dirs(root):
        for shard in folder.glob("rank-*.pt"):
            for k, v in deserialize(shard.read_bytes())["model"].items():
                assert bool(v.isfinite().all()), f"{shard}: {k} not finite"
        steps.append(step)
    return steps


def test_a_signal_in_a_user_loop_saves_the_next_step_exits_75_and_the_resume_is_bit_equal(tmp_path, capfd):
    noted = []
    previous = signal.signal(signal.SIGTERM, lambda s, f: noted.append(s))   # runs if nothing else is installed
    try:
        with pytest.raises(SystemExit) as e:
            user_loop(tmp_path / "ck", 12, signal_after=4)
        assert e.value.code == PREEMPTED_EXIT and not noted
        line = capfd.readouterr().err.strip().splitlines()[-1]
        assert line.endswith(f"preempted by SIGTERM (first on rank 0) after step 5: checkpoint "
                             f"{store.step_dir(tmp_path / 'ck', 5)} written; the same command resumes from it; "
                             f"exit {PREEMPTED_EXIT}"), line
        assert signal.getsignal(signal.SIGTERM).__name__ == "<lambda>"     # the user's handler is back
        assert [s for s, _ in store.step_dirs(tmp_path / "ck")] == [5, 3]
        assert_bit_equal(user_loop(tmp_path / "ck", 12).state_dict(), plain_loop(12))
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_after_a_preemption_a_second_signal_cannot_kill_the_exiting_process():
    """SLURM's SIGTERM and the supervisor's SIGUSR1 are one preemption: once it is handled, a
    default action (death) becomes 'ignore'; a handler of the user's comes back as it was."""
    mine = lambda s, f: None  # noqa: E731
    before = signal.signal(signal.SIGTERM, signal.SIG_DFL), signal.signal(signal.SIGUSR1, mine)
    try:
        for leaving, term in ((False, signal.SIG_DFL), (True, signal.SIG_IGN)):
            Signals().install().close(leaving=leaving)
            assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == (term, mine)
    finally:
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGUSR1, before[1])


@pytest.mark.parametrize("data_parallel", [False, True])
def test_a_non_finite_step_in_a_user_loop_is_skipped_as_a_plain_loop_that_skips_it(tmp_path, data_parallel):
    """on_nonfinite='skip': the step's update is not applied, nothing else changes (with a
    DataParallel optimizer too: finite() syncs its gradients, opt.step() does not sync again)."""
    got = user_loop(tmp_path / "ck", 9, poison={BAD}, on_nonfinite="skip", data_parallel=data_parallel)
    assert_bit_equal(got.state_dict(), plain_loop(9, skip={BAD}))
    assert finite_checkpoints(tmp_path / "ck") == [9, 6, 3]


def test_a_non_finite_step_in_a_user_loop_stops_before_its_update_with_one_line(tmp_path):
    with pytest.raises(NonFiniteError) as e:
        user_loop(tmp_path / "ck", 9, poison={BAD})
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(
        f"step {BAD + 1}: non-finite loss (first on rank 0), non-finite gradients (first on rank 0); "
        f"on_nonfinite='stop': this step was not applied") and "mpipar.Checkpoint(..., on_nonfinite='skip')" in msg, msg
    assert finite_checkpoints(tmp_path / "ck") == [3]
    with pytest.raises(NonFiniteError, match=rf"step {BAD + 2}: .*; 2 in a row, nonfinite_limit=2: "):
        user_loop(tmp_path / "ck2", 9, poison={BAD, BAD + 1}, on_nonfinite="skip", nonfinite_limit=2)


def test_a_user_loop_without_finite_stops_at_non_finite_parameters_and_never_saves_them(tmp_path):
    """README (d) before issue 30 (no ckpt.finite): the NaN reaches the weights, step() stops
    every rank there, and no checkpoint holds it (one every step: the last is the step before)."""
    with pytest.raises(NonFiniteError, match=rf"^step {BAD + 1}: parameters are not finite after the update "
                                             r"\(first on rank 0\); nothing non-finite was checkpointed"):
        user_loop(tmp_path / "ck", 9, poison={BAD}, guard=False, every=1)
    assert finite_checkpoints(tmp_path / "ck")[0] == BAD


def test_a_non_finite_learning_rate_is_refused_by_the_checkpoint(tmp_path):
    model = nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="learning rate nan"):
        mpipar.Checkpoint(tmp_path, model, torch.optim.SGD(model.parameters(), lr=float("nan")), solo_topology())
