"""The public API (mpipar.init, Pipeline, batches, Trainer, user tensor-parallel modules) on 1, 2,
4 and 8 ranks against single-process training of the same nn.Sequential, seed and batches
(torch.testing.assert_close on every rank: each replica and each gathered tensor-parallel shard).
The cases (tests/mpi/api_case.py) cover every pipeline schedule, uneven micro-batches (30 into 4)
and uneven data-parallel shards (31 over 2) with a short last batch, pp x dp with a map-style
Dataset read by DataLoader workers, pp x dp x tp with a user's own module holding column/row-
parallel layers, and pp x dp under ZeRO stage 3 (pipe.make_optimizer). All cases of one rank count
share one mpirun job (the 8-rank one, tests/mpi/cases_parity.py's); tests/test_api.py shows the
tolerance would catch a wrong weighting."""
import pytest

from api_case import CASES, check
import job

NP = (1, 2, 4)     # the 8-rank case (pp x dp x tp, a user's TP module) shares cases_parity.py's 8-rank job
TIMEOUT = 240
QUICK = {4: ("test_public_api_equals_single_process",)}


@pytest.mark.parametrize("case", [c for c, spec in CASES.items() if spec[0] == job.size()])
def test_public_api_equals_single_process(world, case):
    check(case, world)
