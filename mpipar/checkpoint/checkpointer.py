"""The trainer's checkpoint callback: resumes before the first step, saves every N steps (sync, or
copy-then-write in a background thread), commits a checkpoint with a manifest once every rank's
shard is on disk, keeps the last K, and fires injected faults.

Commit protocol: each rank writes its shard atomically, then all ranks exchange (bytes, sha256)
in one allgather and rank 0 writes manifest.json atomically, last. A rank that dies before the
allgather leaves no manifest, so the folder never counts as a checkpoint."""
from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import numpy as np

from ..callbacks import Callback
from . import restart, store
from .state import apply as apply_state, serialize, snapshot
from .store import Manifest, ShardInfo, atomic_write, atomic_write_text, sha256_hex


# -------------------------------------------------------------------------------------------------
# When to checkpoint: every N steps (--checkpoint-every N), or by default an interval measured
# from the run itself: after each checkpoint, N = (time a save holds training up) / (BUDGET x mean
# step time), both averaged over the run so far on the slowest rank, so saving costs about BUDGET
# of the training time whatever the model and the disk.
# -------------------------------------------------------------------------------------------------
BUDGET = 0.02     # share of the step time that checkpointing may take (auto)
FIRST = 20        # auto: steps before the first checkpoint (then measured)
MOST = 2000       # auto: never more steps than this between checkpoints


class Interval:
    def __init__(self, every: int | None):
        self.auto = not every
        self.every = FIRST if self.auto else int(every)
        self.last = 0   # step of the last checkpoint (auto counts from it)

    def due(self, step: int) -> bool:
        return step - self.last >= self.every if self.auto else step % self.every == 0

    def saved(self, step: int) -> None:
        self.last = step

    def adapt(self, save_seconds: float, step_seconds: float) -> bool:
        """Auto: the next interval from the measured costs (the same numbers on every rank, as
        they come from one allgather). True when it changed."""
        if not self.auto or step_seconds <= 0:
            return False
        new = min(MOST, max(FIRST, math.ceil(save_seconds / (BUDGET * step_seconds))))
        changed, self.every = new != self.every, new
        return changed

    def describe(self) -> str:
        return f"every {self.every} steps" + (f" (auto: ~{BUDGET:.0%} of step time)" if self.auto else "")


# -------------------------------------------------------------------------------------------------
# Writes this rank's shard: in the caller (sync) or in a background thread after the state
# was copied (async), so training does not wait on the disk.
# -------------------------------------------------------------------------------------------------
class ShardWriter:
    def __init__(self):
        self.thread: threading.Thread | None = None
        self.result: tuple[str, int] | None = None
        self.error: BaseException | None = None

    def _write(self, path: Path, obj, on_half_written) -> None:
        try:
            data = serialize(obj)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise store.write_failed(e, "the folder of this rank's checkpoint shard", path.parent, len(data)) from e
            atomic_write(path, data, on_half_written, what="this rank's checkpoint shard")
            self.result = (sha256_hex(data), len(data))
        except BaseException as e:   # re-raised in the training thread by wait()
            self.error = e

    def start(self, path: Path, obj, background: bool, on_half_written=None) -> None:
        """Write `obj` (already a private copy when `background`) to `path` atomically."""
        self.wait()
        self.result, self.error = None, None
        if background:
            self.thread = threading.Thread(target=self._write, args=(Path(path), obj, on_half_written),
                                           name="mpipar-checkpoint-writer", daemon=True)
            self.thread.start()
        else:
            self._write(Path(path), obj, on_half_written)

    @property
    def busy(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def wait(self) -> tuple[str, int] | None:
        """(sha256 hex, bytes) of the last shard written; raises what the writer raised."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            err, self.error = self.error, None
            raise err
        return self.result


# -------------------------------------------------------------------------------------------------
# The trainer's checkpoint callback: resumes before the first step, saves every N steps (sync, or
# copy-then-write in a background thread), commits a checkpoint with a manifest once every rank's
# shard is on disk, keeps the last K, and fires injected faults.
#
# Commit protocol: each rank writes its shard atomically, then all ranks exchange (bytes, sha256)
# in one allgather and rank 0 writes manifest.json atomically, last. A rank that dies before the
# allgather leaves no manifest, so the folder never counts as a checkpoint.
# -------------------------------------------------------------------------------------------------
MIN_COMMIT_LAG = 2   # async: commit max(this, every/2) steps after the snapshot (the write overlaps them)


def sha_words(hexdigest: str) -> list[int]:
    """sha256 as 8 uint32 numbers (exact in float64, so it travels in allgather_floats)."""
    return [int(hexdigest[i:i + 8], 16) for i in range(0, 64, 8)]


def words_hex(words) -> str:
    return "".join(f"{int(w):08x}" for w in words)


class Checkpointer(Callback):
    def __init__(self, root, topo, rankmap, every: int | None, keep: int, background: bool, faults, log, run: dict,
                 epochs: int | None = 1, restart_from_scratch: bool = False):
        self.root = Path(root) if root else None
        self.topo, self.rankmap, self.interval, self.keep = topo, rankmap, Interval(every), keep
        self.background, self.faults, self.log, self.run = background, faults, log, run
        self.world, self.epochs = topo.world, epochs
        self.restart_from_scratch = restart_from_scratch   # checkpoints there but none usable: step 0, not an error
        self.writer = ShardWriter()
        self.pending: dict | None = None
        self.start_epoch = self.start_step = 0
        self.rows: list[dict] = []
        self.tally: list[float] | None = None
        self.resumed: Manifest | None = None
        self.blocking = self.step_time = 0.0
        self.saves = self.shard_bytes = self.steps = 0

    # -- restart ---------------------------------------------------------------------------
    def resume(self, trainer) -> Manifest | None:
        if self.root is None:
            return None
        t = self.topo
        layers = restart.rank_layers(self.rankmap.stages, t.pp_rank, t.grid.pp)
        keys = list(trainer.module.state_dict())
        man, state = restart.find_and_load(self.world, self.root, t.grid, (t.pp_rank, t.dp_rank, t.tp_rank),
                                           layers, keys, self.log, self.restart_from_scratch)
        if man is None:
            self.log(f"checkpoint: none usable in {self.root}; starting from step 0")
            return None
        apply_state(trainer, state)
        trainer.step_count = man.step
        self.interval.saved(man.step)
        self.start_epoch, self.start_step, self.rows = man.epoch, man.step_in_epoch, list(man.rows)
        self.tally = self._my_tally(man)
        self.resumed = man
        g = man.grid
        moved = "" if restart.same_grid(man, t.grid) else \
            f", resharded to pp={t.grid.pp} dp={t.grid.dp} tp={t.grid.tp}"
        # epochs=None: a user's loop (mpipar.Checkpoint), which counts steps only
        where = f": epoch {man.epoch + 1}, {man.step_in_epoch} batches into it" if self.epochs else ""
        self.log(f"checkpoint: resumed from {store.step_dir(self.root, man.step).name} (step {man.step}{where}) "
                 f"written with pp={g['pp']} dp={g['dp']} "
                 f"tp={g['tp']}{moved}")
        if self.epochs and man.epoch >= self.epochs:
            self.log(f"checkpoint: training was already complete ({man.epoch} epochs); nothing to do "
                     f"(another --checkpoint-dir, or more --epochs, trains again)")
        for k in ("seed", "batch_size", "microbatches"):
            if k in man.run and man.run[k] != self.run.get(k):
                self.log(f"checkpoint: warning: written with {k}={man.run[k]}, now {self.run.get(k)}: "
                         f"the resumed run will not match an uninterrupted one")
        return man

    def _my_tally(self, man: Manifest) -> list[float] | None:
        """Same grid: this rank's sums. Otherwise, for the new reporter, the sums of every old
        replica of the last stage (each tallied its own shard of the batches; the epoch's row
        adds the new replicas' to it)."""
        if not man.tallies:
            return None
        if restart.same_grid(man, self.topo.grid):
            return man.tallies[self.world.rank]
        if self.world.rank != self.topo.reporter:
            return None
        last = man.grid["pp"] - 1
        old = [t for s, t in zip(man.shards, man.tallies) if s.coords[0] == last and s.coords[2] == 0]
        return [sum(column) for column in zip(*old)]

    # -- callbacks (the trainer calls them) -------------------------------------------------
    def on_fit_start(self, trainer, metrics) -> list[dict]:
        if metrics is not None:
            for row in self.rows:
                metrics.write(row)
        return list(self.rows)

    def first_epoch(self, trainer) -> int:
        return self.start_epoch

    def skip_batch(self, trainer, epoch: int, index: int) -> bool:
        """True for the batches of the resumed epoch that the checkpoint already covers."""
        return epoch == self.start_epoch and index < self.start_step

    def on_epoch_start(self, trainer, epoch: int, tally) -> None:
        if epoch == self.start_epoch and self.tally:
            tally.load(self.tally)

    def after_step(self, trainer, epoch: int, step_in_epoch: int, n_batches: int, tally, rows) -> None:
        t0 = time.perf_counter()
        self.step_time += trainer.step_seconds[-1] if trainer.step_seconds else 0.0
        self.steps += 1
        step = trainer.step_count
        if self.faults:
            self.faults.check(step)
        if self.pending and step >= self.pending["step"] + max(MIN_COMMIT_LAG, self.interval.every // 2):
            self.commit()
        # the epoch's last step is saved by after_epoch, with the epoch's metrics row; a streaming
        # schedule (pipedream) keeps weights in flight between batches: only epoch ends are clean
        mid_ok = not getattr(getattr(trainer, "pipe", None), "streaming", False)
        if self.root and self.interval.due(step) and step_in_epoch < n_batches and mid_ok:
            self.save(trainer, epoch, step_in_epoch, tally.vector(), rows)
        self.blocking += time.perf_counter() - t0

    def after_epoch(self, trainer, epoch: int, rows) -> None:
        t0 = time.perf_counter()
        final = epoch == self.epochs - 1
        if self.root and (final or self.interval.due(trainer.step_count)):
            self.save(trainer, epoch + 1, 0, [0.0, 0.0, 0.0], rows)
            if final:
                self.commit()   # async: the last checkpoint does not wait for another step
        self.blocking += time.perf_counter() - t0

    def on_preempt(self, trainer, epoch: int, step_in_epoch: int, n_batches: int, tally, rows) -> str | None:
        """A checkpoint of this step, now (unless this step's is written already), committed."""
        streaming = getattr(getattr(trainer, "pipe", None), "streaming", False)
        if self.root is None or (streaming and step_in_epoch < n_batches):   # weights in flight mid-epoch
            return None
        if self.interval.last != trainer.step_count:
            self.save(trainer, epoch, step_in_epoch, tally.vector(), rows)
        self.commit()
        return str(store.step_dir(self.root, trainer.step_count))

    def on_fit_end(self, trainer) -> dict:
        """Commit what is in flight; report the blocking time (collective)."""
        t0 = time.perf_counter()
        if self.pending:
            self.commit()
        self.blocking += time.perf_counter() - t0
        worst = self.world.allgather_floats([self.blocking, self.step_time, self.saves, self.shard_bytes])
        i = int(np.argmax(worst[:, 0] / np.maximum(worst[:, 1], 1e-12)))
        pct = 100 * worst[i, 0] / max(worst[i, 1], 1e-12)
        self.report = {"saves": int(worst[:, 2].max()), "blocking_s": float(worst[i, 0]),
                       "step_s": float(worst[i, 1]), "overhead_pct": float(pct),
                       "shard_bytes": int(worst[:, 3].max())}
        if self.root and self.report["saves"]:
            self.log(f"checkpoint: {self.report['saves']} saves ({'async' if self.background else 'sync'}, "
                     f"{self.interval.describe()}, largest shard {self.report['shard_bytes'] / 1e6:.2f} MB): blocking "
                     f"{1e3 * worst[i, 0]:.1f} ms = {pct:.2f}% of {worst[i, 1]:.2f} s in training steps "
                     f"(worst rank {i})")
        return self.report

    # -- saving ----------------------------------------------------------------------------
    def save(self, trainer, epoch: int, step_in_epoch: int, tally: list[float], rows) -> None:
        if self.pending:   # one checkpoint in flight at a time
            self.commit()
        t0, step = time.perf_counter(), trainer.step_count
        self.interval.saved(step)
        due = self.faults.due(step, "write") if self.faults else None
        on_half = (lambda: self.faults.die(*due, step)) if due else None
        self.zero = hasattr(trainer.optimizer, "shard_state")   # every replica writes its part
        path = store.step_dir(self.root, step) / store.shard_name(self.world.rank)
        self.writer.start(path, snapshot(trainer, self.topo, copy=self.background), self.background, on_half)
        self.pending = {"step": step, "epoch": epoch, "step_in_epoch": step_in_epoch,
                        "tally": list(tally), "rows": list(rows), "cost": time.perf_counter() - t0}
        if not self.background:
            self.commit()

    def commit(self) -> None:
        """Every rank's shard is on disk -> rank 0 writes the manifest (last), LATEST, prunes."""
        p, self.pending = self.pending, None
        if p is None:
            return
        t0 = time.perf_counter()
        sha, size = self.writer.wait()
        # what a checkpoint holds training up, on average so far (this one's commit still to come)
        per_save = (self.blocking + p["cost"] + time.perf_counter() - t0) / (self.saves + 1)
        k = len(p["tally"])        # columns: size, the tally's k sums, 8 sha words, per save, per step
        table = self.world.allgather_floats([size, *p["tally"], *sha_words(sha), per_save,
                                             self.step_time / max(self.steps, 1)])
        self.saves += 1
        self.shard_bytes = max(self.shard_bytes, size)
        per_save, per_step = table[:, 9 + k], table[:, 10 + k]
        if self.interval.adapt(float(per_save.max()), float(per_step.max())) and self.saves == 1:
            self.log(f"checkpoint: a save holds training up {1e3 * per_save.max():.1f} ms, a step takes "
                     f"{1e3 * per_step.max():.1f} ms: {self.interval.describe()}")
        if self.world.rank != 0:
            return
        grid, stages = self.topo.grid, self.rankmap.stages
        shards = []
        for r in range(self.world.size):
            pp, dp, tp = grid.coords(r)
            shards.append(ShardInfo(store.shard_name(r), r, [pp, dp, tp], restart.rank_layers(stages, pp, grid.pp) if dp == 0 else [],
                                    int(table[r, 0]), words_hex(table[r, 1 + k:9 + k]), zero=self.zero))
        man = Manifest(p["step"], p["epoch"], p["step_in_epoch"], {"pp": grid.pp, "dp": grid.dp, "tp": grid.tp},
                       [list(s) for s in stages], shards, table[:, 1:1 + k].tolist(), p["rows"], self.run)
        folder = store.step_dir(self.root, p["step"])
        atomic_write_text(folder / "manifest.json", man.to_json(), what="the checkpoint's manifest")
        store.write_latest(self.root, p["step"])
        store.prune(self.root, self.keep)
