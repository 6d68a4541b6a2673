"""hier_checks.py's checks first (so one job serves both tests of tests/test_hier_hosts.py), then
all-reduces of 1 MiB over the whole World forever (auto: hierarchical across the hosts), with the
stall watchdog lowered to STALL_SECONDS: the test cuts a host's cable mid-run and expects the
watchdog's report, not a hang. Prints "running" once the first all-reduce is done everywhere.

Usage: mpirun ... python tests/cluster/hier_stall.py STALL_SECONDS [--expect-hier]
"""
import sys

import torch

from mpipar.data_parallel.reduce import grouped
from hier_checks import all_reduce, main, watchdog, world   # this script's folder: World, watchdog (60 s)

main()
watchdog.timeout = float(sys.argv[1])
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
