"""Wearable-sensor activity data: BasicMotions raw IMU windows and WISDM phone-accelerometer features."""
from __future__ import annotations

import io
import re

import numpy as np
import torch

from .common import Split, data_dir_for, fail, need_file, why, need

ARFF = "WISDM_ar_v1.1_transformed.arff"
WISDM_CLASSES = ["Downstairs", "Jogging", "Sitting", "Standing", "Upstairs", "Walking"]
TEST_USER_EVERY = 5  # every 5th user id (sorted) is held out: test users are never seen in training


def _read_ts(path):
    """sktime/aeon .ts file (equal length, class label last) -> (float32 [N, C, L], labels, classes)."""
    need_file("accelerometer", path, "a BasicMotions .ts file (sktime/UEA format)",
              "pass --data-dir pointing at the folder holding BasicMotions_TRAIN.ts and BasicMotions_TEST.ts")
    classes, rows, labels = None, [], []
    try:
        lines = path.read_text().splitlines()
        body = False
        for line in lines:
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            if s.lower().startswith("@classlabel"):
                classes = s.split()[2:]
            elif s.lower() == "@data":
                body = True
            elif body:
                *dims, label = s.split(":")
                rows.append([[float(v) for v in dim.split(",")] for dim in dims])
                labels.append(label)
        x = np.array(rows, dtype=np.float32)
        y = np.array([classes.index(lab) for lab in labels], dtype=np.int64)
    except Exception as e:
        raise fail("accelerometer", f"garbled .ts file {path} ({why(e)})",
                   "restore the original BasicMotions .ts files") from None
    if x.ndim != 3 or len(x) == 0:
        raise fail("accelerometer", f"garbled .ts file {path} (no equal-length cases)",
                   "restore the original BasicMotions .ts files")
    return x, y, classes


def load_basicmotions(data_dir=None) -> tuple[Split, Split]:
    """(train, test): x float32 [40, 6, 100] (acc xyz, gyro xyz at 10 Hz, raw units), y int64 in 0..3."""
    d = data_dir_for("accelerometer", data_dir)
    if (d / "basicmotions").is_dir():
        d = d / "basicmotions"
    x_tr, y_tr, classes = _read_ts(d / "BasicMotions_TRAIN.ts")
    x_te, y_te, classes_te = _read_ts(d / "BasicMotions_TEST.ts")
    if classes != classes_te or x_tr.shape[1:] != x_te.shape[1:]:
        raise fail("accelerometer", f"BasicMotions TRAIN and TEST in {d} disagree on classes or shape",
                   "restore the original BasicMotions .ts files")
    note = (f"BasicMotions smartwatch IMU: {len(x_tr)} train / {len(x_te)} test cases, "
            f"{x_tr.shape[1]} channels x {x_tr.shape[2]} samples, classes {', '.join(classes)}")
    meta = {"classes": classes}
    return (Split(torch.from_numpy(x_tr), torch.from_numpy(y_tr), note, meta),
            Split(torch.from_numpy(x_te), torch.from_numpy(y_te), note, dict(meta)))


def load_wisdm(data_dir=None) -> tuple[Split, Split]:
    """(train, test) of WISDM v1.1 window features: x float32 [N, 43], y int64 in 0..5 (WISDM_CLASSES).

    Split by user (test = every 5th user id, sorted); features standardised with train statistics,
    missing values ('?', only in the *PEAK columns) set to the train mean, i.e. 0 after scaling."""
    pd = need("pandas", "accelerometer data")
    d = data_dir_for("accelerometer", data_dir)
    for sub in ("wisdm", "wisdm_v1.1"):
        d = d / sub if (d / sub).is_dir() else d
    path = need_file("accelerometer", d / ARFF, "the WISDM v1.1 ARFF of transformed features",
                     f"pass --data-dir pointing at the folder holding {ARFF}")
    try:
        text = path.read_text()
        names = re.findall(r'^@attribute\s+"?([^"\s]+)"?', text, flags=re.M | re.I)
        start = re.search(r"^@data\s*$", text, flags=re.M | re.I)
        if start is None:
            raise ValueError("no @data line")
        body = text[start.end():]
        # the 'user' attribute has no type, so scipy.io.arff refuses this file: parse @data directly
        df = pd.read_csv(io.StringIO(body), header=None, names=names, na_values="?")
        feats = df.drop(columns=["UNIQUE_ID", "user", "class"]).to_numpy(dtype=np.float64)
        users = np.array(df["user"], dtype=np.int64)
        y = np.array([WISDM_CLASSES.index(c) for c in df["class"]], dtype=np.int64)
    except Exception as e:
        raise fail("accelerometer", f"garbled WISDM ARFF {path} ({why(e)})",
                   "restore the original WISDM_ar_v1.1_transformed.arff") from None
    test_users = np.unique(users)[TEST_USER_EVERY - 1::TEST_USER_EVERY]
    te = np.isin(users, test_users)
    mean, std = np.nanmean(feats[~te], 0), np.nanstd(feats[~te], 0)
    x = np.nan_to_num((feats - mean) / np.where(std > 0, std, 1.0)).astype(np.float32)
    note = (f"WISDM v1.1 phone accelerometer, 43 features per 10 s window: {int((~te).sum())} train "
            f"windows ({len(np.unique(users)) - len(test_users)} users) / {int(te.sum())} test windows "
            f"(unseen users {', '.join(map(str, test_users))})")
    meta = {"classes": WISDM_CLASSES, "test_users": test_users.tolist()}
    x, y, users = torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(users)
    tr, te = torch.from_numpy(~te), torch.from_numpy(te)
    return (Split(x[tr], y[tr], note, {**meta, "users": users[tr]}),
            Split(x[te], y[te], note, {**meta, "users": users[te]}))
