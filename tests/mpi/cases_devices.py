"""A pipeline whose every message is a "device" tensor staged through pinned host buffers
(fake_device.FakeOps: copies land late, so a payload sent before its copy completed, or a buffer
reused too early, would arrive as NaN or as another micro-batch's data), trained 1F1B and compared
with single-process training; on 4 ranks as pp=2 x dp=2, so the gradient all-reduce and the
initial broadcast run through the same policy."""
import torch
from torch import nn

from fake_device import FakeOps
from mpipar import Grid, Pipeline, Topology
from mpipar.comm import World
from mpipar.comm.cuda import BufferPolicy
from mpipar.comm.mpi import MPI

NP = (2, 4)
TIMEOUT = 120

torch.set_num_threads(1)
B, STEPS, M = 32, 6, 4


def layers():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))


def batches():
    g = torch.Generator().manual_seed(3)
    for _ in range(STEPS):
        x = torch.randn(B, 10, generator=g)
        yield x, x[:, :4].sin() + 0.1 * torch.randn(B, 4, generator=g)


def test_staged_pipeline_equals_single_process(world):
    ops = FakeOps(polls=2, everything=True)
    staged = World(MPI.COMM_WORLD, name="world", policy=BufferPolicy(False, ops=ops))
    grid = Grid(pp=2, dp=staged.size // 2)
    topo = Topology.build(staged, grid)
    pipe = Pipeline(layers(), topo, loss_fn=nn.MSELoss(), schedule="1f1b", microbatches=M, balance=[2, 3])
    opt = torch.optim.SGD(pipe.parameters(), lr=0.1)
    per = B // grid.dp
    for x, y in batches():
        opt.zero_grad()
        lo = topo.dp_rank * per
        pipe.step(x[lo:lo + per], y[lo:lo + per], global_n=B)
        opt.step()
    pipe.close()

    ref = layers()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for x, y in batches():
        ref_opt.zero_grad()
        nn.functional.mse_loss(ref(x), y).backward()
        ref_opt.step()
    want = {k: v for k, v in ref.state_dict().items()}
    for name, value in pipe.state_dict().items():
        torch.testing.assert_close(value, want[name], msg=lambda m: f"{name}: {m}")
    assert ops.log.count("copy") >= 2 * STEPS * M          # every activation / gradient went through staging
    assert staged.policy.pool.made <= 8, staged.policy.pool.made   # pinned buffers reused across steps
