"""Several `python -m mpipar.run` command lines, one after the other, in ONE job (a job's start,
N imports of torch, costs more than a short run): each argument is a command line as a JSON list,
run as mpipar.run's main runs it, on the same World.

usage: mpirun -np N python tests/mpi/runs_in_turn.py '["mlp", "--epochs", "1"]' '["mlp", ...]'"""
import json
import sys

from mpipar.app.run import parse
from mpipar.app.session import run_example
from mpipar.comm import World, failure
from mpipar.comm.world import finalize

world = World()
failure.install(world.host)
for i, line in enumerate(sys.argv[1:]):
    args, example = parse(json.loads(line))
    if i == 0:
        failure.start_watchdog(args.stall_timeout, world.host)
    run_example(world, example, args)
    world.barrier()
finalize()
