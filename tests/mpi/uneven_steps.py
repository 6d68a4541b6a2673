"""Replicas that run different numbers of steps (the user's own sharding, one batch short on rank
1): rank 1 leaves after 2 steps while rank 0 waits in its third step's all-reduce. The job must
end within seconds, not at the stall timeout, with one line naming who left and why. Launched
by tests/test_fault.py."""
import time

import torch
from torch import nn

import mpipar

topo = mpipar.init(grid="dp", stall_timeout=120)
torch.manual_seed(0)
model = nn.Linear(4, 1)
dp = mpipar.DataParallel(model, topo)
opt = dp.optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
for step in range(3 - topo.rank):
    opt.zero_grad()
    model(torch.randn(8, 4)).square().mean().backward()
    opt.step()
print(f"rank {topo.rank} leaves at {time.time():.3f}", flush=True)
