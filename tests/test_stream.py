"""The streaming phase of the temperature LSTMs: the timestamped stream generator, the prequential
loop's order (forecast before the truth is learnt), the stream fed exactly like the test windows.
The 2-rank runs (pipeline and data parallel) whose stream line, plot and saved forecasts show that
online updates happen and that forecasts precede them run in one shared mpirun job:
tests/mpi/cases_stream.py."""
from __future__ import annotations

import argparse
import importlib.util
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mpipar.app.datasets.stream import groups, prequential, stream
from mpipar.app.datasets.temperature import load_temperature_stream
from mpipar.errors import ConfigError
from mpipar.app.registry import path_of


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
