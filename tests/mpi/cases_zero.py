"""ZeRO stages 1, 2 and 3 (data_parallel/zero.py, zero3.py) used directly, in a user's loop, against
single-process training and against our DataParallel: an MLP trained 50 Adam (and AdamW, SGD with
momentum) steps on 2, 3 and 4 replicas, each replica's loss a plain mean over its own shard (the
one gradient convention: the optimizer weighs the replicas), with and without global-norm
clipping, every parameter assert_close (stage 2 with buckets small enough that several are reduced
during backward; stage 3 gathering each Linear on its own, with two micro-batches per step, whose
second forward finds the units freed again); shards of different sizes; with a layer backward
never reaches and a branch some replicas or steps skip (stage 2's buckets, stage 3's units left
incomplete by backward, reduced at the step); each replica holds 1/N of Adam's state; a
non-elementwise optimizer is refused; stage 3's gathered() names itself as a collective, and a
state_dict taken inside it saves and loads; gradient accumulation exact when each pass splits
over the replicas like the batch, refused when not (or when its passes were declared in rounds);
a head used every other step skipped as torch skips a parameter without a gradient (weights and
state_dict); torch's LR schedulers on a ShardedOptimizer. Adam's parity runs are float64 (`parity_dtype`).
(The Pipeline's ZeRO, which sums its own weighted losses: cases_parity.py, cases_api.py.)"""
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from mpipar.data_parallel import DataParallel
from mpipar.data_parallel.zero import ShardedOptimizer
from mpipar.errors import ConfigError

NP = (2, 3, 4)
TIMEOUT = 180

torch.set_num_threads(1)
B, STEPS = 24, 50          # 24: every replica an equal shard on 2, 3 and 4 ranks


@contextmanager
def parity_dtype(opt_cls):
    """float64 for Adam and AdamW: they divide by the root of the squared gradient, which
    amplifies the rounding of a sum over replicas (vs one batch's) across 50 steps towards the
    tolerance, and what is compared is the sharding, not that rounding. SGD (linear in the
    gradient) stays float32, so the float32 path is compared too."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32 if opt_cls is torch.optim.SGD else torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 48), nn.Tanh(), nn.Linear(48, 24), nn.Tanh(), nn.Linear(24, 3))


def batches():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(12, 3, generator=g)
    for _ in range(STEPS):
        x = torch.randn(B, 12, generator=g)
        yield x, x @ w + 0.1 * torch.randn(B, 3, generator=g)


def shard(world, x, y):
    per = B // world.size
    return x[world.rank * per:(world.rank + 1) * per], y[world.rank * per:(world.rank + 1) * per]


def loss_of(model, x, y):
    """The mean over these samples (a replica's shard, or the whole batch for the reference)."""
    return nn.functional.mse_loss(model(x), y)


def single(opt_cls, clip, **kw):
    model = mlp()
    opt = opt_cls(model.parameters(), **kw)
    for x, y in batches():
        opt.zero_grad()
        loss_of(model, x, y).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return model


def zero(world, opt_cls, clip, stage=1, **kw):
    model = mlp()
    # stage 2: tiny buckets, so that several are reduced during backward
    opt = ShardedOptimizer(model.parameters(), world, opt_cls, stage=stage, bucket_mb=2e-3, units=list(model), **kw)
    passes = 2 if stage == 3 else 1
    for x, y in batches():
        opt.zero_grad()
        opt.begin_step(passes)
        x, y = shard(world, x, y)
        for xs, ys in zip(x.chunk(passes), y.chunk(passes)):   # micro-batches: a mean over the shard
            (loss_of(model, xs, ys) * len(ys) / len(y)).backward()
        opt.step(clip=clip)
    return model, opt


def data_parallel(world, opt_cls, clip, **kw):
    model = mlp()
    dp = DataParallel(model, world)
    opt = opt_cls(model.parameters(), **kw)
    for x, y in batches():
        opt.zero_grad()
        dp.begin_step()
        loss_of(model, *shard(world, x, y)).backward()
        dp.finish()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return model


CASES = [(torch.optim.Adam, 0.0, dict(lr=1e-2)), (torch.optim.Adam, 0.05, dict(lr=1e-2)),
         (torch.optim.AdamW, 0.0, dict(lr=1e-2, weight_decay=0.1)), (torch.optim.SGD, 0.0, dict(lr=0.03, momentum=0.9))]


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("opt_cls, clip, kw", CASES, ids=["adam", "adam-clipped", "adamw", "sgd-momentum"])
def test_stage_equals_single_process_and_data_parallel(world, opt_cls, clip, kw, stage):
    with parity_dtype(opt_cls):
        check_stage(world, opt_cls, clip, kw, stage)


def check_stage(world, opt_cls, clip, kw, stage):
    ours, opt = zero(world, opt_cls, clip, stage, **kw)
    assert opt.flat is None or opt.flat.dtype == torch.get_default_dtype()
    if stage == 2:
        assert len(opt.buckets) > 2 and all(p.grad is None for p in ours.parameters())   # nothing whole kept
    if stage == 3:   # between steps a replica keeps its segments only: the parameters read as zeros
        assert all(p.grad is None and p.untyped_storage().nbytes() <= p.element_size() for p in ours.parameters())
        assert len(opt.sharded.members) == 3 and not any(opt.sharded.is_gathered)
    ref = single(opt_cls, clip, **kw)
    dp = data_parallel(world, opt_cls, clip, **kw)
    with opt.gathered():           # stage 3: every unit whole for the comparison (collective)
        for (name, p), q, r in zip(ours.named_parameters(), ref.parameters(), dp.parameters()):
            torch.testing.assert_close(p, q, msg=lambda m: f"{name} vs single process: {m}")
            torch.testing.assert_close(p, r, msg=lambda m: f"{name} vs DataParallel: {m}")
    if clip:   # the clip acted: without it the weights differ
        free = single(opt_cls, 0.0, **kw)
        assert max(float((p - q).abs().max()) for p, q in zip(ref.parameters(), free.parameters())) > 1e-3


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_replica_holds_its_share_of_adams_state(world, stage):
    model, opt = zero(world, torch.optim.Adam, 0.0, stage, lr=1e-3)
    total = sum(p.numel() for p in model.parameters())
    mine = opt.shard.numel()
    assert opt.state_bytes() == 8 * mine                                 # exp_avg + exp_avg_sq, fp32
    assert abs(opt.state_bytes() - 8 * total / world.size) <= 0.1 * 8 * total / world.size
    held = world.allgather_floats([mine])[:, 0]
    assert held.sum() == total                                           # the segments cover the model once


def test_a_non_elementwise_optimizer_is_refused(world):
    with pytest.raises(ConfigError, match="needs an elementwise step; LBFGS"):
        ShardedOptimizer(mlp().parameters(), world, torch.optim.LBFGS)


@pytest.mark.parametrize("stage,scatter", [(2, "hier"), (2, "ring"), (3, "hier"), (3, "ring")])
def test_the_paths_a_dp_group_across_hosts_takes_equal_single_process(world, stage, scatter, monkeypatch):
    """A World told it spans hosts (one_host cached False) takes what a dp group across hosts
    runs, with no shared buffer of its own and so no prefetch: the hierarchical reduce-scatter
    and all-gather (hosts of equal rank counts; here one host of them), or on unequal hosts the
    ring (stage 2: the all-reduce plus a slice); the result still equals single-process training."""
    with parity_dtype(torch.optim.Adam):
        import mpipar.data_parallel.reduce as reduce
        across = world.split(0, world.rank, "dp-across-hosts")
        across.state["one_host"] = False
        assert reduce.scatter_algorithm(across) == "hier"
        if scatter == "ring":
            monkeypatch.setattr(reduce, "scatter_algorithm", lambda w: "ring")
        model = mlp()
        opt = ShardedOptimizer(model.parameters(), across, torch.optim.Adam, stage=stage, bucket_mb=2e-3,
                               units=list(model), lr=1e-2)
        if stage == 3:
            assert opt.sharded.buffer is None
        for x, y in batches():
            opt.zero_grad()
            opt.begin_step(1)
            loss_of(model, *shard(world, x, y)).backward()
            opt.step(clip=0.05)
        ref = single(torch.optim.Adam, 0.05, lr=1e-2)
        with opt.gathered():
            for (name, p), q in zip(model.named_parameters(), ref.parameters()):
                torch.testing.assert_close(p, q, msg=lambda m: f"{name}: {m}")


class Branchy(nn.Module):
    """An MLP with a layer backward never reaches (`unused`, registered between `mid` and `out`)
    and a branch (`side`) taken only on some replicas or some steps."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.side, self.mid = nn.Linear(12, 32), nn.Linear(32, 32), nn.Linear(32, 32)
        self.unused, self.out = nn.Linear(32, 32), nn.Linear(32, 3)
        self.double()

    def forward(self, x, side: bool):
        h = torch.tanh(self.inp(x))
        if side:
            h = h + torch.tanh(self.side(h))
        return self.out(torch.tanh(self.mid(h)))


@pytest.mark.parametrize("stage,where", [(2, "replica"), (2, "step"), (3, "step")])
def test_a_parameter_backward_never_reaches_equals_single_process(world, stage, where):
    """Stage 2 (one bucket per parameter) and stage 3 (one unit per layer) with a layer backward
    never reaches and a branch taken on even replicas only (`where="replica"`: a bucket complete
    on some replicas, incomplete on others; stage 2 only, as stage 3 gathers a unit collectively)
    or on even steps only, on every replica: `out`'s buckets are reduced during backward, the
    unused layer's stay incomplete and hold back every one after them (the rest of the model)
    until the step, which must still reduce them all and step them. The reference is one process
    (torch's Adam skips a parameter whose .grad is None: the unused layer, and `side` on odd steps;
    a replica without a gradient where another has one counts as zeros). float64: nothing but a
    wrong sum moves a parameter past the tolerance."""
    steps = 8

    def takes_side(step, r):
        return r % 2 == 0 if where == "replica" else step % 2 == 0

    def loss(model, x, y, side):   # the reference's: each replica's share of the global mean
        return nn.functional.mse_loss(model(x, side), y, reduction="sum") / (B * 3)

    data = [(x.double(), y.double()) for x, y in list(batches())[:steps]]
    model = Branchy()
    units = [model.inp, model.side, model.mid, model.unused, model.out]
    opt = ShardedOptimizer(model.parameters(), world, torch.optim.Adam, stage=stage, bucket_mb=1e-4, units=units,
                           lr=1e-2)
    if stage == 2:   # a bucket per parameter, the last first: out's two, then the unused layer's, then the rest
        assert opt.buckets == [[i] for i in reversed(range(len(opt.params)))]
    for step, (x, y) in enumerate(data):
        opt.zero_grad()
        opt.begin_step(1)
        xs, ys = shard(world, x, y)
        nn.functional.mse_loss(model(xs, takes_side(step, world.rank)), ys).backward()   # the shard's mean
        if stage == 2:
            assert opt.next_bucket == 2        # out's buckets reduced in backward, the unused one holds the rest
        opt.step()

    ref = Branchy()
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    per = B // world.size
    for step, (x, y) in enumerate(data):
        ref_opt.zero_grad()
        for r in range(world.size):
            loss(ref, x[r * per:(r + 1) * per], y[r * per:(r + 1) * per], takes_side(step, r)).backward()
        ref_opt.step()
    start = Branchy()
    with opt.gathered():
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, msg=lambda m: f"{name} vs single process: {m}")
        assert torch.equal(model.unused.weight, start.unused.weight)     # never reached: never moved
        assert not torch.equal(model.inp.weight, start.inp.weight)       # the layers held back did train


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_uneven_shards_with_plain_mean_losses_equal_single_process(world, stage, tmp_path):
    """The README's form, ShardedOptimizer(model, world, ...): global batches of 10 (shards
    5/5, 4/3/3, 3/3/2/2), each replica's loss a plain mean over its shard, SGD with momentum
    (linear in the gradient: a replica weighed wrongly shows at once; float64). The weights end
    where one process's do, read from a state_dict taken inside gathered() and saved and
    loaded after the block (stage 3 used to leave it pointing at freed storage)."""
    def data():
        g = torch.Generator().manual_seed(1)
        for _ in range(10):
            yield torch.randn(10, 12, generator=g, dtype=torch.float64), torch.randn(10, 3, generator=g, dtype=torch.float64)

    kw = dict(lr=0.03, momentum=0.9)
    ref = mlp().double()
    ref_opt = torch.optim.SGD(ref.parameters(), **kw)
    for x, y in data():
        ref_opt.zero_grad()
        loss_of(ref, x, y).backward()
        ref_opt.step()
    model = mlp().double()
    opt = ShardedOptimizer(model, world, torch.optim.SGD, stage=stage, **kw)
    for x, y in data():
        opt.zero_grad()
        loss_of(model, x.tensor_split(world.size)[world.rank], y.tensor_split(world.size)[world.rank]).backward()
        opt.step()
    with opt.gathered():
        inside = model.state_dict()
    torch.save(inside, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=True)
    for (name, want), got in zip(ref.state_dict().items(), loaded.values()):
        torch.testing.assert_close(got, want, msg=lambda m: f"stage {stage}: {name}: {m}")


def test_gathered_waits_say_they_are_a_collective_every_rank_must_call(world, monkeypatch):
    """A stall inside stage 3's gathered() (say, only some ranks called it) must name it and say
    it is collective: every wait it makes carries that in the watchdog's report."""
    from mpipar.comm.waits import BOARD
    model = mlp()
    opt = ShardedOptimizer(model, world, torch.optim.SGD, stage=3, lr=0.1)
    seen, begin = [], BOARD._begin

    def record(what, peer, tag):
        start = begin(what, peer, tag)
        seen.append(BOARD.current.describe())
        return start
    monkeypatch.setattr(BOARD, "_begin", record)
    with opt.gathered():
        pass
    monkeypatch.undo()
    want = f"[in ShardedOptimizer.gathered(), which every rank of {world.name} ({world.size} ranks) must call]"
    assert seen and all(d.endswith(want) for d in seen), seen


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("split", ["in-proportion", "uneven", "rounds"])
def test_gradient_accumulation_is_exact_or_refused(world, stage, split):
    """ShardedOptimizer(model, world, ...) in a user's loop, two backward passes a step, each a
    mean over this replica's part of a global micro-batch, halved (float64, SGD with momentum):
    exact when each pass splits over the replicas like the whole batch (6 + 6: on 4 ranks 2/2/1/1
    twice), refused on every rank when not (7 + 5: 4/3 then 3/2 on 2 ranks), as DataParallel does.
    `rounds`: opt.begin_step(1) before each pass instead of begin_step(2) before the first; stages 2
    and 3 then weigh the first pass's reduction by its samples alone, which is refused (stage 1
    reduces at the step: exact)."""
    passes = (7, 5) if split == "uneven" else (6, 6)

    def data():
        g = torch.Generator().manual_seed(1)
        f64 = dict(generator=g, dtype=torch.float64)
        return [(torch.randn(12, 12, **f64), torch.randn(12, 3, **f64)) for _ in range(3)]

    def step(model, opt, x, y, mine, begin=lambda n: None):
        opt.zero_grad()
        begin(len(passes))
        for xp, yp in zip(x.split(passes), y.split(passes)):
            if split == "rounds":
                begin(1)
            (loss_of(model, mine(xp), mine(yp)) / len(passes)).backward()
        opt.step()

    kw = dict(lr=0.03, momentum=0.9)
    ref = mlp().double()
    ref_opt = torch.optim.SGD(ref.parameters(), **kw)
    for x, y in data():
        step(ref, ref_opt, x, y, lambda t: t)
    model = mlp().double()
    opt = ShardedOptimizer(model, world, torch.optim.SGD, stage=stage, **kw)
    refused = {"uneven": r"ShardedOptimizer: backward pass 1 of this step covered \d+ of rank \d+'s \d+ samples but 7 "
                         r"of the global batch's 12.*op='sum'",
               "rounds": rf"ShardedOptimizer stage {stage} weighed this replica's gradients by its \d+ samples .*"
                         rf"opt\.begin_step\(passes\)" if stage > 1 else None}.get(split)
    for x, y in data():
        mine = lambda t: t.tensor_split(world.size)[world.rank]   # noqa: E731
        if refused:
            with pytest.raises(ConfigError, match=refused):
                step(model, opt, x, y, mine, opt.begin_step)
            return
        step(model, opt, x, y, mine, opt.begin_step)
    with opt.gathered():
        got = model.state_dict()
        for (name, want), have in zip(ref.state_dict().items(), got.values()):
            torch.testing.assert_close(have, want, msg=lambda m: f"stage {stage}, {split}: {name}: {m}")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_step_skipped_after_backward_leaves_no_samples_behind(world, stage):
    """A user's loop that skips opt.step() after backward (a non-finite gradient, as
    Checkpoint.finite says on every rank): the next step weighs its replicas by its own samples
    only (global batches of 12, skipped, then 7 and 7: shards 4/3 on 2 ranks), as one process that
    skips the step (float64, SGD with momentum)."""
    def data():
        g = torch.Generator().manual_seed(1)
        f64 = dict(generator=g, dtype=torch.float64)
        return [(torch.randn(b, 12, **f64), torch.randn(b, 3, **f64)) for b in (12, 7, 7)]

    kw = dict(lr=0.03, momentum=0.9)
    ref = mlp().double()
    ref_opt = torch.optim.SGD(ref.parameters(), **kw)
    for x, y in data()[1:]:
        ref_opt.zero_grad()
        loss_of(ref, x, y).backward()
        ref_opt.step()
    model = mlp().double()
    opt = ShardedOptimizer(model, world, torch.optim.SGD, stage=stage, **kw)
    for i, (x, y) in enumerate(data()):
        opt.zero_grad()
        loss_of(model, x.tensor_split(world.size)[world.rank], y.tensor_split(world.size)[world.rank]).backward()
        if i > 0:
            opt.step()
    with opt.gathered():
        for (name, want), have in zip(ref.state_dict().items(), model.state_dict().values()):
            torch.testing.assert_close(have, want, msg=lambda m: f"stage {stage}: {name}: {m}")


class AuxHead(nn.Module):
    """A body with a head used every step and an auxiliary head used every other step (a multi-task loop)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head, self.aux = nn.Sequential(nn.Linear(6, 16), nn.Tanh()), nn.Linear(16, 2), nn.Linear(16, 1)
        self.double()

    def forward(self, x, with_aux: bool):
        h = self.body(x)
        return self.head(h), (self.aux(h) if with_aux else None)


def aux_loss(model, x, y, with_aux):
    out, a = model(x, with_aux)
    return nn.functional.mse_loss(out, y) + (0.5 * nn.functional.mse_loss(a, y[:, :1]) if with_aux else 0)


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("opt_cls, kw", [(torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=0.1)),
                                         (torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1))], ids=["sgd", "adam"])
def test_a_head_used_every_other_step_equals_single_process(world, stage, opt_cls, kw):
    """ShardedOptimizer(model, world, ...) on a model whose auxiliary head has a gradient on odd
    steps only (global batches of 10, uneven shards; float64): torch's optimizer skips a parameter
    whose .grad is None -- no update, no momentum, no weight decay, no Adam step counted -- and so
    must every stage. The weights and the optimizer's state_dict (after the first step: none yet
    for the head) equal one process's, on every rank."""
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(10, 6, generator=g, dtype=torch.float64), torch.randn(10, 2, generator=g, dtype=torch.float64))
            for _ in range(6)]
    ref, model = AuxHead(), AuxHead()
    ref_opt = opt_cls(ref.parameters(), **kw)
    opt = ShardedOptimizer(model, world, opt_cls, stage=stage, **kw)
    for step, (x, y) in enumerate(data):
        ref_opt.zero_grad()
        aux_loss(ref, x, y, step % 2 == 1).backward()
        ref_opt.step()
        opt.zero_grad()
        aux_loss(model, x.tensor_split(world.size)[world.rank], y.tensor_split(world.size)[world.rank],
                 step % 2 == 1).backward()
        opt.step()
        if step == 0:
            assert set(opt.state_dict()["state"]) == set(ref_opt.state_dict()["state"]) == {0, 1, 2, 3}
    torch.testing.assert_close(opt.state_dict()["state"], ref_opt.state_dict()["state"])
    with opt.gathered():
        for (name, want), have in zip(ref.state_dict().items(), model.state_dict().values()):
            torch.testing.assert_close(have, want, msg=lambda m: f"stage {stage}: {name}: {m}")


@pytest.mark.parametrize("stage", [1, 3])
@pytest.mark.parametrize("schedule", ["step", "lambda"])
def test_torch_lr_schedulers_drive_a_sharded_optimizer_as_torchs(world, stage, schedule):
    """torch's StepLR and LambdaLR built on a ShardedOptimizer (a torch Optimizer whose
    param_groups are the ones its step reads) change the learning rate of its steps as they do a
    torch optimizer's: weights and learning rates equal one process's (float64, SGD with momentum)."""
    def scheduler(opt):
        if schedule == "step":
            return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.3)
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + k))

    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 12, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64))
            for _ in range(6)]
    ref, model = mlp().double(), mlp().double()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    opt = ShardedOptimizer(model, world, torch.optim.SGD, stage=stage, lr=0.05, momentum=0.9)
    ref_sched, sched = scheduler(ref_opt), scheduler(opt)
    for x, y in data:
        ref_opt.zero_grad()
        loss_of(ref, x, y).backward()
        ref_opt.step()
        ref_sched.step()
        opt.zero_grad()
        loss_of(model, x.tensor_split(world.size)[world.rank], y.tensor_split(world.size)[world.rank]).backward()
        opt.step()
        sched.step()
        assert sched.get_last_lr() == ref_sched.get_last_lr()
    assert ref_sched.get_last_lr()[0] < 0.05 / 2       # the schedule acted
    with opt.gathered():
        for (name, want), have in zip(ref.state_dict().items(), model.state_dict().values()):
            torch.testing.assert_close(have, want, msg=lambda m: f"stage {stage}, {schedule}: {name}: {m}")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_token_level_loss_over_padding_equals_single_process(world, stage):
    """A cross entropy over padded sequences (ignore_index=0) averages over each replica's counted
    targets: ShardedOptimizer, like DataParallel, sees that loss on the model's output and weighs
    the replicas by those counts (global batches of 9 and 7, uneven shards; SGD with momentum,
    linear in the gradient; float64)."""
    vocab, length = 11, 7

    def lm():
        torch.manual_seed(0)
        return nn.Sequential(nn.Embedding(vocab, 16), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, vocab)).double()

    def data():
        g = torch.Generator().manual_seed(1)
        for b in (9, 7, 9):
            x, y = torch.randint(1, vocab, (b, length), generator=g), torch.randint(1, vocab, (b, length), generator=g)
            y[torch.arange(length) >= torch.randint(1, length, (b, 1), generator=g)] = 0
            yield x, y

    def loss(out, y):
        return nn.functional.cross_entropy(out.reshape(-1, vocab), y.reshape(-1), ignore_index=0)

    kw = dict(lr=0.5, momentum=0.9)
    ref = lm()
    ref_opt = torch.optim.SGD(ref.parameters(), **kw)
    for x, y in data():
        ref_opt.zero_grad()
        loss(ref(x), y).backward()
        ref_opt.step()
    model = lm()
    opt = ShardedOptimizer(model, world, torch.optim.SGD, stage=stage, **kw)
    for x, y in data():
        opt.zero_grad()
        loss(model(x.tensor_split(world.size)[world.rank]), y.tensor_split(world.size)[world.rank]).backward()
        opt.step()
    with opt.gathered():
        got = {k: v.clone() for k, v in model.state_dict().items()}
    for name, want in ref.state_dict().items():
        torch.testing.assert_close(got[name], want, msg=lambda m: f"stage {stage}: {name}: {m}")


@pytest.mark.parametrize("op", ["mean", "sum"])
def test_replicas_stepping_with_their_own_learning_rates_are_refused(world, op):
    """A scheduler fed each replica's own loss gives the replicas their own learning rates: the
    sharded step is refused on every rank, naming the hyperparameter ('mean': compared in the
    step's own exchange; 'sum': one small all-gather)."""
    model = mlp()
    opt = ShardedOptimizer(model, world, torch.optim.SGD, op=op, lr=0.01)
    for group in opt.param_groups:
        group["lr"] = 0.01 * (1 + (world.rank == 1))          # rank 1 its own lr
    x, y = next(batches())
    loss_of(model, x.tensor_split(world.size)[world.rank], y.tensor_split(world.size)[world.rank]).backward()
    with pytest.raises(ConfigError, match=r"different hyperparameters: lr=0.01 on rank 0, 0.02 on rank 1"):
        opt.step()
