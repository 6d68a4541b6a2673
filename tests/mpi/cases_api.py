"""The public API (mpipar.init, Pipeline, batches, Trainer, user tensor-parallel modules) on 1, 2,
4 and 8 ranks against single-process training of the same nn.Sequential, seed and batches
(torch.testing.assert_close on every rank: each replica and each gathered tensor-parallel shard).
The cases (tests/mpi/api_case.py) cover every pipeline schedule, uneven micro-batches (30 into 4)
and uneven data-parallel shards (31 over 2) with a short last batch, pp x dp with a map-style
Dataset read by DataLoader workers, pp x dp x tp with a user's own module holding column/row-
parallel layers, and pp x dp under ZeRO stage 3 (pipe.make_optimizer). All cases of one rank count
share one mpirun job (the 8-rank one, tests/mpi/cases_parity.py's; the 1-rank one, a World of
COMM_SELF in the 2-rank job); tests/test_api.py shows the tolerance would catch a wrong weighting."""
import pytest

from api_case import CASES, check
import job

NP = (2, 4)     # the 8-rank case (pp x dp x tp, a user's TP module) shares cases_parity.py's 8-rank job
TIMEOUT = 240
QUICK = {4: ("test_public_api_equals_single_process",)}


@pytest.mark.parametrize("case", [c for c, (ranks, *_) in CASES.items()
                                  if ranks == job.size() or (ranks, job.size()) == (1, 2)])
def test_public_api_equals_single_process(world, case):
    if CASES[case][0] == 1:     # the 1-rank case in the 2-rank job (no job of its own): on rank 0's COMM_SELF
        if world.rank == 0:
            from mpi4py import MPI
            from mpipar.comm import World
            check(case, World(MPI.COMM_SELF, name="alone"))
        return
    check(case, world)


# -- issue 29, Pipeline: a stage without parameters (README (d) on 4 ranks), the global batch's loss --
import copy  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

import mpipar  # noqa: E402


def readme_d_model() -> nn.Sequential:
    """README (d)'s model in float64: 5 layers, 3 with weights, so 4 stages leave one a Tanh only."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4)).double()


def readme_d_batch(step: int):
    g = torch.Generator().manual_seed(step)
    return torch.randn(32, 16, generator=g, dtype=torch.float64), torch.randn(32, 4, generator=g, dtype=torch.float64)


def readme_d_loop(topo, root, until: int):
    """README (d) as written (Adam on pipe.parameters(), Checkpoint every 3 steps), up to step `until`."""
    pipe = mpipar.Pipeline(readme_d_model(), topo, microbatches=2, loss_fn=nn.MSELoss())
    opt = torch.optim.Adam(pipe.parameters(), lr=1e-3)
    ckpt = mpipar.Checkpoint(root, pipe, opt, every=3, log=lambda *a: None)
    step = start = ckpt.resume()
    while step < until:
        x, y = readme_d_batch(step)
        opt.zero_grad()
        pipe.step(x, y)
        opt.step()
        step += 1
        ckpt.step(step)
    ckpt.close()
    return pipe, start


@pytest.mark.mpi(min_size=4)
def test_a_stage_without_parameters_trains_checkpoints_resumes_and_equals_single_process(world, mpi_tmp_path):
    topo = mpipar.init(stall_timeout=0, world=world)
    readme_d_loop(topo, mpi_tmp_path / "ckpt", 5)
    pipe, start = readme_d_loop(topo, mpi_tmp_path / "ckpt", 8)       # resumes from step 3
    assert start == 3
    without = topo.world.allgather_floats([not pipe.trainable()])[:, 0]
    assert without.sum() == 1, without                                  # the case the issue met: a Tanh alone
    model = readme_d_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(8):
        x, y = readme_d_batch(step)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    want = model.state_dict()
    for k, v in pipe.state_dict().items():
        torch.testing.assert_close(v, want[k], msg=lambda m: f"{k}: {m}")


@pytest.mark.mpi(min_size=4)
def test_global_loss_is_the_loss_of_the_whole_global_batch(world):
    """pp=2 x dp=2 on uneven shards (16 + 15): step() returns the replica's shard's mean loss,
    global_loss() the global batch's, as one process computes them (None off the last stage)."""
    topo = mpipar.init(grid="pp=2,dp=2", stall_timeout=0, world=world)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)).double()
    ref = copy.deepcopy(model)
    pipe = mpipar.Pipeline(model, topo, schedule="1f1b", microbatches=2, loss_fn=nn.MSELoss())
    opt, ref_opt = torch.optim.SGD(pipe.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    got, want = [], []
    for n in (31, 20):
        x, y = torch.randn(n, 16, generator=g, dtype=torch.float64), torch.randn(n, 4, generator=g, dtype=torch.float64)
        xs, ys = x.tensor_split(2)[topo.dp_rank], y.tensor_split(2)[topo.dp_rank]
        opt.zero_grad()
        got.append((pipe.step(xs, ys), pipe.global_loss()))
        opt.step()
        with torch.no_grad():
            shard = float(nn.functional.mse_loss(ref(xs), ys))
        ref_opt.zero_grad()
        whole = nn.functional.mse_loss(ref(x), y)
        whole.backward()
        ref_opt.step()
        want.append((shard, float(whole)) if pipe.is_last else (None, None))
    torch.testing.assert_close(got, want)        # after the loop: a wrong loss leaves no rank waiting
