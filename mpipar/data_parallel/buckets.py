"""Gradient buckets: parameters grouped into flat buffers of about `bucket_mb`, each all-reduced
as soon as all its gradients exist, while backward is still computing the earlier layers.

Backward produces gradients roughly from the last layer to the first, so buckets are filled in
reverse parameter order (as torch DDP does). A parameter's post-accumulate-grad hook copies its
gradient into its bucket once the step's last backward pass (micro-batch) has reached it; the
bucket's all-reduce starts when its last parameter arrives and is then moved on by a background
thread that only tests its messages (ProgressThread below; without it, by every later hook), so it
advances while backward computes the earlier layers. `finish()` starts what backward never
completed, waits for all, and points each `.grad` at its slice of the reduced buffer.

Each bucket ends with one flag per parameter (1 when this rank has a gradient for it), reduced
with the gradients: a parameter no rank used keeps `.grad = None`, as in single-process
training, while one used on some ranks only gets their (zero-padded) contribution everywhere.

op 'mean' is the one gradient convention of DataParallel and ShardedOptimizer in a user's loop:
each replica's loss is a mean over its own samples, and its gradient is weighted by its share of
the global batch (samples.py counts the samples), so the result is the global batch's mean
gradient even when shards differ in size (2/2/1/1). A Pipeline weights its losses by that share
itself and sums (op 'sum')."""
from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..errors import ConfigError, MpiparError
from .plan import Handle, Plan
from .reduce import AUTO_SEQ, make_plan
from .samples import checked_passes, pass_row

DEFAULT_BUCKET_MB = 4.0   # tuned with python -m mpipar.bench allreduce --overlap


# -------------------------------------------------------------------------------------------------
# Agreement checks across data-parallel replicas: the gradient layout at construction (a model
# built differently on one rank must fail with one clear line, not hang or silently mix
# gradients), and bit-identical parameters every N steps in debug mode.
# -------------------------------------------------------------------------------------------------
HASH_BITS = 48  # fits a float64 exactly, so fingerprints travel through allgather_floats


class ReplicaMismatchError(MpiparError):
    """Data-parallel replicas disagree (gradient layout, or parameters that should be identical)."""


def digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> (64 - HASH_BITS)


def layout_fingerprint(shapes: Sequence[tuple], dtypes: Sequence[torch.dtype],
                       plan: Sequence[Sequence[int]]) -> list[float]:
    """(parameters, elements, buckets, hash of shapes+dtypes, hash of the bucket plan)."""
    numel = sum(int(torch.Size(s).numel()) for s in shapes)
    described = ";".join(f"{list(s)}:{d}" for s, d in zip(shapes, dtypes))
    return [len(shapes), numel, len(plan), digest(described), digest(repr([list(b) for b in plan]))]


def check_layout(world, shapes, dtypes, plan) -> None:
    """Raise ReplicaMismatchError on every rank unless all ranks of `world` have the same layout."""
    mine = layout_fingerprint(shapes, dtypes, plan)
    rows = world.allgather_floats(mine)
    ref = rows[0]
    bad = [r for r in range(world.size) if not (rows[r] == ref).all()]
    if not bad:
        return

    def what(row):
        return f"{int(row[0])} parameters / {int(row[1]):,} elements in {int(row[2])} bucket(s)"
    why = ("parameter shapes or dtypes differ" if any(rows[r][3] != ref[3] for r in bad)
           else "bucket plans differ (is --bucket-mb the same everywhere?)")
    others = ", ".join(f"rank {world.world_rank_of(r)} has {what(rows[r])}" for r in bad)
    raise ReplicaMismatchError(
        f"data-parallel replicas on {world.name} disagree on the gradient layout: rank "
        f"{world.world_rank_of(0)} has {what(ref)}, {others} ({why}); build the same model "
        f"on every data-parallel rank")


def checksum(tensors: Sequence[torch.Tensor]) -> int:
    """A 48-bit hash of the exact bits of `tensors` (position-weighted, so swaps show)."""
    total = 0
    for t in tensors:
        b = t.detach().reshape(-1).contiguous().view(torch.uint8)
        if b.numel() % 4 == 0:
            b = b.view(torch.int32)
        v = b.to(torch.int64)
        w = torch.arange(1, v.numel() + 1, dtype=torch.int64, device=v.device) % 65_521 + 1
        total = (total * 1_000_003 + int((v * w).sum())) % (1 << HASH_BITS)
    return total


def check_identical(world, tensors: Sequence[torch.Tensor], what: str) -> None:
    """Raise ReplicaMismatchError unless `tensors` have the same bits on every rank of `world`."""
    sums = world.allgather_floats([checksum(tensors)])[:, 0]
    bad = [world.world_rank_of(r) for r in range(world.size) if sums[r] != sums[0]]
    if bad:
        raise ReplicaMismatchError(
            f"data-parallel replicas diverged: {what} on rank(s) {', '.join(map(str, bad))} differ "
            f"from rank {world.world_rank_of(0)} (checksums {int(sums[0])} vs "
            f"{', '.join(str(int(sums[r])) for r in range(world.size) if sums[r] != sums[0])}): every replica must "
            f"step alike -- a learning rate or scheduler of its own (e.g. ReduceLROnPlateau fed the replica's own "
            f"loss: feed it the global loss), an update or a parameter change made on some ranks only")


# -------------------------------------------------------------------------------------------------
# Background progress for bucket all-reduces started during backward.
#
# Between autograd hooks nothing in the main thread touches MPI, so a ring started for the last
# layers' bucket would otherwise sit still while the earlier layers' backward runs (MPI moves a
# large message only while a process is inside an MPI call). This thread keeps polling the
# in-flight handles: it only tests (never blocks, so BOARD's one waiting path stays the main
# thread's), and numpy adds and MPI calls release the GIL, so it runs beside the backward kernels.
# Needs MPI_THREAD_MULTIPLE (what mpi4py asks for); the main thread takes the handles back
# (`drain`) before waiting on them.
# -------------------------------------------------------------------------------------------------
class ProgressThread(threading.Thread):
    """Polls every `poll_seconds` while messages move; while none does, the pause doubles up to
    `max_poll_seconds`: a backward of many milliseconds with nothing arriving then costs a few
    hundred polls instead of tens of thousands, each of which takes the core (and the GIL) from
    the backward kernels (2 emulated hosts x 2 ranks on 2 cores, dp-cifar's CNN: a fixed 50 us
    poll left 25 ms of the all-reduce unhidden per step with 0.5 MiB buckets; backing off to 2 ms,
    14-26 ms over five runs, median 20)."""

    def __init__(self, poll_seconds: float = 50e-6, max_poll_seconds: float = 2e-3):
        super().__init__(name="mpipar-dp-progress", daemon=True)
        self.poll, self.max_poll = poll_seconds, max_poll_seconds
        self.lock = threading.Lock()          # held while a handle's generator runs
        self.wake = threading.Condition(self.lock)
        self.handles: list = []
        self.stopping = self.fresh = False

    def add(self, handle) -> None:
        with self.wake:
            self.handles.append(handle)
            self.fresh = True
            self.wake.notify()

    def drain(self) -> None:
        """Stop touching the handles (the caller waits on them now)."""
        with self.lock:
            self.handles = []

    def stop(self) -> None:
        with self.wake:
            self.stopping, self.handles = True, []
            self.wake.notify()

    def run(self) -> None:
        pause = self.poll
        with self.wake:
            while True:
                while not self.handles and not self.stopping:
                    self.wake.wait()
                    pause = self.poll
                if self.stopping:
                    return
                moved = False
                for h in self.handles:
                    before = h.pending
                    h.progress()
                    moved |= h.pending is not before
                self.handles = [h for h in self.handles if not h.done]
                if moved:
                    pause = self.poll
                elif self.handles:
                    self.fresh = False
                    self.wake.wait(pause)         # add() wakes it: a new handle is polled at once
                    pause = self.poll if self.fresh else min(2 * pause, self.max_poll)


# -------------------------------------------------------------------------------------------------
# Gradient buckets: parameters grouped into flat buffers of about `bucket_mb`, each all-reduced
# as soon as all its gradients exist, while backward is still computing the earlier layers.
#
# Backward produces gradients roughly from the last layer to the first, so buckets are filled in
# reverse parameter order (as torch DDP does). A parameter's post-accumulate-grad hook copies its
# gradient into its bucket once the step's last backward pass (micro-batch) has reached it; the
# bucket's all-reduce starts when its last parameter arrives and is then moved on by a background
# thread that only tests its messages (ProgressThread below; without it, by every later hook), so it
# advances while backward computes the earlier layers. `finish()` starts what backward never
# completed, waits for all, and points each `.grad` at its slice of the reduced buffer.
#
# Each bucket ends with one flag per parameter (1 when this rank has a gradient for it), reduced
# with the gradients: a parameter no rank used keeps `.grad = None`, as in single-process
# training, while one used on some ranks only gets their (zero-padded) contribution everywhere.
# -------------------------------------------------------------------------------------------------
def plan_buckets(sizes: Sequence[tuple[int, torch.dtype]], bucket_bytes: int) -> list[list[int]]:
    """Group parameter indices (given (numel, dtype) in model order) into buckets: reverse order,
    one dtype per bucket, a new bucket once adding a parameter would pass `bucket_bytes` (a
    parameter larger than that gets a bucket of its own)."""
    buckets: list[list[int]] = []
    open_: dict[torch.dtype, tuple[list[int], int]] = {}
    for i in reversed(range(len(sizes))):
        numel, dtype = sizes[i]
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        members, used = open_.get(dtype, (None, 0))
        if members is None or (used + nbytes > bucket_bytes and members):
            members, used = [], 0
            buckets.append(members)
        members.append(i)
        open_[dtype] = (members, used + nbytes)
    return [b for b in buckets if b]


def storage(t: torch.Tensor) -> int:
    """Which storage a tensor views: its views share its version counter."""
    return t.untyped_storage().data_ptr()


@dataclass
class Bucket:
    index: int
    members: list[int]                 # parameter indices, in the order they sit in `flat`
    offsets: list[int]
    flat: torch.Tensor                 # gradients, then one "has a gradient" flag per member
    grads: torch.Tensor                # flat's gradient part
    flags: torch.Tensor
    plan: Plan | None = None           # the bucket's all-reduce, prepared once
    waiting: set = field(default_factory=set)
    handle: Handle | None = None


class GradientsChangedError(ConfigError):
    """A gradient was changed between backward and its sync: the change would be lost or reduced
    as if it were the gradient (clipping a replica's local gradient is not clipping the global one)."""


class GradientWrites:
    """The .grad backward wrote last for each parameter (noted by a post-accumulate-grad hook) and
    the version of its storage then: an in-place change since (clip_grad_norm_'s mul_) or another
    tensor in its place shows in `check`. Views of one storage share its version counter (our
    flat buffers' views), hence one version per storage, the latest."""

    def __init__(self):
        self.grads: dict[int, torch.Tensor] = {}
        self.versions: dict[int, int] = {}

    def note(self, i: int, g: torch.Tensor) -> None:
        self.grads[i] = g
        self.versions[storage(g)] = g._version

    def ours(self, t: torch.Tensor) -> None:
        """We changed `t` in place: gradients that are views of it expect its new version."""
        if storage(t) in self.versions:
            self.versions[storage(t)] = t._version

    def check(self, params, name_of, fix: str) -> None:
        """Raise GradientsChangedError if any gradient changed since backward wrote it; then forget them."""
        for i, g in self.grads.items():
            if params[i].grad is not g or g.numel() and g._version != self.versions[storage(g)]:
                raise GradientsChangedError(
                    f"gradients were changed in place after backward and before they were synchronised over "
                    f"the data-parallel replicas (e.g. clip_grad_norm_; first: {name_of(i)}), so the change would "
                    f"be lost or clip each replica's local gradient: {fix}")
        self.clear()

    def clear(self) -> None:
        self.grads, self.versions = {}, {}


class GradBuckets:
    """All-reduces the gradients of `params` over `world` in buckets: op 'sum', 'avg', or 'mean'
    (weighted by `samples()`, this replica's sample count per backward pass: see samples.py).

    Each gradient's version (bumped by any in-place change) is noted when backward has written
    it; finish() refuses gradients changed since (e.g. clip_grad_norm_ before the sync)."""

    def __init__(self, world, params: Sequence[torch.nn.Parameter], bucket_mb: float = DEFAULT_BUCKET_MB,
                 op: str = "avg", overlap: bool = True, names: Sequence[str] | None = None,
                 background: bool = True, algorithm: str = "auto", wire: torch.dtype | None = None,
                 samples=None):
        if op == "mean" and samples is None:
            raise ValueError("op 'mean' weights each replica by its samples: pass samples=")
        self.world, self.op, self.overlap = world, op, overlap
        self.samples = samples if op == "mean" and world.size > 1 else None   # one replica: weight 1
        self.counts: list[int] | None = None   # this replica's samples per backward pass, read once a step
        self.unreduced = False              # a gradient arrived since the last finish()
        self.params = [p for p in params if p.requires_grad]
        self.names = list(names) if names is not None else [f"param{i}" for i in range(len(self.params))]
        plan = plan_buckets([(p.numel(), p.dtype) for p in self.params], int(bucket_mb * 2 ** 20))
        check_layout(world, [tuple(p.shape) for p in self.params], [p.dtype for p in self.params], plan)
        self.buckets: list[Bucket] = []
        self.slot: dict[int, tuple[Bucket, int, int]] = {}   # parameter -> (bucket, offset, member)
        for b, members in enumerate(plan):
            offsets, total = [], 0
            for i in members:
                offsets.append(total)
                total += self.params[i].numel()
            first = self.params[members[0]]
            # on the host whatever the parameters' device: our all-reduce reduces in host memory (a
            # device gradient is copied in by _stage and its reduced slice copied back by finish)
            flat = torch.zeros(total + len(members), dtype=first.dtype,
                               pin_memory=not first.is_cpu and torch.cuda.is_available())
            bucket = Bucket(b, members, offsets, flat, flat[:total], flat[total:],
                            make_plan(world, flat, "sum" if op == "mean" else op, algorithm, wire=wire))
            self.buckets.append(bucket)
            for k, (i, off) in enumerate(zip(members, offsets)):
                self.slot[i] = (bucket, off, k)
        self.passes = 1
        self.seen = [0] * len(self.params)
        self.active = False
        self.writes = GradientWrites()
        self.hooks = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(self.params)]
        self.thread = ProgressThread() if overlap and background and world.size > 1 and self.buckets else None
        if self.thread:
            self.thread.start()

    @property
    def numel(self) -> int:
        return sum(b.flat.numel() - len(b.members) for b in self.buckets)

    # -- one step ------------------------------------------------------------------------
    def begin_step(self, backward_passes: int = 1) -> None:
        """Arm the hooks for a step in which each parameter sees `backward_passes` backwards."""
        self.passes, self.active = max(1, backward_passes), True
        self.seen = [0] * len(self.params)
        for b in self.buckets:
            b.waiting, b.handle = set(b.members), None

    def _hook(self, i: int):
        def on_grad(p: torch.Tensor) -> None:
            self.unreduced = True
            self.writes.note(i, p.grad)
            if not self.active:
                return
            self.seen[i] += 1
            bucket = self.slot[i][0]
            if bucket.handle is not None:
                raise RuntimeError(
                    f"parameter {self.names[i]} got a gradient after its bucket {bucket.index} was "
                    f"all-reduced (backward ran more than {self.passes} time(s) this step); pass the "
                    f"right number of backward passes to begin_step")
            # a gradient that is a view of its bucket (zero_grad(set_to_none=False) kept the last
            # step's) waits for finish(), so that a change made after backward is still seen there
            if self.seen[i] == self.passes and self.overlap and storage(p.grad) != storage(bucket.flat):
                self._stage(bucket, i)
                if not bucket.waiting:
                    self._launch(bucket)
            if self.thread is None:
                self.progress()
        return on_grad

    def _stage(self, bucket: Bucket, i: int) -> None:
        """Copy parameter i's gradient into its bucket (zero if it has none) and flag it."""
        p, off, k = self.params[i], self.slot[i][1], self.slot[i][2]
        dst = bucket.flat[off:off + p.numel()]
        if p.grad is None:
            dst.zero_()
        elif p.grad.data_ptr() != dst.data_ptr():
            dst.copy_(p.grad.reshape(-1))
        bucket.flags[k] = 0 if p.grad is None else 1
        bucket.waiting.discard(i)
        self.writes.ours(bucket.flat)           # other gradients may be views of it

    def _launch(self, bucket: Bucket, background: bool = True) -> None:
        if self.samples is not None:              # op 'mean': n_r x this replica's mean gradient
            if self.counts is None:               # read once a step: every bucket the same weight
                self.counts = list(self.samples())
            bucket.grads.mul_(sum(self.counts))
        bucket.handle = bucket.plan.start(AUTO_SEQ + bucket.index)
        if self.thread and background and not bucket.handle.done:
            self.thread.add(bucket.handle)

    def progress(self) -> None:
        """Let in-flight all-reduces move on as far as messages have arrived (never blocks)."""
        for b in self.buckets:
            if b.handle is not None and not b.handle.done:
                b.handle.progress()

    def finish(self, extra: Sequence[float] = ()):
        """Start any bucket backward left incomplete, wait for all, point grads at the results.
        `extra`: numbers every replica's row of the sample counts' exchange carries too; their
        rows come back (None where no exchange was needed: op 'sum', one replica)."""
        self.writes.check(self.params, self.names.__getitem__, "call dp.finish() first, then clip")
        if self.thread:
            self.thread.drain()
        for b in self.buckets:
            if b.handle is None:
                for i in list(b.waiting):
                    self._stage(b, i)
                self._launch(b, background=False)
        for b in self.buckets:
            b.handle.wait()
        extra_rows = None
        if self.samples is not None and self.buckets:   # the sum of n_r x gradient, over N
            row = pass_row(self.counts)
            rows = self.world.allgather_floats(row + list(extra))
            total = checked_passes(rows[:, :len(row)], self.world, "DataParallel")
            extra_rows = rows[:, len(row):]
            for b in self.buckets:
                b.grads.div_(total)
        self.counts, self.unreduced = None, False
        for b in self.buckets:
            used = (b.flags != 0).tolist()
            for i, off, u in zip(b.members, b.offsets, used):
                p = self.params[i]
                g = b.flat[off:off + p.numel()].view_as(p)
                g = g if p.is_cpu else g.to(p.device, non_blocking=True)
                kind = type(p.grad)    # a layer's own gradient type stays (tensor parallel's ShardedGrad)
                p.grad = (g if kind in (torch.Tensor, type(None)) else g.as_subclass(kind)) if u else None
        self.active = False
        return extra_rows

    def remove(self) -> None:
        """Unhook from the parameters and release the buckets' scratch buffers."""
        for h in self.hooks:
            h.remove()
        if self.thread:
            self.thread.stop()
        for b in self.buckets:
            b.plan.close()
