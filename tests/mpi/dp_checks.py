"""DataParallel and gradient buckets against single-process training, in one launch.

Usage: mpirun -np N python tests/mpi/dp_checks.py            (N must divide 12)
       mpirun -np N python tests/mpi/dp_checks.py --mismatch (rank 1 builds another model: must
                                                              abort with the layout error)
"""
import sys

import torch
from torch import nn

from mpipar.comm import World, failure
from mpipar.data_parallel import DataParallel
from mpipar.data_parallel.fingerprint import ReplicaMismatchError

torch.set_num_threads(1)
world = World()
failure.install(world.host)
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


def reference(b: int = B) -> nn.Module:
    model = cnn()
    opt = sgd(model)
    for x, y in batches(b):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def data_parallel(bucket_mb: float, overlap: bool, passes: int, b: int = B) -> tuple[nn.Module, DataParallel]:
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


def check_parity() -> None:
    refs = {b: reference(b) for b in (B, B + 2)}
    for bucket_mb, overlap, passes, b in [(0.001, True, 1, B), (100.0, True, 1, B), (0.004, False, 1, B),
                                          (0.004, True, 2, B), (0.004, True, 1, B + 2)]:
        ref = refs[b]
        model, dp = data_parallel(bucket_mb, overlap, passes, b)
        what = f"bucket_mb={bucket_mb} overlap={overlap} passes={passes} batch={b} ({len(dp.buckets.buckets)} buckets)"
        for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {name}: {m}")
        assert model.unused.weight.grad is None, f"{what}: an unused parameter got a gradient"
        dp.check_replicas()
        dp.remove()


def check_divergence_is_reported() -> None:
    model = cnn()
    dp = DataParallel(model, world)
    if world.rank == world.size - 1:
        with torch.no_grad():
            model.body[0].bias[0] += 1e-6
    try:
        dp.check_replicas()
    except ReplicaMismatchError as e:
        assert f"rank(s) {world.size - 1} differ from rank 0" in str(e), str(e)
    else:
        raise AssertionError("a replica that diverged was not reported")
    dp.remove()


def check_extra_backward_is_refused() -> None:
    """A gradient arriving after its bucket left must raise, not be silently dropped."""
    model = cnn()
    dp = DataParallel(model, world, bucket_mb=1e-4)   # one bucket per parameter: used ones launch
    x, y = batches()[0]
    dp.begin_step(1)
    nn.functional.cross_entropy(model(x), y).backward()
    try:
        nn.functional.cross_entropy(model(x), y).backward()
    except RuntimeError as e:
        assert "after its bucket" in str(e), str(e)
    else:
        raise AssertionError("a second backward after the bucket launched was accepted")
    dp.finish()   # drains the bucket already in flight on every rank
    dp.remove()


def mismatch() -> None:
    """Rank 1 builds a wider first layer: the job must end with the layout error, not hang."""
    DataParallel(cnn(wide=9 if world.rank == 1 else 8), world)
    raise AssertionError("mismatched models were accepted")


if "--mismatch" in sys.argv:
    mismatch()
check_parity()
check_divergence_is_reported()
check_extra_backward_is_refused()
world.barrier()
if world.rank == 0:
    print(f"dp checks passed on {world.size} ranks", flush=True)
