"""All-reduces of 1 MiB over the whole World forever (auto: hierarchical across the hosts), with
the stall watchdog on: tests/test_hier_hosts.py cuts a host's cable mid-run and expects the
watchdog's report, not a hang. Prints "running" once the first all-reduce is done everywhere.

Usage: mpirun ... python tests/cluster/hier_stall.py STALL_SECONDS
"""
import sys

import torch

from mpipar.comm import World, failure
from mpipar.data_parallel import all_reduce
from mpipar.data_parallel.reduce import grouped

torch.set_num_threads(1)
world = World()
failure.install(world.host)
failure.start_watchdog(float(sys.argv[1]), world.host)
x = torch.ones(2 ** 18)
assert grouped(world), "the job must span hosts with several ranks on one (auto picks hier)"
step = 0
while True:
    x.fill_(1.0)
    all_reduce(world, x, "sum")
    assert float(x[0]) == world.size, f"step {step}: {float(x[0])} != {world.size}"
    if step == 0 and world.rank == 0:
        print("running", flush=True)
    step += 1
