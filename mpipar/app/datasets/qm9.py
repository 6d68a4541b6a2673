"""QM9 small molecules as 3-D graphs (target: dipole moment mu) for the molecular GNN examples."""
from __future__ import annotations

import gzip

import numpy as np
import torch

from .common import data_dir_for, fail, need, why

ELEMENTS = ["H", "C", "N", "O", "F"]
Z = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}
RADIUS = {"H": 0.31, "C": 0.76, "N": 0.71, "O": 0.66, "F": 0.57}  # covalent radii, Å (Cordero 2008)
BOND_SCALE = 1.15  # bonded if distance < 1.15 x (r_i + r_j)
FIX = "pass --data-dir pointing at a folder with a QM9 CSV (mol_id, smiles, mu) and its .xyz(.gz) frames"


def _read_xyz(paths) -> dict:
    """Multi-frame XYZ (count, mol_id, 'El x y z' lines) -> {mol_id: (elements, float array [n,3])}."""
    frames = {}
    for p in paths:
        try:
            raw = p.read_bytes()
            lines = (gzip.decompress(raw) if p.suffix == ".gz" else raw).decode().splitlines()
            i = 0
            while i < len(lines):
                if not lines[i].strip():
                    i += 1
                    continue
                n = int(lines[i])
                atoms = [ln.split() for ln in lines[i + 2:i + 2 + n]]
                if len(atoms) != n or any(len(a) != 4 or a[0] not in Z for a in atoms):
                    raise ValueError(f"bad atom lines in frame at line {i + 1}")
                frames[lines[i + 1].strip()] = ([a[0] for a in atoms],
                                                np.array([a[1:] for a in atoms], dtype=np.float64))
                i += 2 + n
        except Exception as e:
            raise fail("qm9", f"garbled geometry file {p} ({why(e)})",
                       "restore the original .xyz.gz files") from None
    return frames


def _graph(Data, mol_id, smiles, mu, elements, pos):
    r = np.array([RADIUS[e] for e in elements])
    dist = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    bonded = (dist < BOND_SCALE * (r[:, None] + r[None])) & ~np.eye(len(r), dtype=bool)
    src, dst = np.nonzero(bonded)
    z = torch.tensor([Z[e] for e in elements], dtype=torch.long)
    x = torch.zeros(len(z), len(ELEMENTS) + 1)
    x[torch.arange(len(z)), torch.tensor([ELEMENTS.index(e) for e in elements])] = 1.0
    x[:, -1] = z.float()
    return Data(x=x, z=z, pos=torch.from_numpy(pos.astype(np.float32)),
                edge_index=torch.from_numpy(np.stack([src, dst]).astype(np.int64)),
                edge_attr=torch.from_numpy(dist[src, dst].astype(np.float32)).unsqueeze(1),
                y=torch.tensor([[mu]], dtype=torch.float32), mol_id=mol_id, smiles=smiles)


def load_qm9(data_dir=None, max_molecules: int | None = None) -> list:
    """List of torch_geometric Data, sorted by QM9 number: x float32 [n,6] (one-hot H,C,N,O,F +
    atomic number), z, pos [n,3] Å, bonds from geometry as both directions in edge_index, edge_attr =
    bond length [E,1], y = mu [1,1] in Debye, mol_id, smiles. Only molecules with a geometry."""
    pd = need("pandas", "qm9 data")
    d = data_dir_for("qm9", data_dir)
    csvs = sorted(d.glob("*.csv")) + sorted(d.glob("*.csv.gz")) if d.is_dir() else []
    xyzs = sorted(d.glob("*.xyz.gz")) + sorted(d.glob("*.xyz")) if d.is_dir() else []
    if not csvs or not xyzs:
        where = "missing directory" if not d.is_dir() else "no *.csv or no *.xyz(.gz) in"
        raise fail("qm9", f"{where} {d} (expected a QM9 CSV with mol_id,smiles,mu and multi-frame "
                   "XYZ geometries, as qm9_subset.csv + qm9_subset_geometries.xyz.gz)", FIX)
    try:
        df = pd.concat([pd.read_csv(p, usecols=["mol_id", "smiles", "mu"]) for p in csvs])
        df = df.drop_duplicates("mol_id").dropna()
        df["num"] = df["mol_id"].str.removeprefix("gdb_").astype(int)
        df["mu"] = df["mu"].astype(float)
    except Exception as e:
        raise fail("qm9", f"garbled CSV in {d} ({why(e)})",
                   "the CSV needs columns mol_id (gdb_N), smiles and mu") from None
    frames = _read_xyz(xyzs)
    df = df[df["mol_id"].isin(frames)].sort_values("num")
    if max_molecules is not None:
        df = df.head(max_molecules)
    if df.empty:
        raise fail("qm9", f"no molecule in {d} has both a CSV row and a geometry", FIX)
    Data = need("torch_geometric.data", "qm9 data").Data
    return [_graph(Data, m, s, mu, *frames[m]) for m, s, mu in zip(df["mol_id"], df["smiles"], df["mu"])]


def split_qm9(graphs: list, test_fraction: float = 0.2, seed: int = 0) -> tuple[list, list]:
    """(train, test) lists: a random `test_fraction` of the molecules (from `seed`) is test."""
    perm = torch.randperm(len(graphs), generator=torch.Generator().manual_seed(seed)).tolist()
    n_test = int(round(len(graphs) * test_fraction))
    return [graphs[i] for i in sorted(perm[n_test:])], [graphs[i] for i in sorted(perm[:n_test])]


def mean_baseline_mae(train: list, test: list) -> float:
    """MAE (Debye) on `test` of always predicting the mean mu of `train`."""
    mean = torch.cat([g.y.flatten() for g in train]).mean()
    return float(torch.cat([g.y.flatten() for g in test]).sub(mean).abs().mean())
