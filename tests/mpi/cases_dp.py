"""DataParallel and gradient buckets against single-process training: the same CNN trained on
one process and data parallel (replicas start different: rank 0's are broadcast), with tiny
buckets, one big bucket, no overlap, two backward passes per step, an uneven batch (op 'sum',
losses weighted by their share as a Pipeline does); the default convention (op 'mean': each
replica's loss a plain mean over its shard) on shards of 2/2/1/1, synced by finish() or by the
optimizer wrapper, with a logging forward on one rank that must not count; gradient accumulation
exact when its passes split like the batch and refused when not; a step on unsynced gradients
refused on every rank; a diverged replica and a
gradient arriving after its bucket left are reported; replicas built differently raise the
layout error on every rank; token-level losses over padded sequences (a mean over each replica's
counted targets) exact, and two such losses over different counts in one pass refused. (That such an error ends the whole job with one line:
tests/test_dp.py with tests/mpi/dp_mismatch.py.)"""
import functools
import io

import pytest
import torch
from torch import nn

from mpipar.data_parallel import DataParallel
from mpipar.data_parallel.buckets import ReplicaMismatchError
from mpipar.data_parallel.wrapper import UnsyncedGradientsError
from mpipar.errors import ConfigError

NP = (4,)   # any N dividing 12
TIMEOUT = 180

torch.set_num_threads(1)
B, STEPS = 12, 4


class Net(nn.Module):
    """A small CNN, a buffer, and a layer forward never uses (its grad must stay None)."""

    def __init__(self, wide: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, wide, 3, padding=1), nn.ReLU(), nn.Conv2d(wide, 16, 3, padding=1),
                                  nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 32), nn.ReLU(),
                                  nn.Linear(32, 10))
        self.unused = nn.Linear(3, 3)
        self.register_buffer("calibration", torch.arange(5.0))

    def forward(self, x):
        return self.body(x)


def cnn(wide: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return Net(wide)


def sgd(model):   # weight decay: a zero gradient where there should be none would show
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)


def batches(b: int = B):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(b, 3, 8, 8, generator=g), torch.randint(0, 10, (b,), generator=g)) for _ in range(STEPS)]


@functools.cache
def reference(b: int = B) -> nn.Module:
    model = cnn()
    opt = sgd(model)
    for x, y in batches(b):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def data_parallel(world, bucket_mb: float, overlap: bool, passes: int, b: int = B) -> tuple[nn.Module, DataParallel]:
    """Each rank takes its shard of every global batch of b; op 'sum' with each loss weighted by
    its share of the global batch (as the trainer does), so uneven shards give the global mean."""
    model = cnn()
    if world.rank:                      # replicas start different: DataParallel must broadcast rank 0's
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                t.add_(world.rank)
    dp = DataParallel(model, world, bucket_mb=bucket_mb, op="sum", overlap=overlap, check_every=2)
    opt = sgd(model)
    for x, y in batches(b):
        xs, ys = x.tensor_split(world.size)[world.rank], y.tensor_split(world.size)[world.rank]
        opt.zero_grad(set_to_none=True)
        dp.begin_step(passes)
        for xm, ym in zip(xs.tensor_split(passes), ys.tensor_split(passes)):   # micro-batches
            (nn.functional.cross_entropy(model(xm), ym) * len(ym) / len(y)).backward()
        dp.finish()
        opt.step()
    return model, dp


def check_parity(world, bucket_mb, overlap, passes, b) -> None:
    ref = reference(b)
    model, dp = data_parallel(world, bucket_mb, overlap, passes, b)
    what = f"bucket_mb={bucket_mb} overlap={overlap} passes={passes} batch={b} ({len(dp.buckets.buckets)} buckets)"
    for (name, a), want in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {name}: {m}")
    assert model.unused.weight.grad is None, f"{what}: an unused parameter got a gradient"
    dp.check_replicas()
    dp.remove()


def test_parity_with_a_bucket_per_parameter_overlapped(world):
    check_parity(world, 0.001, True, 1, B)


def test_parity_with_one_big_bucket(world):
    check_parity(world, 100.0, True, 1, B)


def test_parity_without_overlap(world):
    check_parity(world, 0.004, False, 1, B)


def test_parity_with_two_backward_passes_per_step(world):
    check_parity(world, 0.004, True, 2, B)


def test_parity_with_uneven_shards(world):
    check_parity(world, 0.004, True, 1, B + 2)


def test_a_diverged_replica_is_reported(world):
    model = cnn()
    dp = DataParallel(model, world)
    if world.rank == world.size - 1:
        with torch.no_grad():
            model.body[0].bias[0] += 1e-6
    with pytest.raises(ReplicaMismatchError) as e:
        dp.check_replicas()
    assert f"rank(s) {world.size - 1} differ from rank 0" in str(e.value), str(e.value)
    dp.remove()


def test_a_gradient_after_its_bucket_left_is_refused(world):
    """A gradient arriving after its bucket left must raise, not be silently dropped."""
    model = cnn()
    dp = DataParallel(model, world, bucket_mb=1e-4)   # one bucket per parameter: used ones launch
    x, y = batches()[0]
    dp.begin_step(1)
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError) as e:
        nn.functional.cross_entropy(model(x), y).backward()
    assert "after its bucket" in str(e.value), str(e.value)
    dp.finish()   # drains the bucket already in flight on every rank
    dp.remove()


def test_replicas_built_differently_raise_the_layout_error_on_every_rank(world):
    with pytest.raises(ReplicaMismatchError) as e:
        DataParallel(cnn(wide=9 if world.rank == 1 else 8), world)
    assert "disagree on the gradient layout" in str(e.value) and "rank 1 has 10 parameters" in str(e.value), str(e.value)


UNEVEN = (12, 6, 12, 6)   # global batches: on 4 ranks the 6s split 2/2/1/1


@pytest.mark.parametrize("sync", ["finish", "optimizer", "both", "logging"])
def test_the_default_mean_is_exact_on_uneven_shards(world, sync):
    """Each replica's loss a plain mean over its own shard (2/2/1/1 for a batch of 6 on 4 ranks),
    no weighting by the user: DataParallel weighs each replica by its share of the global batch,
    counted from the forward, so SGD with momentum ends where one process ends (float64).
    `sync`: dp.finish(); the optimizer wrapper; both (the wrapper must not sync twice); the
    wrapper with rank 0 logging a loss without torch.no_grad() (a forward never backpropagated
    must not count)."""
    def data():
        g = torch.Generator().manual_seed(1)
        return [(torch.randn(b, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (b,), generator=g))
                for b in UNEVEN]

    ref = cnn().double()
    opt = sgd(ref)
    for x, y in data():
        opt.zero_grad()
        nn.functional.cross_entropy(ref(x), y).backward()
        opt.step()
    model = cnn().double()
    dp = DataParallel(model, world, bucket_mb=0.004)
    opt = sgd(model) if sync == "finish" else dp.optimizer(sgd(model))
    for x, y in data():
        x, y = x.tensor_split(world.size)[world.rank], y.tensor_split(world.size)[world.rank]
        opt.zero_grad()
        if sync == "logging" and world.rank == 0:
            nn.functional.cross_entropy(model(x), y).item()
        nn.functional.cross_entropy(model(x), y).backward()
        if sync not in ("optimizer", "logging"):
            dp.finish()
        opt.step()
    for (name, a), want in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, want, msg=lambda m: f"sync={sync}: {name}: {m}")
    dp.check_replicas()
    dp.remove()


@pytest.mark.parametrize("passes", [(6, 6), (8, 6)], ids=["in-proportion", "uneven"])
def test_gradient_accumulation_is_exact_or_refused(world, passes):
    """Two backward passes a step, each a mean over this replica's part of a global micro-batch,
    halved (gradient accumulation): exact when every pass splits over the replicas like the
    whole batch (6 = 2/2/1/1 twice), refused on every rank when not (8 = 2/2/2/2, then 2/2/1/1)."""
    def data():
        g = torch.Generator().manual_seed(1)
        return [(torch.randn(sum(passes), 3, 8, 8, generator=g, dtype=torch.float64),
                 torch.randint(0, 10, (sum(passes),), generator=g)) for _ in range(3)]

    def step(net, opt, x, y, mine):
        opt.zero_grad()
        for xp, yp in zip(x.split(passes), y.split(passes)):
            xp, yp = mine(xp), mine(yp)
            (nn.functional.cross_entropy(net(xp), yp) / len(passes)).backward()
        opt.step()

    ref = cnn().double()
    opt = sgd(ref)
    for x, y in data():
        step(ref, opt, x, y, lambda t: t)
    model = cnn().double()
    dp = DataParallel(model, world, bucket_mb=0.004)
    opt = dp.optimizer(sgd(model))
    for x, y in data():
        if passes == (8, 6):
            with pytest.raises(ConfigError, match=r"pass 1 of this step covered 2 of rank 0's 4 samples but 8 of "
                                                  r"the global batch's 14.*op='sum'"):
                step(model, opt, x, y, lambda t: t.tensor_split(world.size)[world.rank])
            break
        step(model, opt, x, y, lambda t: t.tensor_split(world.size)[world.rank])
    else:
        for (name, a), want in zip(model.state_dict().items(), ref.state_dict().values()):
            torch.testing.assert_close(a, want, msg=lambda m: f"{name}: {m}")
        dp.check_replicas()
    dp.remove()


def test_a_step_on_unsynced_gradients_is_refused_on_every_rank(world):
    """Forgetting dp.finish() is refused at the optimizer's step, with the fix, on every rank
    (an error ends the job), instead of letting the replicas drift apart."""
    model = cnn()
    dp = DataParallel(model, world)
    opt = sgd(model)
    x, y = batches()[0]
    nn.functional.cross_entropy(model(x.tensor_split(world.size)[world.rank]),
                                y.tensor_split(world.size)[world.rank]).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(UnsyncedGradientsError) as e:
        opt.step()
    assert "never synchronised" in str(e.value) and "dp.finish()" in str(e.value) and "dp.optimizer(" in str(e.value)
    from mpipar.comm.failure import place
    assert "cases_dp.py:" in place(e.value), place(e.value)      # the line the one-line report names
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))   # nothing stepped
    dp.finish()
    opt.step()                                                   # synced: the step goes through
    dp.remove()


V, T = 11, 7   # a tiny language model's vocabulary and sequence length


def token_lm() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(V, 16), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, V)).double()


def padded_tokens(pad: int):
    """Global batches (UNEVEN) of sequences of random length, targets past the length = pad."""
    g = torch.Generator().manual_seed(1)
    data = []
    for b in UNEVEN:
        x, y = torch.randint(1, V, (b, T), generator=g), torch.randint(1, V, (b, T), generator=g)
        y[torch.arange(T) >= torch.randint(1, T, (b, 1), generator=g)] = pad   # at least the last one
        data.append((x, y))
    return data


TOKEN_LOSSES = {   # each a mean over this replica's counted targets, written as users write it
    "functional, pad 0": (0, lambda out, y: nn.functional.cross_entropy(out.reshape(-1, V), y.reshape(-1),
                                                                        ignore_index=0)),
    "module, pad -100": (-100, lambda out, y: nn.CrossEntropyLoss()(out.transpose(1, 2), y)),
    "nll, class weights": (-100, lambda out, y: nn.NLLLoss(weight=torch.linspace(0.5, 2, V, dtype=torch.float64))(
        out.log_softmax(-1).flatten(0, 1), y.flatten())),
}


@pytest.mark.parametrize("form", TOKEN_LOSSES)
def test_a_token_level_loss_over_padding_is_exact(world, form):
    """A cross entropy over padded sequences averages over each replica's counted (non-ignored)
    targets, which differ between replicas (and shards are uneven, 2/2/1/1): DataParallel sees
    the loss on the model's output and weighs the replicas by those counts, so SGD with momentum
    ends where one process ends, whose loss is the mean over the global batch's counted targets."""
    pad, token_loss = TOKEN_LOSSES[form]
    ref = token_lm()
    opt = sgd(ref)
    for x, y in padded_tokens(pad):
        opt.zero_grad()
        token_loss(ref(x), y).backward()
        opt.step()
    model = token_lm()
    dp = DataParallel(model, world, bucket_mb=0.004)
    opt = dp.optimizer(sgd(model))
    for x, y in padded_tokens(pad):
        x, y = x.tensor_split(world.size)[world.rank], y.tensor_split(world.size)[world.rank]
        opt.zero_grad()
        loss = token_loss(model(x), y)
        loss.backward()
        opt.step()
        assert type(loss) is torch.Tensor and isinstance(loss.item(), float), type(loss)
    for (name, a), want in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, want, msg=lambda m: f"{form}: {name}: {m}")
    dp.check_replicas()
    dp.remove()


def test_two_token_losses_over_different_counts_are_refused(world):
    """A pass through two losses that average over different counts of targets (a padded token
    loss plus a per-sequence one) has no one weight per replica: refused on every rank."""
    model = token_lm()
    dp = DataParallel(model, world)
    opt = dp.optimizer(sgd(model))
    x, y = padded_tokens(0)[0]
    x, y = x.tensor_split(world.size)[world.rank], y.tensor_split(world.size)[world.rank]
    out = model(x)
    (nn.functional.cross_entropy(out.flatten(0, 1), y.flatten(), ignore_index=0)
     + nn.functional.cross_entropy(out[:, 0], y[:, 0])).backward()
    with pytest.raises(ConfigError, match=r"different counts of targets.*op='sum'"):
        opt.step()
    dp.remove()


def test_the_watched_output_reads_as_a_plain_tensor(world):
    """What a user does with the model's output under DataParallel (print it, format it, save
    and load it with weights_only, numpy) is what one process gets."""
    model = token_lm()
    dp = DataParallel(model, world)
    x = torch.randint(1, V, (2, T))
    out, plain = model(x), token_lm()(x)
    assert type(out) is not torch.Tensor                      # else the rest proves nothing
    assert repr(out.detach()) == repr(plain.detach()) and f"{out[0, 0, 0]:.6f}" == f"{plain[0, 0, 0]:.6f}"
    saved = io.BytesIO()
    torch.save(out.detach(), saved)
    assert type(torch.load(io.BytesIO(saved.getvalue()), weights_only=True)) is torch.Tensor
    assert (out.detach().numpy() == plain.detach().numpy()).all() and out.argmax(-1).tolist() == plain.argmax(-1).tolist()
    dp.remove()


@pytest.mark.parametrize("sync", ["wrapped", "finish"])
def test_replicas_stepping_with_their_own_learning_rates_are_refused(world, sync):
    """A scheduler fed each replica's own loss (ReduceLROnPlateau) gives the replicas their own
    learning rates, and the same reduced gradient then moves them apart: the step is refused on
    every rank, naming the hyperparameter (wrapped: compared in the sync's own exchange)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    dp = DataParallel(model, world)
    opt = torch.optim.SGD(model.parameters(), lr=0.01 * (1 + (world.rank == 1)))   # rank 1 its own lr
    opt = dp.optimizer(opt) if sync == "wrapped" else opt
    nn.functional.mse_loss(model(torch.ones(2, 4)), torch.zeros(2, 2)).backward()
    if sync == "finish":
        dp.finish()
    with pytest.raises(ConfigError, match=r"different hyperparameters: lr=0.01 on rank 0, 0.02 on rank 1"):
        opt.step()
    dp.remove()


def test_replicas_that_drift_apart_are_stopped_by_the_default_check(world):
    """A parameter changed on one rank only (between steps, outside any optimizer) leaves the
    replicas apart for good: by default DataParallel compares their bits every 100 syncs, so the
    job stops on every rank instead of training on."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    dp = DataParallel(model, world)
    opt = dp.optimizer(torch.optim.SGD(model.parameters(), lr=0.01))
    x, y = torch.ones(2, 4), torch.zeros(2, 2)
    steps = 0
    with pytest.raises(ReplicaMismatchError, match="every replica must step alike"):
        for steps in range(101):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            if steps == 5 and world.rank == 1:
                with torch.no_grad():
                    model.bias.add_(1e-3)
    assert steps == 100, steps        # the first check after the replicas parted: sync 100
    dp.remove()
