"""CIFAR-10 for the CNN examples: the shipped 10,000 real test JPEGs, or the official python batches."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from .common import Split, data_dir_for, fail, interleave_classes, load_arrays_pickle, stratified_test_mask, why

CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck"]
MEAN = (0.4914, 0.4822, 0.4465)  # per-channel statistics of the CIFAR-10 training set
STD = (0.2470, 0.2435, 0.2616)
PACKED = "cifar10_test_jpeg.npz"
EXPECTED = ("expected data_batch_1..5 and test_batch as in cifar-10-python.tar.gz, "
            f"an image folder <class>/*.jpg|png, or {PACKED}")
FIX = "pass --data-dir pointing at cifar-10-batches-py"


def normalise(x_u8: np.ndarray) -> torch.Tensor:
    """uint8 [N,3,32,32] -> float32, per-channel standardised with the CIFAR-10 constants."""
    x = torch.from_numpy(np.ascontiguousarray(x_u8)).float().div_(255.0)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def read_python_batch(path) -> tuple[np.ndarray, np.ndarray]:
    """One cifar-10-batches-py file -> (uint8 [N,3,32,32], int64 [N])."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            d = load_arrays_pickle(f)   # the official format is pickle: arrays, lists, bytes, dicts only
        data = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
    except FileNotFoundError:
        raise fail("cifar10", f"missing file {path} ({EXPECTED})", FIX) from None
    except Exception as e:  # unpickling, key or reshape problems all mean a garbled file
        raise fail("cifar10", f"garbled batch file {path} ({why(e)})",
                   "re-extract cifar-10-python.tar.gz") from None
    if len(labels) != len(data) or (len(labels) and not 0 <= labels.min() <= labels.max() < 10):
        raise fail("cifar10", f"garbled batch file {path} ({len(data)} images, {len(labels)} labels)",
                   "re-extract cifar-10-python.tar.gz")
    return data, labels


def _decode(blob: bytes, name) -> np.ndarray:
    from PIL import Image
    try:
        img = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
    except Exception as e:
        raise fail("cifar10", f"cannot decode image {name} ({e})", FIX) from None
    if img.shape != (32, 32, 3):
        raise fail("cifar10", f"image {name} is {img.shape[1]}x{img.shape[0]}, not 32x32", FIX)
    return img.transpose(2, 0, 1)


def read_image_folder(root) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """ImageFolder layout <class>/<name>.jpg|png -> (uint8 [N,3,32,32], int64 [N], relative names).

    Labels follow CLASSES when every folder is a CIFAR-10 class name, else sorted folder order."""
    root = Path(root)
    dirs = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    order = CLASSES if dirs and set(dirs) <= set(CLASSES) else dirs
    files = [(f, order.index(d)) for d in dirs for f in sorted((root / d).iterdir())
             if f.suffix.lower() in (".jpg", ".jpeg", ".png")]
    if not files:
        raise fail("cifar10", f"no images in {root} ({EXPECTED})", FIX)
    x = np.stack([_decode(f.read_bytes(), f) for f, _ in files])
    y = np.array([c for _, c in files], dtype=np.int64)
    return x, y, [f"{f.parent.name}/{f.name}" for f, _ in files]


def _packed(path: Path):
    """The shipped npz: JPEG bytes (unchanged) + offsets + labels. Decoding happens lazily."""
    try:
        with np.load(path, allow_pickle=False) as z:
            blob, off, y = z["jpeg"].tobytes(), z["offsets"], z["labels"].astype(np.int64)
    except Exception as e:
        raise fail("cifar10", f"garbled {path} ({why(e)})",
                   "restore it with git checkout or rebuild it with examples/data/pack.py") from None
    if len(off) != len(y) + 1 or off[-1] != len(blob):
        raise fail("cifar10", f"garbled {path} (offsets do not match)", "rebuild it with examples/data/pack.py")
    return y, (lambda idx: np.stack([_decode(blob[off[i]:off[i + 1]], f"{path}[{i}]") for i in idx]))


def _take(n, have: int, what: str) -> int:
    if n is None:
        return have
    if not 0 < n <= have:
        raise fail("cifar10", f"{what}={n} asked but {have} available", f"use {what} <= {have}")
    return n


def _split_80_20(y, decode, n_train, n_test, what):
    test = stratified_test_mask(y, 5)
    tr = interleave_classes(np.flatnonzero(~test), y)
    te = interleave_classes(np.flatnonzero(test), y)
    tr, te = tr[:_take(n_train, len(tr), "n_train")], te[:_take(n_test, len(te), "n_test")]
    note = f"{what}: {len(tr)} images for training, {len(te)} for evaluation (stratified 80/20 split)"
    return (Split(normalise(decode(tr)), torch.from_numpy(y[tr]), note, {"classes": CLASSES}),
            Split(normalise(decode(te)), torch.from_numpy(y[te]), note, {"classes": CLASSES}))


def load_cifar10(data_dir=None, n_train=None, n_test=None) -> tuple[Split, Split]:
    """(train, test) with x float32 [N,3,32,32] normalised, y int64 in 0..9; n_* take a balanced prefix."""
    d = data_dir_for("cifar10", data_dir)
    if (d / "cifar-10-batches-py").is_dir():
        d = d / "cifar-10-batches-py"
    if not d.is_dir():
        raise fail("cifar10", f"missing directory {d} ({EXPECTED})", FIX)
    if (d / PACKED).is_file():
        y, decode = _packed(d / PACKED)
        return _split_80_20(y, decode, n_train, n_test,
                            "CIFAR-10 shipped subset (real test images, JPEG re-encoded)")
    names = [f"data_batch_{i}" for i in range(1, 6)]
    if all((d / n).is_file() for n in names + ["test_batch"]):
        parts = [read_python_batch(d / n) for n in names]
        x_tr, y_tr = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        x_te, y_te = read_python_batch(d / "test_batch")
        a, b = _take(n_train, len(y_tr), "n_train"), _take(n_test, len(y_te), "n_test")
        note = f"CIFAR-10 python batches in {d}: {a} train, {b} test images"
        return (Split(normalise(x_tr[:a]), torch.from_numpy(y_tr[:a]), note, {"classes": CLASSES}),
                Split(normalise(x_te[:b]), torch.from_numpy(y_te[:b]), note, {"classes": CLASSES}))
    batches = sorted(d.glob("data_batch_*"))
    if batches:  # a partial copy such as the shipped data_batch_1_first200
        parts = [read_python_batch(p) for p in batches]
        x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        return _split_80_20(y, lambda idx: x[idx], n_train, n_test, f"CIFAR-10 partial batches in {d}")
    if any((d / c).is_dir() for c in CLASSES):
        x, y, _ = read_image_folder(d)
        return _split_80_20(y, lambda idx: x[idx], n_train, n_test, f"CIFAR-10 image folder {d}")
    raise fail("cifar10", f"no CIFAR-10 data in {d} ({EXPECTED})", FIX)
