"""Cora citation graph (Planetoid split) for the GNN examples, read from the raw ind.cora.* files."""
from __future__ import annotations

from types import SimpleNamespace

from .common import ArraysOnly, data_dir_for, fail, need_file, need, why

PARTS = ("x", "tx", "allx", "y", "ty", "ally", "graph", "test.index")
FIX = "pass --data-dir pointing at the folder holding ind.cora.* (Planetoid raw files)"


class PlanetoidOnly(ArraysOnly):
    """What the Planetoid files hold besides arrays: scipy CSR matrices (features) and a
    defaultdict of lists (the graph); any other global is refused before it runs."""
    ALLOWED = ArraysOnly.ALLOWED | {("scipy.sparse.csr", "csr_matrix"), ("scipy.sparse._csr", "csr_matrix"),
                                    ("collections", "defaultdict"), ("__builtin__", "list"), ("builtins", "list")}


def load_cora(data_dir=None):
    """torch_geometric Data: x [2708,1433], edge_index [2,10556], y [2708] in 0..6, train/val/test masks.

    Uses torch_geometric's own Planetoid reader, its pickle.load swapped for PlanetoidOnly's (the
    raw files are pickles: that is the official format, but a data file is not trusted code).
    `data_dir` may also be a Planetoid root with a raw/ subfolder."""
    d = data_dir_for("cora", data_dir)
    if not (d / "ind.cora.x").is_file() and (d / "raw").is_dir():
        d = d / "raw"
    for p in PARTS:
        need_file("cora", d / f"ind.cora.{p}", f"the 8 Planetoid files ind.cora.{{{','.join(PARTS)}}}", FIX)
    planetoid = need("torch_geometric.io.planetoid", "cora data")
    unpickle, planetoid.pickle = planetoid.pickle, SimpleNamespace(
        load=lambda f, encoding="ASCII": PlanetoidOnly(f, encoding=encoding).load())
    try:
        data = planetoid.read_planetoid_data(str(d), "cora")
    except Exception as e:
        raise fail("cora", f"garbled Planetoid files in {d} ({why(e)})",
                   "restore the original ind.cora.* files") from None
    finally:
        planetoid.pickle = unpickle
    if data.x is None or data.x.dim() != 2 or data.y is None or data.y.numel() != data.x.shape[0]:
        raise fail("cora", f"garbled Planetoid files in {d} (features and labels disagree)",
                   "restore the original ind.cora.* files")
    data.note = (f"Cora (Planetoid): {data.num_nodes} papers, {data.edge_index.shape[1]} directed edges, "
                 f"{int(data.train_mask.sum())} train / {int(data.val_mask.sum())} val / "
                 f"{int(data.test_mask.sum())} test nodes, {int(data.y.max()) + 1} classes")
    return data
