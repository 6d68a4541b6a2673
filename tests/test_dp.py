"""Synchronous data parallelism from the command line, as a job of its own: `--grid dp=4` against
single-process training with the same global batch, and a model built differently on one rank
ending the job with one clear line instead of a hang. Composition with pipeline stages and tensor
parallelism, and ZeRO 1-3 through the Trainer: tests/mpi/cases_parity.py; DataParallel and its
buckets: tests/mpi/cases_dp.py; ZeRO in a user's loop: tests/mpi/cases_zero.py (both run case by
case by tests/test_mpi_cases.py). In one process: batches(start=) continuing an epoch, a stall
report naming the collective the user called, and ZeRO refusing to guess a gradient convention."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mpirun import mpirun
from parity import check_parity

torch.set_num_threads(1)


def test_mismatched_models_end_the_job_with_the_layout_error():
    p = mpirun(2, "tests/mpi/dp_mismatch.py", timeout=90)
    assert p.returncode != 0
    line = next((l for l in p.stderr.splitlines() if "ReplicaMismatchError" in l), "")
    assert "disagree on the gradient layout" in line and "rank 1 has 10 parameters / 3,986 elements" in line, p.stderr[-2000:]


@pytest.mark.smoke
def test_dp4_equals_single_process_with_the_same_global_batch(tmp_path):
    # (uneven shards are checked with SGD in tests/mpi/cases_dp.py: Adam's first steps turn the
    # last-bit differences of a 7-vs-8-sample shard mean into ~1e-4 parameter differences)
    # (--grad-compress casts only what crosses hosts: on one host the result is the same)
    out = check_parity(tmp_path, 4, ["mlp", "--grid", "dp=4", "--steps", "20", "--epochs", "1",
                               "--dp-check-every", "5", "--grad-compress", "bf16"])
    assert "pp=1 dp=4" in out


class Pairs(torch.utils.data.Dataset):
    """A map-style Dataset (not held tensors): batches() goes through a DataLoader for it."""

    def __init__(self, n):
        self.x, self.y = torch.arange(n * 2.0).reshape(n, 2), torch.arange(n)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


@pytest.mark.parametrize("held", [True, False], ids=["tensors", "dataset"])
def test_batches_start_continues_the_epoch_with_the_same_shards(held):
    """After a resume at global batch 3 of an epoch, batches(start=3) gives every dp rank exactly
    the shards an uninterrupted epoch gives it from batch 3 on (a short last batch included)."""
    from mpipar import batches
    data = Pairs(30) if not held else torch.utils.data.TensorDataset(torch.arange(60.0).reshape(30, 2), torch.arange(30))
    for dp_rank in range(3):
        topo = SimpleNamespace(dp_rank=dp_rank, grid=SimpleNamespace(dp=3))
        whole = list(batches(data, 8, topo, epoch=2))
        rest = list(batches(data, 8, topo, epoch=2, start=3))
        assert len(whole) == 4 and len(rest) == 1 and len(rest[0][1]) == 2     # 30 = 3 x 8 + 6: 2/2/2
        for (x, y), (xw, yw) in zip(rest, whole[3:]):
            assert torch.equal(x, xw) and torch.equal(y, yw)
        assert list(batches(data, 8, topo, epoch=2, start=4)) == []
    from mpipar.errors import ConfigError
    with pytest.raises(ConfigError, match="start=-1"):
        next(batches(data, 8, start=-1))


def test_a_stall_report_names_the_collective_the_user_called():
    from mpipar.comm.waits import BOARD, Waiting
    assert Waiting("SHM all-gather on dp", -1, 0.0).describe() == "SHM all-gather on dp"
    with BOARD.inside("ShardedOptimizer.gathered(), which every rank of dp (4 ranks) must call"):
        start = BOARD._begin("SHM all-gather on dp", -1, None)
        assert BOARD.current.describe() == ("SHM all-gather on dp [in ShardedOptimizer.gathered(), which every "
                                            "rank of dp (4 ranks) must call]")
        BOARD._end(start)
    assert BOARD.within is None


def test_a_rank_in_another_collective_is_named():
    """Every rank entering gathered() first shows it is in the same call: a rank elsewhere (here
    rank 2, in another allgather) is named, with the fix, instead of being paired silently."""
    from mpipar.data_parallel.buckets import digest
    from mpipar.data_parallel.zero3 import collective
    from mpipar.errors import ConfigError

    class TwoCalls:
        name, size, rank = "dp", 3, 0
        world_rank_of = staticmethod(lambda r: r + 4)

        def allgather_floats(self, values):
            import numpy as np
            return np.array([[values[0]], [values[0]], [digest("elsewhere")]])

    with pytest.raises(ConfigError) as e:
        with collective(TwoCalls(), "ShardedOptimizer.gathered()"):
            pass
    assert str(e.value) == ("rank 4 called ShardedOptimizer.gathered() while rank(s) 6 of dp called another "
                            "collective: ShardedOptimizer.gathered() is collective, every rank of dp must call it")


def test_zero_used_directly_weighs_replicas_by_samples_and_refuses_to_guess():
    """The one convention: ShardedOptimizer(model, ...) weighs each replica by the samples its
    forward saw (op 'mean'); a Pipeline's optimizer (built with norm_worlds) sums what the
    Pipeline weighted; bare parameters with nothing to count on are refused with the fix."""
    from mpipar.comm.world import World
    from mpipar.data_parallel.zero import ShardedOptimizer
    from mpipar.errors import ConfigError
    world = World.alone()
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    assert ShardedOptimizer(model, world, torch.optim.SGD, lr=0.1).op == "mean"
    assert ShardedOptimizer(model.parameters(), world, torch.optim.SGD, norm_worlds=(world,), op="sum", lr=0.1).op == "sum"
    with pytest.raises(ConfigError, match=r"pass the model itself \(ShardedOptimizer\(model, topo, \.\.\.\)\)"):
        ShardedOptimizer(model.parameters(), world, torch.optim.SGD, lr=0.1)


def test_only_forwards_that_backward_runs_through_are_counted():
    """A logging forward without torch.no_grad() (never backpropagated) adds no samples; forwards
    one backward call runs through count as one pass, each backward call as a pass of its own."""
    from mpipar.data_parallel.samples import SampleCounter
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    counter = SampleCounter(model)
    x = torch.randn(7, 3)
    logged = model(x).pow(2).mean().item()                      # logging only
    model(x[:2]).pow(2).mean().backward()
    (model(x[:3]).sum() + model(x[:1]).sum()).backward()        # two forwards, one backward call
    with torch.no_grad():
        model(x)
    assert logged == logged and counter.passes == [2, 4] and counter.n == 6, counter.passes
    counter.reset()
    assert counter.passes == [] and counter.n == 0


def test_a_sequence_first_rnn_needs_its_batch_dim():
    """An LSTM reading (time, batch, features) would be counted by its sequence length (equal on
    every replica, so uneven shards got equal weights): refused unless batch_dim says where the
    samples run."""
    from mpipar.data_parallel.samples import SampleCounter
    from mpipar.errors import ConfigError
    lstm = nn.LSTM(3, 4)
    with pytest.raises(ConfigError, match=r"batch_first=False.*batch_dim=1"):
        SampleCounter(lstm)
    counter = SampleCounter(lstm, batch_dim=1)
    lstm(torch.randn(5, 2, 3))[0].sum().backward()             # 5 steps of 2 sequences
    assert counter.passes == [2]


class Replicas:
    """A stand-in world for checked_passes: rank r is world rank r."""
    world_rank_of = staticmethod(lambda r: r)


@pytest.mark.parametrize("passes, error", [
    ([[4, 3], [4, 3], [4, 2], [4, 2]], r"pass 1 of this step covered 4 of rank 0's 7 samples but 16 of the "
                                       r"global batch's 26.*op='sum'"),
    ([[4, 4], [4, 4], [8], [4, 4]], r"different numbers of backward passes this step \(rank 0: 2, rank 1: 2, "
                                    r"rank 2: 1, rank 3: 2\)"),
    ([[4, 2], [4, 2], [2, 1], [0, 0]], None),                  # in proportion (2:1 on every rank); an empty shard
    ([[5]] * 3 + [[3]], None)], ids=["uneven", "pass-counts", "proportional", "one-pass"])
def test_passes_split_unevenly_over_the_replicas_are_refused(passes, error):
    """Gradient accumulation with one weight per replica is exact only when every backward pass
    is split over the replicas in proportion to their samples (n_rp * N == n_r * B_p)."""
    import numpy as np
    from mpipar.data_parallel.samples import checked_passes, pass_row
    from mpipar.errors import ConfigError
    rows = np.array([pass_row(p) for p in passes])
    if error is None:
        assert checked_passes(rows, Replicas(), "DataParallel") == sum(map(sum, passes))
    else:
        with pytest.raises(ConfigError, match=error):
            checked_passes(rows, Replicas(), "DataParallel")


@pytest.mark.parametrize("set_to_none", [True, False], ids=["grads-none", "grads-kept"])
@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "after-backward"])
def test_gradients_clipped_before_the_sync_are_refused(set_to_none, overlap):
    """clip_grad_norm_ between backward and the sync would clip each replica's local gradient:
    refused at the sync with the fix (whether backward already staged the bucket, and when .grad
    is kept as a view of it); clipping after dp.finish() goes through and changes the step."""
    from mpipar.comm.world import World
    from mpipar.data_parallel import DataParallel
    from mpipar.data_parallel.buckets import GradientsChangedError
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    dp = DataParallel(model, World.alone(), bucket_mb=1e-4)     # a bucket per parameter: staged in backward
    opt = dp.optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    x = torch.randn(5, 3)
    for clip in ("after", "before", "after"):
        opt.zero_grad(set_to_none=set_to_none)
        if overlap:
            dp.begin_step(1)
        model(x).pow(2).mean().backward()
        if clip == "after":
            dp.finish()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        if clip == "before":
            before = [p.detach().clone() for p in model.parameters()]
            with pytest.raises(GradientsChangedError, match=r"changed in place after backward and before they "
                                                            r"were synchronised.*call dp\.finish\(\) first, then clip"):
                opt.step()
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))   # nothing stepped
            dp.remove()
            dp = DataParallel(model, World.alone(), bucket_mb=1e-4)
            opt = dp.optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
        else:
            assert float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])) <= 1e-3 + 1e-9
            opt.step()
    dp.remove()


def test_batchnorm_normalising_by_the_batch_is_refused():
    """Each replica would normalise by its own shard: refused at construction and at any later sync
    (model.train() after building), with the fixes; frozen (.eval()) or local_batchnorm=True pass."""
    from mpipar.comm.world import World
    from mpipar.data_parallel import DataParallel
    from mpipar.errors import ConfigError
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    fixes = r"BatchNorm1d '1' normalises by the batch.*GroupNorm.*\.eval\(\).*local_batchnorm=True"
    with pytest.raises(ConfigError, match=fixes):
        DataParallel(model, World.alone())
    DataParallel(model, World.alone(), local_batchnorm=True).remove()
    dp = DataParallel(model.eval(), World.alone())
    opt = dp.optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    model(torch.randn(5, 3)).sum().backward()
    opt.step()                                                  # frozen: running statistics, per sample
    model.train()
    model(torch.randn(5, 3)).sum().backward()
    with pytest.raises(ConfigError, match=fixes):
        opt.step()
    dp.remove()


def test_zero_stage_1_refuses_gradients_clipped_before_its_step():
    """ShardedOptimizer stage 1 sums the replicas' gradients at its step: torch's clip_grad_norm_
    before it would clip the local ones, so it is refused with the fix (step(clip=...))."""
    from mpipar.comm.world import World
    from mpipar.data_parallel.buckets import GradientsChangedError
    from mpipar.data_parallel.zero import ShardedOptimizer
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = ShardedOptimizer(model, World.alone(), torch.optim.SGD, stage=1, lr=0.1)
    x = torch.randn(5, 3)
    for clip in (False, True, False):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        if not clip:
            opt.step(clip=1e-3)
            continue
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        with pytest.raises(GradientsChangedError, match=r"clip_grad_norm_.*clip with opt\.step\(clip=\.\.\.\)"):
            opt.step()
