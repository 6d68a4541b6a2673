"""An MIT-BIH record (100 is shipped) cut into per-beat windows, for the ECG anomaly-detection examples."""
from __future__ import annotations

import warnings

import numpy as np
import torch

from .common import Split, data_dir_for, fail, need_file, need, why

RECORD = "100"   # the record shipped in examples/data/ecg; any other MIT-BIH record name works with its files
LEAD = "MLII"
# WFDB beat annotation codes; everything else ('+', '~', '|', ...) marks rhythm/noise, not a beat.
BEATS = set("NLRBAaJSVrFejnE/fQ?")


def load_ecg_beats(data_dir=None, window: tuple[int, int] = (90, 110), record: str = RECORD) -> Split:
    """All beats of MIT-BIH `record` (e.g. "100", "208"): x float32 [N, before+after] (lead MLII, each window z-scored),
    y int64 (0 = normal 'N', 1 = any other beat type). Beats too close to either end are skipped.
    meta: symbols, r_peaks (sample index), fs. Use split_normal_train() for train/test."""
    wfdb = need("wfdb", "ecg data")
    d = data_dir_for("ecg", data_dir)
    record = str(record)
    if not record.isalnum():
        raise ValueError(f"MIT-BIH record names are like 100 or 208, got {record!r}")
    files = f"{record}.hea, {record}.dat and {record}.atr"
    for ext in ("hea", "dat", "atr"):
        need_file("ecg", d / f"{record}.{ext}", f"MIT-BIH record {record} ({files})",
                  f"pass --data-dir pointing at a folder with MIT-BIH {files}")
    before, after = window
    if before < 0 or after < 1:
        raise ValueError(f"window must be (before >= 0, after >= 1) samples, got {window}")
    try:
        with warnings.catch_warnings():  # wfdb 4.3 trips pandas deprecation warnings
            warnings.simplefilter("ignore")
            rec = wfdb.rdrecord(str(d / record))
            ann = wfdb.rdann(str(d / record), "atr")
        if LEAD not in rec.sig_name:
            raise ValueError(f"no lead {LEAD} (leads {', '.join(rec.sig_name)})")
        sig = rec.p_signal[:, rec.sig_name.index(LEAD)].astype(np.float64)
    except Exception as e:
        raise fail("ecg", f"garbled record {d / record} ({why(e)})",
                   f"restore the original {files}") from None
    if not np.isfinite(sig).all() or len(sig) < before + after:
        raise fail("ecg", f"garbled record {d / record} (signal has NaNs or is too short)",
                   f"restore the original {files}")
    keep = [(int(s), sym) for s, sym in zip(ann.sample, ann.symbol)
            if sym in BEATS and s - before >= 0 and s + after <= len(sig)]
    if not keep:
        raise fail("ecg", f"no beat annotations in {d / record}.atr", f"restore the original {record}.atr")
    peaks = np.array([s for s, _ in keep])
    x = np.stack([sig[s - before:s + after] for s in peaks])
    x = (x - x.mean(1, keepdims=True)) / (x.std(1, keepdims=True) + 1e-6)
    symbols = [sym for _, sym in keep]
    y = np.array([0 if sym == "N" else 1 for sym in symbols], dtype=np.int64)
    note = (f"MIT-BIH record {record} lead {LEAD}: {len(y)} beats ({int((y == 0).sum())} normal, "
            f"{int(y.sum())} abnormal), windows of {before}+{after} samples at {rec.fs} Hz, z-scored")
    return Split(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y), note,
                 {"symbols": symbols, "r_peaks": torch.from_numpy(peaks), "fs": rec.fs})


def split_normal_train(split: Split, test_fraction: float = 0.3, seed: int = 0) -> tuple[Split, Split]:
    """(train, test) for anomaly detection: train holds only normal beats; test holds the other
    `test_fraction` of normal beats (random, from `seed`) plus every abnormal beat."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    normal = torch.nonzero(split.y == 0).flatten()
    perm = normal[torch.randperm(len(normal), generator=torch.Generator().manual_seed(seed))]
    n_test = int(round(len(normal) * test_fraction))
    tr = perm[n_test:].sort().values
    te = torch.cat([perm[:n_test], torch.nonzero(split.y != 0).flatten()]).sort().values

    def part(idx, what):
        note = f"{split.note}; {what}: {len(idx)} beats, {int(split.y[idx].sum())} abnormal"
        meta = {"index": idx, "symbols": [split.meta["symbols"][i] for i in idx.tolist()]}
        return Split(split.x[idx], split.y[idx], note, meta)

    return part(tr, "normal-only train"), part(te, f"mixed test (seed {seed})")
