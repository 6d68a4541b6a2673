"""The public API's parity cases run in tests/mpi/cases_api.py (every schedule, uneven
micro-batches and shards, a Dataset with workers, pp x dp x tp with a user's TP module, ZeRO 3);
here, in one process: their tolerance is tight enough to catch a wrong loss weighting."""
import importlib.util

import torch
from torch import nn

from mpirun import MPI_DIR

spec = importlib.util.spec_from_file_location("api_case", MPI_DIR / "api_case.py")
case_mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(case_mod)


def test_a_wrong_weighting_would_be_caught():
    """The cases can fail: 1/m micro-batch weights on an uneven split (30 into 4) move the
    parameters further than the tolerance above."""
    x, y = case_mod.data()
    torch.manual_seed(0)
    a, b = case_mod.reference_model(), case_mod.reference_model()
    xb, yb = x[:30], y[:30]
    nn.functional.mse_loss(a(xb), yb).backward()
    for xs, ys in zip(xb.tensor_split(4), yb.tensor_split(4)):
        (nn.functional.mse_loss(b(xs), ys) / 4).backward()
    diff = max(float((p.grad - q.grad).abs().max()) for p, q in zip(a.parameters(), b.parameters()))
    assert diff * case_mod.LR > 1e-5
