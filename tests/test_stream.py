"""The streaming phase of the temperature LSTMs: the timestamped stream generator, the prequential
loop's order (forecast before the truth is learnt), the stream fed exactly like the test windows,
and 2-rank runs (pipeline and data parallel) whose stream line, plot and saved forecasts show that
online updates happen and that forecasts precede them."""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mpipar.app.datasets.stream import groups, prequential, stream
from mpipar.app.datasets.temperature import load_temperature_stream
from mpipar.errors import ConfigError
from mpipar.app.registry import path_of
from mpirun import mpirun


def example_module():
    spec = importlib.util.spec_from_file_location("viz_mp_lstm_temperature_case", path_of("viz-mp-lstm-temperature"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# -- the generator --------------------------------------------------------------------------------
def test_stream_yields_past_window_and_next_value_in_time_order():
    values = torch.arange(20, dtype=torch.float32) * 0.5
    ts = 1000 + 3600 * torch.arange(20, dtype=torch.int64)
    got = list(stream(values, ts, window=3, start=5))
    assert [t for t, _, _ in got] == [int(ts[i]) for i in range(5, 20)]       # starts where asked, in order
    assert all(a < b for (a, _, _), (b, _, _) in zip(got, got[1:]))
    for i, (t, past, nxt) in zip(range(5, 20), got):
        assert torch.equal(past, values[i - 3:i]) and nxt == float(values[i])
    assert len(list(stream(values, ts, 3, 5, 9))) == 4                          # stop is exclusive
    assert [t for t, _, _ in stream(values, ts, 4)][0] == int(ts[4])            # default: first full window
    with pytest.raises(ValueError):
        list(stream(values, ts, 3, start=2))                                    # no full window behind
    with pytest.raises(ValueError):
        list(stream(values, ts[:-1], 3))


def test_stream_on_the_nab_series_matches_the_test_windows():
    """The stream starts at the first test reading and, converted by the example, gives exactly the
    test windows and targets the epochs evaluate on."""
    mod = example_module()
    args = argparse.Namespace(data_dir=None, series="ambient_temperature_system_failure", window=24)
    _, test = mod.data(args)
    ts, values = load_temperature_stream()
    start = int(test.meta["target_index"][0])
    assert start == int(len(values) * 0.8)
    readings = list(stream(values, ts, 24, start))
    assert len(readings) == len(test.x)
    assert readings[0][0] == int(ts[start])
    assert all(np.diff([t for t, _, _ in readings]) > 0)
    s = mod.stream_inputs(readings[:300], test)
    assert torch.equal(s.x, test.x[:300]) and torch.equal(s.y, test.y[:300])


# -- the prequential loop -------------------------------------------------------------------------
def test_prequential_forecasts_each_batch_before_learning_from_it():
    calls, model = [], {"w": 0}

    def forecast(x):
        calls.append(("forecast", x))
        return model["w"]

    def learn(x, y, step, steps):
        calls.append(("learn", x, y, step, steps))
        model["w"] += 1

    batches = [(i, f"truth{i}") for i in range(4)]
    out = prequential(batches, forecast, learn)
    assert out == [0, 1, 2, 3]                       # batch k is forecast after k updates
    assert calls == [("forecast", 0), ("learn", 0, "truth0", 0, 3), ("forecast", 1), ("learn", 1, "truth1", 1, 3),
                     ("forecast", 2), ("learn", 2, "truth2", 2, 3), ("forecast", 3)]   # the last: not learnt
    assert [len(g) for g in groups(range(10), 4)] == [4, 4, 2]


def test_stream_flags_checked_and_zero_skips():
    mod = example_module()
    trainer = SimpleNamespace(topo=SimpleNamespace(grid=SimpleNamespace(dp=2)))
    ok = argparse.Namespace(stream_steps=10, online_batch=2, online_lr=3e-4)
    mod.check_stream(trainer, ok)
    for bad in (dict(online_batch=1), dict(stream_steps=-1), dict(online_lr=-1.0)):
        with pytest.raises(ConfigError):
            mod.check_stream(trainer, argparse.Namespace(**{**vars(ok), **bad}))
    assert mod.after_fit(None, None, None, argparse.Namespace(stream_steps=0), print) is None


# -- 2-rank runs ----------------------------------------------------------------------------------
SHORT = ["--epochs", "1", "--steps", "3", "--hidden", "8", "--depth", "2", "--stream-steps", "40",
         "--online-batch", "4"]
LINE = re.compile(r"^stream: (\d+) readings from (\S+ \S+) to (\S+ \S+), online forecast RMSE (\S+) vs last-value "
                  r"(\S+) \((\S+)x\), frozen model (\S+) \((\d+) online steps", re.M)


def run(tmp_path, name, *extra):
    p = mpirun(2, "-m", "mpipar.run", name, *SHORT, *extra, "--out", str(tmp_path), timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    m = LINE.search(p.stdout)
    assert m, p.stdout[-2000:]
    rec = json.loads((tmp_path / "stream.json").read_text())
    assert (tmp_path / "stream.png").stat().st_size > 10_000
    return m, rec, p.stdout


def rmse(a, b):
    return math.sqrt(np.mean((np.array(a) - np.array(b)) ** 2))


@pytest.fixture(scope="module")
def mp_run(tmp_path_factory):
    return run(tmp_path_factory.mktemp("mp"), "viz-mp-lstm-temperature")


def test_mp_stream_line_plot_and_online_updates(mp_run):
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


def test_dp_stream_shares_each_online_batch_like_one_replica(tmp_path, mp_run):
    """Two replicas, each training on half of every online batch (gradients averaged), make the same
    online forecasts as the pipeline training on the whole batch, up to float rounding."""
    _, mp, _ = mp_run
    _, dp, _ = run(tmp_path, "viz-dp-lstm-temperature", "--batch-size", "64")
    assert dp["actual"] == mp["actual"] and dp["frozen"][:4] == dp["online"][:4]
    np.testing.assert_allclose(dp["frozen"], mp["frozen"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(dp["online"], mp["online"], rtol=0, atol=1e-3)
    assert dp["online"] != dp["frozen"]


def test_learning_rate_zero_gives_the_frozen_forecasts_exactly(tmp_path):
    _, rec, _ = run(tmp_path, "viz-mp-lstm-temperature", "--online-lr", "0")
    assert rec["online_lr"] == 0 and rec["updates"] == 9
    assert rec["online"] == rec["frozen"] and rec["rmse_online"] == rec["rmse_frozen"]
