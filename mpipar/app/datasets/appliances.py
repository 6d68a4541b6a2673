"""UCI Appliances energy (10-minute household readings) as windows for the forecasting examples."""
from __future__ import annotations

import numpy as np
import torch

from .common import Split, chrono_windows, data_dir_for, fail, need_file, why, need

FILE = "energydata_complete.csv.gz"
TARGET = "Appliances"
DROP = ("date", "rv1", "rv2")  # rv1/rv2 are random noise columns the dataset's authors added on purpose


def _clock(dates) -> np.ndarray:
    """[T, 4]: sin/cos of the time of day and of the day of the week, from the date column."""
    pd = need("pandas", "appliances data")
    t = pd.DatetimeIndex(pd.to_datetime(dates, format="%Y-%m-%d %H:%M:%S"))
    day = (t.hour.to_numpy() * 60 + t.minute.to_numpy()) / 1440.0
    week = (t.dayofweek.to_numpy() + day) / 7.0
    return np.stack([np.sin(2 * np.pi * day), np.cos(2 * np.pi * day),
                     np.sin(2 * np.pi * week), np.cos(2 * np.pi * week)], 1)


def _read_table(dataset: str, d, clock: bool = False):
    pd = need("pandas", "appliances data")
    path = d / FILE if (d / FILE).is_file() or not (d / FILE[:-3]).is_file() else d / FILE[:-3]
    need_file(dataset, path, "the UCI Appliances energy CSV energydata_complete.csv(.gz)",
              "pass --data-dir pointing at the folder holding energydata_complete.csv.gz")
    try:
        df = pd.read_csv(path)
        feats = df.drop(columns=[c for c in DROP if c in df.columns])
        cols = [TARGET] + [c for c in feats.columns if c != TARGET]  # target is feature 0
        values = feats[cols].to_numpy(dtype=np.float64)
        if clock:
            values = np.concatenate([values, _clock(df["date"])], 1)
            cols = cols + ["day_sin", "day_cos", "week_sin", "week_cos"]
    except Exception as e:
        raise fail(dataset, f"garbled {path} ({why(e)})",
                   "restore the original energydata_complete.csv.gz") from None
    if values.ndim != 2 or len(values) < 100 or np.isnan(values).any():
        raise fail(dataset, f"garbled {path} (shape {values.shape}, or missing values)",
                   "restore the original energydata_complete.csv.gz")
    return values, cols


def load_appliances(data_dir=None, window: int = 24, horizon: int = 1, clock: bool = False) -> tuple[Split, Split]:
    """(train, test): x float32 [N, window, 26], y float32 [N, 1] = Appliances at t+horizon.

    Chronological split (targets in the first 80% of time are train). Features and target are
    standardised with train statistics; meta has y_mean / y_std (Wh) to undo it, and columns.
    clock: 4 more features, time of day and day of week as sin/cos (from the date column: household
    use follows the clock, which the sensor readings only hint at)."""
    d = data_dir_for("appliances", data_dir)
    values, cols = _read_table("appliances", d, clock)
    x_tr, y_tr, x_te, y_te, st = chrono_windows(values, values[:, 0], window, horizon)
    note = (f"UCI Appliances energy: {len(x_tr)} train / {len(x_te)} test windows of {window} x 10 min, "
            f"{len(cols)} features, target Appliances (Wh) {horizon} step(s) ahead, chronological 80/20")
    meta = {"y_mean": st["y_mean"], "y_std": st["y_std"], "columns": cols, "target_feature": 0,
            "window": window, "horizon": horizon}
    tgt = st["target_index"]
    return (Split(torch.from_numpy(x_tr), torch.from_numpy(y_tr), note,
                  {**meta, "target_index": torch.from_numpy(tgt[tgt < st["split_index"]])}),
            Split(torch.from_numpy(x_te), torch.from_numpy(y_te), note,
                  {**meta, "target_index": torch.from_numpy(tgt[tgt >= st["split_index"]])}))


def rmse_wh(split: Split, pred: torch.Tensor) -> float:
    """RMSE in Wh of standardised predictions `pred` [N, 1] against `split.y`."""
    err = (pred.detach().float().reshape(split.y.shape) - split.y) * split.meta["y_std"]
    return float(err.pow(2).mean().sqrt())


def persistence_rmse(split: Split) -> float:
    """Baseline RMSE in Wh: predict the last observed Appliances value for t+horizon."""
    return rmse_wh(split, split.x[:, -1, split.meta["target_feature"]].unsqueeze(1))
