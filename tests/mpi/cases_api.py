"""The public API (mpipar.init, Pipeline, batches, Trainer, user tensor-parallel modules) on 1, 2,
4 and 8 ranks against single-process training of the same nn.Sequential, seed and batches
(torch.testing.assert_close on every rank: each replica and each gathered tensor-parallel shard).
The cases (tests/mpi/api_case.py) cover every pipeline schedule, uneven micro-batches (30 into 4)
and uneven data-parallel shards (31 over 2) with a short last batch, pp x dp with a map-style
Dataset read by DataLoader workers, pp x dp x tp with a user's own module holding column/row-
parallel layers, and pp x dp under ZeRO stage 3 (pipe.make_optimizer). All cases of one rank count
share one mpirun job; tests/test_api.py shows the tolerance would catch a wrong weighting."""
import os

import pytest
import torch

from api_case import CASES, reference, train

NP = (1, 2, 4, 8)
TIMEOUT = 240
QUICK = {4: ("test_public_api_equals_single_process",)}


def _size() -> int:
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if var in os.environ:
            return int(os.environ[var])
    from mpi4py import MPI
    return MPI.COMM_WORLD.Get_size()


@pytest.mark.parametrize("case", [c for c, spec in CASES.items() if spec[0] == _size()])
def test_public_api_equals_single_process(world, case):
    got, want = train(case, world), reference(case)
    assert set(got) <= set(want) and got, (sorted(got), sorted(want))
    for k, v in got.items():
        torch.testing.assert_close(v, want[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{case} rank {world.rank}: {k}: {m}")
    names = world.comm.allgather(sorted(got))      # every layer is on some rank
    assert set().union(*map(set, names)) == set(want), (names, sorted(want))
