"""Shared pieces of the dataset loaders: the Split container, path lookup, one-line errors, and
a pickle reader that builds only arrays and plain containers."""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ...errors import DataError
from .. import places
from ...extras import need  # noqa: F401  (the loaders' optional imports: one line naming the extra)



@dataclass
class Split:
    """One split of a dataset: inputs, targets, one human line saying what it is, extra facts."""

    x: torch.Tensor
    y: torch.Tensor
    note: str
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.x.shape[0])




def data_dir_for(dataset: str, data_dir) -> Path:
    """`data_dir` as a Path; when it is None, $MPIPAR_DATA/<dataset> or the shipped copy
    examples/data/<dataset> (places.data_dir)."""
    return places.data_dir(dataset) if data_dir is None else Path(data_dir).expanduser()


def fail(dataset: str, problem: str, fix: str) -> DataError:
    """A one-line DataError: '<dataset>: <problem>; <fix>'."""
    return DataError(" ".join(f"{dataset}: {problem}; {fix}".split()))


def why(e: Exception) -> str:
    """A short one-line account of an exception raised while parsing a file."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:117] + '...' if len(text) > 120 else text}"


class ArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays, dicts, lists, bytes, strings and numbers only: a data file is not
    trusted code, and any other global a pickle names (os.system, a class's constructor) is
    refused before it can run. What numpy 1.x and 2.x write for an array, at any protocol."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"the file names {module}.{name}: only arrays, lists, bytes and dicts "
                                         f"belong in a data file (refused without running it)")
        return super().find_class(module, name)


def load_arrays_pickle(f, encoding: str = "bytes"):
    """pickle.load(f) through ArraysOnly (encoding='bytes': Python 2 pickles keep bytes keys)."""
    return ArraysOnly(f, encoding=encoding).load()


def need_file(dataset: str, path: Path, what: str, fix: str | None = None) -> Path:
    """Return `path` if it is a file, else raise a DataError naming it and saying what it should be."""
    if path.is_file():
        return path
    fix = fix or f"pass --data-dir pointing at a folder with {path.name}"
    if not path.parent.is_dir():
        raise fail(dataset, f"missing directory {path.parent} (expected {path.name}: {what})", fix)
    raise fail(dataset, f"missing file {path} (expected {what})", fix)


def stratified_test_mask(y: np.ndarray, test_every: int = 5) -> np.ndarray:
    """Deterministic stratified split: within each class (in given order) every `test_every`-th item is test."""
    mask = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        mask[idx[test_every - 1::test_every]] = True
    return mask


def interleave_classes(idx: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Reorder `idx` round-robin over classes so that any prefix is (nearly) class-balanced."""
    rank = np.empty(len(idx), dtype=np.int64)
    for c in np.unique(y[idx]):
        pos = np.flatnonzero(y[idx] == c)
        rank[pos] = np.arange(len(pos))
    return idx[np.lexsort((y[idx], rank))]


def chrono_windows(feats: np.ndarray, target: np.ndarray, window: int, horizon: int,
                   train_fraction: float = 0.8):
    """Sliding windows over a [T, F] series, standardised with statistics of the first part only.

    x[i] = feats[t-window+1 .. t], y[i] = target[t+horizon]. A window is train if its target index
    is < split = int(T * train_fraction), else test (test inputs may reach back into train time; no
    test target is ever seen in training). Returns (x_tr, y_tr, x_te, y_te, stats) as numpy arrays.
    """
    if window < 1 or horizon < 1:
        raise ValueError(f"window and horizon must be >= 1, got {window}, {horizon}")
    T = len(feats)
    split = int(T * train_fraction)
    if split - window - horizon + 1 < 1 or T - split < 1:
        raise ValueError(f"series of {T} steps too short for window={window}, horizon={horizon}")
    mean, std = feats[:split].mean(0), feats[:split].std(0)
    std = np.where(std > 0, std, 1.0)
    y_mean, y_std = float(target[:split].mean()), float(target[:split].std() or 1.0)
    f = ((feats - mean) / std).astype(np.float32)
    t = ((target - y_mean) / y_std).astype(np.float32)
    tgt = np.arange(window - 1 + horizon, T)  # target index of each window
    x = np.lib.stride_tricks.sliding_window_view(f, window, axis=0)  # [T-window+1, F, window]
    x = x[: len(tgt)].transpose(0, 2, 1)
    y = t[tgt][:, None]
    tr = tgt < split
    stats = {"x_mean": mean, "x_std": std, "y_mean": y_mean, "y_std": y_std,
             "split_index": split, "target_index": tgt}
    return (np.ascontiguousarray(x[tr]), y[tr], np.ascontiguousarray(x[~tr]), y[~tr], stats)
