"""The streaming phase of the temperature LSTMs on 2 ranks, in one mpirun job: each run parses the
command line as `python -m mpipar.run` does and runs it on this job's World; rank 0 checks the
stream line it printed, the plot and the saved forecasts (online updates happen, forecasts precede
them; data parallel makes the pipeline's forecasts; --online-lr 0 gives the frozen model's).
(Moved from tests/test_stream.py, which keeps the generator and prequential-loop checks.)"""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

import job


NP = (2,)
TIMEOUT = 240
QUICK = {2: ("test_mp_stream_line_plot_and_online_updates",)}

torch.set_num_threads(1)
SHORT = ["--epochs", "1", "--steps", "3", "--hidden", "8", "--depth", "2", "--stream-steps", "40",
         "--online-batch", "4"]
LINE = re.compile(r"^stream: (\d+) readings from (\S+ \S+) to (\S+ \S+), online forecast RMSE (\S+) vs last-value "
                  r"(\S+) \((\S+)x\), frozen model (\S+) \((\d+) online steps", re.M)


def shared_dir(world, tmp_path_factory, name):
    """A new folder every rank sees (rank 0's, broadcast)."""
    from mpi4py import MPI
    path = str(tmp_path_factory.mktemp(name)) if world.rank == 0 else None
    from pathlib import Path
    return Path(MPI.COMM_WORLD.bcast(path, root=0))


def run(world, out, name, *extra):
    """Run the example on `world` (`--out out`); on rank 0 return (the stream line's match, stream.json,
    what it printed), on the other ranks None."""
    stdout = job.run(world, [name, *SHORT, *extra, "--out", str(out)])
    if world.rank != 0:
        return None
    m = LINE.search(stdout)
    assert m, stdout[-2000:]
    rec = json.loads((out / "stream.json").read_text())
    assert (out / "stream.png").stat().st_size > 10_000
    return m, rec, stdout


def rmse(a, b):
    return math.sqrt(np.mean((np.array(a) - np.array(b)) ** 2))


@pytest.fixture(scope="module")
def mp_run(world, tmp_path_factory):
    return run(world, shared_dir(world, tmp_path_factory, "mp"), "viz-mp-lstm-temperature")


def test_mp_stream_line_plot_and_online_updates(world, mp_run):
    if world.rank != 0:
        return
    m, rec, out = mp_run
    assert int(m.group(1)) == rec["readings"] == 40 and int(m.group(8)) == rec["updates"] == 9
    assert all(a < b for a, b in zip(rec["timestamp"], rec["timestamp"][1:]))
    assert rmse(rec["online"], rec["actual"]) == pytest.approx(rec["rmse_online"])
    assert rmse(rec["last_value"], rec["actual"]) == pytest.approx(rec["rmse_last_value"])
    assert float(m.group(4)) == pytest.approx(rec["rmse_online"], abs=6e-4)
    assert float(m.group(5)) == pytest.approx(rec["rmse_last_value"], abs=6e-4)
    assert float(m.group(7)) == pytest.approx(rec["rmse_frozen"], abs=6e-4)
    # the first group is forecast before any online update: exactly the frozen model's forecasts;
    # later groups come from an updated model
    assert rec["online"][:4] == rec["frozen"][:4]
    assert rec["online"][4:] != rec["frozen"][4:] and rec["rmse_online"] != rec["rmse_frozen"]
    assert "stream RMSE" in next(ln for ln in out.splitlines() if ln.startswith("summary:"))


def test_dp_stream_shares_each_online_batch_like_one_replica(world, mpi_tmp_path, mp_run):
    """Two replicas, each training on half of every online batch (gradients averaged), make the same
    online forecasts as the pipeline training on the whole batch, up to float rounding."""
    ran = run(world, mpi_tmp_path, "viz-dp-lstm-temperature", "--batch-size", "64")
    if ran is None:
        return
    _, mp, _ = mp_run
    _, dp, _ = ran
    assert dp["actual"] == mp["actual"] and dp["frozen"][:4] == dp["online"][:4]
    np.testing.assert_allclose(dp["frozen"], mp["frozen"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(dp["online"], mp["online"], rtol=0, atol=1e-3)
    assert dp["online"] != dp["frozen"]


def test_learning_rate_zero_gives_the_frozen_forecasts_exactly(world, mpi_tmp_path):
    ran = run(world, mpi_tmp_path, "viz-mp-lstm-temperature", "--online-lr", "0")
    if ran is None:
        return
    _, rec, _ = ran
    assert rec["online_lr"] == 0 and rec["updates"] == 9
    assert rec["online"] == rec["frozen"] and rec["rmse_online"] == rec["rmse_frozen"]
