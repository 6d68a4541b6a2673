"""Cora citation graph (Planetoid split) for the GNN examples, read from the raw ind.cora.* files."""
from __future__ import annotations

from .common import data_dir_for, fail, need_file, need, why

PARTS = ("x", "tx", "allx", "y", "ty", "ally", "graph", "test.index")
FIX = "pass --data-dir pointing at the folder holding ind.cora.* (Planetoid raw files)"


def load_cora(data_dir=None):
    """torch_geometric Data: x [2708,1433], edge_index [2,10556], y [2708] in 0..6, train/val/test masks.

    Uses torch_geometric's own Planetoid reader (the raw files are pickles: that is the official
    format). `data_dir` may also be a Planetoid root with a raw/ subfolder."""
    d = data_dir_for("cora", data_dir)
    if not (d / "ind.cora.x").is_file() and (d / "raw").is_dir():
        d = d / "raw"
    for p in PARTS:
        need_file("cora", d / f"ind.cora.{p}", f"the 8 Planetoid files ind.cora.{{{','.join(PARTS)}}}", FIX)
    read_planetoid_data = need("torch_geometric.io", "cora data").read_planetoid_data
    try:
        data = read_planetoid_data(str(d), "cora")
    except Exception as e:
        raise fail("cora", f"garbled Planetoid files in {d} ({why(e)})",
                   "restore the original ind.cora.* files") from None
    if data.x is None or data.x.dim() != 2 or data.y is None or data.y.numel() != data.x.shape[0]:
        raise fail("cora", f"garbled Planetoid files in {d} (features and labels disagree)",
                   "restore the original ind.cora.* files")
    data.note = (f"Cora (Planetoid): {data.num_nodes} papers, {data.edge_index.shape[1]} directed edges, "
                 f"{int(data.train_mask.sum())} train / {int(data.val_mask.sum())} val / "
                 f"{int(data.test_mask.sum())} test nodes, {int(data.y.max()) + 1} classes")
    return data
