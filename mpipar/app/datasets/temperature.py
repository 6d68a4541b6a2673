"""NAB industrial/office temperature streams (with labelled failure windows) for the streaming examples."""
from __future__ import annotations

import json

import numpy as np
import torch

from .common import Split, chrono_windows, data_dir_for, fail, need_file, why, need

SERIES = ("ambient_temperature_system_failure", "machine_temperature_system_failure")
FIX = "pass --data-dir pointing at the folder holding the NAB realKnownCause CSVs"


def load_temperature_stream(data_dir=None, series: str = "ambient_temperature_system_failure"):
    """(timestamps, values): int64 [T] seconds since 1970 (naive local time read as UTC), float32 [T]
    stably sorted by time (the machine series logs 02:00-02:55 on 2014-01-07 twice: both copies are
    kept). Other NAB series work too when their CSV is in data_dir."""
    pd = need("pandas", "temperature data")
    d = data_dir_for("temperature", data_dir)
    path = need_file("temperature", d / f"{series}.csv", f"the NAB series {series}.csv (timestamp,value)", FIX)
    try:
        df = pd.read_csv(path)
        ts = pd.to_datetime(df["timestamp"], format="%Y-%m-%d %H:%M:%S").to_numpy()
        ts = ts.astype("datetime64[s]").astype(np.int64)
        values = df["value"].to_numpy(dtype=np.float64)
    except Exception as e:
        raise fail("temperature", f"garbled {path} ({why(e)})",
                   f"restore the original NAB {series}.csv") from None
    if len(values) < 2 or not np.isfinite(values).all():
        raise fail("temperature", f"garbled {path} (fewer than 2 rows or non-numeric values)",
                   f"restore the original NAB {series}.csv")
    order = np.argsort(ts, kind="stable")
    return torch.from_numpy(ts[order]), torch.from_numpy(values[order].astype(np.float32))


def anomaly_windows(data_dir=None, series: str = "ambient_temperature_system_failure") -> torch.Tensor:
    """NAB's labelled anomaly windows for `series`: int64 [K, 2] (start, end) in seconds, inclusive."""
    d = data_dir_for("temperature", data_dir)
    path = need_file("temperature", d / "labels" / "combined_windows.json",
                     "NAB labels/combined_windows.json", FIX)
    try:
        wins = json.loads(path.read_text())[f"realKnownCause/{series}.csv"]
        arr = np.array(wins, dtype="datetime64[s]").reshape(-1, 2).astype(np.int64)
    except Exception as e:
        raise fail("temperature", f"garbled or incomplete {path} ({why(e)})",
                   "restore the original NAB combined_windows.json") from None
    return torch.from_numpy(arr)


def clock_features(seconds) -> torch.Tensor:
    """float32 [N, 4]: sin/cos of the time of day and of the day of the week of int64 `seconds`
    (since 1970, NAB's naive local time, so the hours are the building's own)."""
    t = torch.as_tensor(seconds, dtype=torch.int64)
    day = (t % 86400).double() / 86400
    week = ((t // 86400 + 3) % 7 + day) / 7          # 1970-01-01 was a Thursday: 0 = Monday 00:00
    d, w = 2 * np.pi * day, 2 * np.pi * week
    return torch.stack([d.sin(), d.cos(), w.sin(), w.cos()], 1).float()


def windows(values, window: int, horizon: int = 1, train_fraction: float = 0.8) -> tuple[Split, Split]:
    """(train, test) forecasting windows: x float32 [N, window, 1], y float32 [N, 1] = value at t+horizon.

    Standardised with mean/std of the first `train_fraction` of the series; a window is test when
    its target lies in the last part. meta: mean, std, target_index (position in `values`)."""
    v = np.asarray(torch.as_tensor(values, dtype=torch.float64)).reshape(-1, 1)
    x_tr, y_tr, x_te, y_te, st = chrono_windows(v, v[:, 0], window, horizon, train_fraction)
    tgt, cut = st["target_index"], st["split_index"]
    note = (f"temperature stream windows: {len(x_tr)} train / {len(x_te)} test, {window} steps in, "
            f"{horizon} ahead, standardised with the first {train_fraction:.0%}")
    meta = {"mean": st["y_mean"], "std": st["y_std"], "window": window, "horizon": horizon}
    return (Split(torch.from_numpy(x_tr), torch.from_numpy(y_tr), note,
                  {**meta, "target_index": torch.from_numpy(tgt[tgt < cut])}),
            Split(torch.from_numpy(x_te), torch.from_numpy(y_te), note,
                  {**meta, "target_index": torch.from_numpy(tgt[tgt >= cut])}))
