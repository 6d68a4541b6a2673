"""Checkpoint/restart on 4 ranks in one launch: resume is bit-identical, a corrupted or truncated
shard makes every rank fall back to the previous checkpoint, a pp=4 checkpoint resumes on
pp=2 and on pp=2 x dp=2 with the same model function, async writes give the same result.
usage: mpirun -np 4 python tests/mpi/checkpoint_checks.py TMPDIR"""
import shutil
import sys
from pathlib import Path

import torch

from mpipar.checkpoint import store
from mpipar.checkpoint.restart import newest_full_state
from mpipar.comm import World, failure
from mpipar.model import build_full
from mpipar.rankmap import Grid, RankMap
from mpipar.run import parse
from mpipar.session import build_trainer, partition, run_facts
from mpipar.topology import Topology
from mpipar.train.checkpointing import CheckpointConfig, attach_checkpoint

torch.set_num_threads(1)
world = World()
failure.install(world.host)
ROOT = Path(sys.argv[1])
quiet = lambda *a, **k: None  # noqa: E731


def run(w, grid_text, ckpt, *flags, train_it=True):
    """Build the mlp example on World `w` with `grid_text`, attach a checkpointer (resuming
    from `ckpt` if it holds one), train; returns (trainer, checkpointer, args, example)."""
    args, example = parse(["mlp", "--epochs", "2", "--steps", "6", "--log-level", "quiet", "--out", str(ROOT / "out"),
                           "--checkpoint-dir", str(ckpt), "--checkpoint-every", "4", *flags])
    grid = Grid.parse(grid_text, w.size)
    specs = example.layers(args)
    rankmap = RankMap(grid, partition(w, specs, args, grid, None))
    topo = Topology.build(w, grid)
    trainer = build_trainer(topo, rankmap, example, specs, args, quiet)   # as the session does
    train, test = example.data(args)
    ck = attach_checkpoint(trainer, rankmap, len(train), CheckpointConfig(
        args.checkpoint_dir, args.checkpoint_every, args.keep or CheckpointConfig.keep, args.async_checkpoint,
        args.inject_fault, str(ROOT / "faults")), run_facts(example, args), quiet)
    if train_it:
        trainer.fit(train, test)
    return trainer, ck, args, example


def stage_params(trainer):
    return {k: v.detach().clone() for k, v in trainer.module.state_dict().items()}


def same_bits(a, b, what):
    assert sorted(a) == sorted(b), f"{what}: keys differ"
    for k in a:
        assert torch.equal(a[k], b[k]), f"rank {world.rank}: {what}: {k} differs"


def keep_only(src, dst, steps):
    """Rank 0 copies the chosen checkpoint folders of `src` into `dst`; then everyone goes on."""
    if world.rank == 0:
        dst.mkdir(parents=True)
        for s in steps:
            shutil.copytree(store.step_dir(src, s), store.step_dir(dst, s))
    world.barrier()


# 1. uninterrupted pp=4 run with sync checkpoints at steps 4, 8 and the final 12
A = ROOT / "a"
ref_trainer, ck, args, example = run(world, "pp=4", A)
reference = stage_params(ref_trainer)
assert [s for s, _ in store.step_dirs(A)] == [12, 8, 4], store.step_dirs(A)
assert ck.report["saves"] == 3

# 2. resume from step 4: bit-identical to the uninterrupted run
B = ROOT / "b"
keep_only(A, B, [4])
t, ck, _, _ = run(world, "pp=4", B)
assert ck.resumed.step == 4 and (ck.resumed.epoch, ck.resumed.step_in_epoch) == (0, 4)
same_bits(stage_params(t), reference, "resumed from step 4")

# 3. a corrupted (then a truncated) shard of step 8: every rank falls back to step 4
for damage in ("corrupt", "truncate"):
    C = ROOT / f"c-{damage}"
    keep_only(A, C, [4, 8])
    if world.rank == 0:
        f = store.step_dir(C, 8) / "rank-00002.pt"
        raw = bytearray(f.read_bytes())
        if damage == "corrupt":
            raw[len(raw) // 2] ^= 0x10
        else:
            raw = raw[:len(raw) // 3]
        f.write_bytes(bytes(raw))
    world.barrier()
    t, ck, _, _ = run(world, "pp=4", C)
    assert ck.resumed.step == 4, (damage, ck.resumed.step)
    same_bits(stage_params(t), reference, f"after a {damage}ed shard")

# 4. resharding: the pp=4 checkpoint of step 8 on pp=2 x dp=2 (all ranks) and on pp=2 (ranks 0-1)
D = ROOT / "d"
keep_only(A, D, [8])
_, full_state = newest_full_state(D)
full = build_full(example.layers(args), args.seed)
full.load_state_dict(full_state)
x = torch.randn(16, 12, generator=torch.Generator().manual_seed(3))
with torch.no_grad():
    want = full(x)


def check_function(trainer, what):
    """The resumed pipeline computes what the merged single-process model computes."""
    got = []
    trainer.pipe.forward_only(x, x, lambda mb, out: got.append(out))
    if trainer.topo.is_last_stage:
        torch.testing.assert_close(got[0], want, msg=lambda m: f"rank {world.rank} {what}: {m}")


for grid_text, w in (("pp=2,dp=2", world), ("pp=2", world.split(int(world.rank >= 2), world.rank, "half"))):
    if w.size == 2 and world.rank >= 2:
        continue
    E = ROOT / f"e-{grid_text.replace(',', '-').replace('=', '')}"
    if w.rank == 0:
        shutil.copytree(D, E)
    w.barrier()
    t, ck, _, _ = run(w, grid_text, E, train_it=False)
    assert ck.resumed.step == 8 and ck.resumed.grid == {"pp": 4, "dp": 1, "tp": 1}
    check_function(t, f"{grid_text} from pp=4")
    t.fit(*example.data(args))   # and training goes on to the uninterrupted run's parameters
    man, merged = newest_full_state(E)
    assert man.step == 12 and man.grid["pp"] == 2
    _, ref_merged = newest_full_state(A)
    for k in ref_merged:
        torch.testing.assert_close(merged[k], ref_merged[k], msg=lambda m: f"{grid_text}: {k}: {m}")
world.barrier()

# 5. async writes: same final parameters, complete manifests
F = ROOT / "f"
t, ck, _, _ = run(world, "pp=4", F, "--async-checkpoint")
same_bits(stage_params(t), reference, "async checkpoints")
_, merged = newest_full_state(F)
_, ref_merged = newest_full_state(A)
same_bits(merged, ref_merged, "async final checkpoint")
world.barrier()
if world.rank == 0:
    print("checkpoint checks: all passed", flush=True)
