"""The public API (mpipar.init, Pipeline, batches, Trainer, user tensor-parallel modules) on 1, 2,
4 and 8 ranks, one case per run, against single-process training of the same nn.Sequential, seed
and batches (torch.testing.assert_close). Cases cover every pipeline schedule, uneven
micro-batches (30 into 4) and uneven data-parallel shards (31 over 2) with a short last batch,
pp x dp with a map-style Dataset read by DataLoader workers, and pp x dp x tp with a user's own
module holding column/row-parallel layers, and pp x dp under ZeRO stage 3 (pipe.make_optimizer). The
runs are tests/mpi/api_case.py."""
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from mpirun import MPI_DIR, run_script

pytestmark = pytest.mark.timeout(200)
spec = importlib.util.spec_from_file_location("api_case", MPI_DIR / "api_case.py")
case_mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(case_mod)


def reference(case: str) -> dict:
    """Single-process training: whole batches in the order mpipar.batches walks them."""
    from mpipar.train.batches import epoch_batches
    from mpipar.train.reference import train_reference
    from mpipar.train.trainer import TrainConfig
    _, _, schedule, _, _, batch, _ = case_mod.CASES[case]
    model = case_mod.tp_reference_model() if case.endswith("user-tp") else case_mod.reference_model()
    opt = torch.optim.SGD(model.parameters(), lr=case_mod.LR)
    x, y = case_mod.data()
    if schedule == "pipedream":   # the 2BW rule, the oracle of train/reference.py
        cfg = TrainConfig(epochs=case_mod.STEPS_EPOCHS, batch_size=batch, seed=0, task="regression")
        split = type("S", (), {"x": x, "y": y})
        return train_reference(model, nn.MSELoss(), opt, split, cfg, two_bw=True).state_dict()
    for epoch in range(case_mod.STEPS_EPOCHS):
        for idx in epoch_batches(len(x), batch, 0, epoch):
            opt.zero_grad()
            nn.functional.mse_loss(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.state_dict()


@pytest.mark.parametrize("case", list(case_mod.CASES))
def test_public_api_equals_single_process(tmp_path, case):
    ranks = case_mod.CASES[case][0]
    run_script(ranks, "api_case.py", str(tmp_path), case, timeout=180)
    files = sorted(tmp_path.glob("params-*.pt"))
    assert len(files) == ranks, [f.name for f in files]
    want, got = reference(case), {}
    for f in files:   # every rank: each replica and each (gathered) tensor-parallel shard
        mine = torch.load(f, weights_only=True)
        got.update(mine)
        for k, v in mine.items():
            torch.testing.assert_close(v, want[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{case} {f.name}: {k}: {m}")
    assert set(got) == set(want), (sorted(got), sorted(want))


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
