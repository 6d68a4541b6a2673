"""Rebuild examples/data/ from the offline dataset copies in shared/data (byte-reproducible).

Usage (from the repo root):  python examples/data/pack.py [--shared ../shared/data]
Copies the small files verbatim, packs the 10,000 CIFAR-10 test JPEGs into one npz
(their bytes, unchanged) and cuts a 4000-molecule QM9 subset. Prints the sha256 of
every shipped file, as listed in examples/data/README.md.
"""
import argparse
import gzip
import hashlib
import io
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
QM9_N = 4000

COPIES = {  # shipped path (under examples/data) -> source path (under shared/data)
    "cifar10/cifar-10-batches-py-first200/data_batch_1_first200":
        "cifar10/cifar-10-batches-py-first200/data_batch_1_first200",
    "cifar10/cifar-10-batches-py-first200/batches.meta": "cifar10/cifar-10-batches-py-first200/batches.meta",
    "appliances/energydata_complete.csv.gz": "appliances_energy/energydata_complete.csv.gz",
    **{f"cora/ind.cora.{s}": f"cora/raw/ind.cora.{s}"
       for s in ("x", "y", "tx", "ty", "allx", "ally", "graph", "test.index")},
    **{f"ecg/100.{s}": f"ecg_mitbih/100.{s}" for s in ("dat", "hea", "atr")},
    **{f"accelerometer/basicmotions/BasicMotions_{s}.ts": f"iot_accelerometer/basicmotions/BasicMotions_{s}.ts"
       for s in ("TRAIN", "TEST")},
    **{f"accelerometer/wisdm/{n}": f"iot_accelerometer/wisdm_v1.1/{n}"
       for n in ("WISDM_ar_v1.1_transformed.arff", "readme.txt",
                 "WISDM_ar_v1.1_raw_about.txt", "WISDM_ar_v1.1_trans_about.txt")},
    **{f"temperature/{n}.csv": f"iot_temperature_nab/{n}.csv"
       for n in ("ambient_temperature_system_failure", "machine_temperature_system_failure")},
    **{f"temperature/labels/{n}": f"iot_temperature_nab/labels/{n}"
       for n in ("combined_labels.json", "combined_windows.json")},
    **{f"shakespeare/texts/{n}_gut.txt": f"shakespeare/texts/{n}_gut.txt"
       for n in ("comedy_of_errors", "julius_caesar", "macbeth", "midsummer_nights_dream", "romeo_and_juliet")},
    "shakespeare/COPYING.txt": "shakespeare/COPYING.txt",
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_sums(shared: Path, rels) -> None:
    """Verify the sources against shared/data/SHA256SUMS before using them."""
    sums = {}
    for line in (shared / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        sums[name.lstrip("*").removeprefix("./")] = digest
    for rel in rels:
        if sums.get(rel) != sha256(shared / rel):
            raise SystemExit(f"pack: {shared / rel} does not match SHA256SUMS")


def save_npz(path: Path, **arrays) -> None:
    """Like np.savez_compressed, but with fixed zip timestamps so the bytes are reproducible."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue(), compresslevel=9)


def pack_cifar(shared: Path, out: Path) -> None:
    """All 10,000 test JPEGs: bytes concatenated unchanged, with offsets, labels and names."""
    root = shared / "cifar10/test_jpeg"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [f for c in classes for f in sorted((root / c).glob("*.jpg"))]
    check_sums(shared, [str(f.relative_to(shared)) for f in files])
    blobs = [f.read_bytes() for f in files]
    offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    labels = np.array([classes.index(f.parent.name) for f in files], dtype=np.uint8)
    names = np.array([f"{f.parent.name}/{f.name}" for f in files])
    out.parent.mkdir(parents=True, exist_ok=True)
    save_npz(out, jpeg=np.frombuffer(b"".join(blobs), dtype=np.uint8), offsets=offsets,
             labels=labels, names=names, classes=np.array(classes))


def read_xyz_frames(paths):
    """mol_id -> frame text (atom count line, mol_id line, atom lines)."""
    frames = {}
    for p in paths:
        lines = gzip.decompress(p.read_bytes()).decode().splitlines()
        i = 0
        while i < len(lines):
            n = int(lines[i])
            frames[lines[i + 1].strip()] = "\n".join(lines[i:i + 2 + n]) + "\n"
            i += 2 + n
    return frames


def pack_qm9(shared: Path, out_dir: Path) -> None:
    """QM9_N molecules evenly spaced (by gdb number) among those with a geometry."""
    parts = sorted((shared / "qm9").glob("qm9_small_geometries_part*.xyz.gz"))
    check_sums(shared, ["qm9/qm9_small.csv"] + [str(p.relative_to(shared)) for p in parts])
    df = pd.read_csv(shared / "qm9/qm9_small.csv").drop_duplicates("mol_id")
    frames = read_xyz_frames(parts)
    df = df[df.mol_id.isin(frames)].copy()
    df["num"] = df.mol_id.str.removeprefix("gdb_").astype(int)
    df = df.sort_values("num").reset_index(drop=True)
    pick = np.unique(np.linspace(0, len(df) - 1, QM9_N).round().astype(int))
    df = df.iloc[pick]
    out_dir.mkdir(parents=True, exist_ok=True)
    df[["mol_id", "smiles", "mu"]].to_csv(out_dir / "qm9_subset.csv", index=False, lineterminator="\n")
    text = "".join(frames[m] for m in df.mol_id).encode()
    with open(out_dir / "qm9_subset_geometries.xyz.gz", "wb") as f:
        with gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=9, mtime=0) as gz:
            gz.write(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data",
                    help="shared/data folder (default: ../shared/data from the repo root)")
    shared = ap.parse_args().shared.resolve()
    if not (shared / "SHA256SUMS").is_file():
        raise SystemExit(f"pack: no SHA256SUMS in {shared}; pass --shared pointing at shared/data")
    check_sums(shared, COPIES.values())
    for dst, src in COPIES.items():
        (HERE / dst).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared / src, HERE / dst)
    pack_cifar(shared, HERE / "cifar10/cifar10_test_jpeg.npz")
    pack_qm9(shared, HERE / "qm9")
    total = 0
    for p in sorted(HERE.rglob("*")):
        if p.is_file() and p.suffix not in (".py", ".md") and "__pycache__" not in p.parts:
            total += p.stat().st_size
            print(f"{sha256(p)}  {p.stat().st_size:>9}  {p.relative_to(HERE)}")
    print(f"total {total} bytes")


if __name__ == "__main__":
    main()
