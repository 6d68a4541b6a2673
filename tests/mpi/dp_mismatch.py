"""Rank 1 builds a wider first layer than the others: DataParallel's layout check must end the
whole job with one line naming the ranks and their layouts (the uncaught ReplicaMismatchError
goes through mpipar's failure discipline), not hang. Launched by tests/test_dp.py."""
from mpipar.comm import World, failure
from mpipar.data_parallel import DataParallel

from cases_dp import cnn   # same directory: the CNN of the data-parallel cases

world = World()
failure.install(world.host)
DataParallel(cnn(wide=9 if world.rank == 1 else 8), world)
raise AssertionError("mismatched models were accepted")
