"""PPI (protein-protein interaction graphs) for the GraphSAGE examples.

The real dataset is not available offline, so `load_ppi()` without --data-dir GENERATES a
SYNTHETIC stand-in with PPI's shape: 24 graphs (20 train / 2 val / 2 test), about 2,245 nodes and
61k directed edges each, 50 features, 121 binary labels. Labels are a fixed function of each
node's own and mean-neighbour features (what GraphSAGE's mean aggregator can learn), so training
is meaningful. Every note says "SYNTHETIC". With --data-dir, the real PyG raw files are read:
{train,valid,test}_{graph.json (networkx node-link), feats.npy, labels.npy, graph_id.npy}.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .common import fail, need_file, need, why

SPLITS = {"train": 20, "valid": 2, "test": 2}
N_FEAT, N_LABELS, MEAN_NODES, MEAN_DEGREE = 50, 121, 2245, 27
FIX = "pass --data-dir pointing at PyG's PPI raw folder (train_graph.json, train_feats.npy, ...)"


def _unique_columns(ei: torch.Tensor, n: int) -> torch.Tensor:
    """torch.unique(ei, dim=1) for node ids < n, ~100x faster: a 1-D unique of src*n+dst sorts
    the columns in the same (src, dst) order, so the result is identical (contiguous, though)."""
    key = torch.unique(ei[0] * n + ei[1])
    return torch.stack([key // n, key % n])


def _graph(g: torch.Generator, n: int, w: torch.Tensor, thresholds: torch.Tensor):
    """One synthetic graph: communities of ~100 nodes, mostly intra-community links."""
    comm = torch.randint(0, max(1, n // 100), (n,), generator=g)
    k = MEAN_DEGREE // 2 + 2   # duplicates and self-loops are dropped below
    src = torch.arange(n).repeat_interleave(k)
    same = torch.rand(n * k, generator=g) < 0.8
    members = torch.argsort(comm)
    start = torch.searchsorted(comm[members], comm)
    size = torch.bincount(comm, minlength=int(comm.max()) + 1)[comm]
    pick = (torch.rand(n * k, generator=g) * size.repeat_interleave(k)).long()
    intra = members[(start.repeat_interleave(k) + pick).clamp(max=n - 1)]
    dst = torch.where(same, intra, torch.randint(0, n, (n * k,), generator=g))
    keep = src != dst
    ei = torch.cat([torch.stack([src[keep], dst[keep]]), torch.stack([dst[keep], src[keep]])], 1)
    ei = _unique_columns(ei, n)
    x = torch.randn(n, N_FEAT, generator=g)
    deg = torch.bincount(ei[0], minlength=n).clamp(min=1).unsqueeze(1)
    neigh = torch.zeros(n, N_FEAT).index_add_(0, ei[0], x[ei[1]]) / deg
    y = (torch.cat([x, neigh], 1) @ w > thresholds).float()
    return x, ei, y


def generate(seed: int = 0) -> dict:
    """{'train': [Data x20], 'valid': [Data x2], 'test': [Data x2]}, all synthetic."""
    Data = need("torch_geometric.data", "ppi data").Data
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(2 * N_FEAT, N_LABELS, generator=g) / np.sqrt(2 * N_FEAT)
    thresholds = torch.rand(N_LABELS, generator=g) * 1.2   # label rates from ~50% down to ~10%
    out = {}
    for split, count in SPLITS.items():
        graphs = []
        for _ in range(count):
            n = int(MEAN_NODES * (0.8 + 0.4 * torch.rand(1, generator=g)))
            x, ei, y = _graph(g, n, w, thresholds)
            graphs.append(Data(x=x, edge_index=ei, y=y))
        out[split] = graphs
    return out


def read_pyg_raw(d: Path) -> dict:
    """The real PPI in PyG's raw layout (JSON + npy: nothing executable is loaded)."""
    Data = need("torch_geometric.data", "ppi data").Data
    out = {}
    for split in SPLITS:
        files = {k: need_file("ppi", d / f"{split}_{k}", f"PyG PPI raw file {split}_{k}", FIX)
                 for k in ("graph.json", "feats.npy", "labels.npy", "graph_id.npy")}
        try:
            links = json.loads(files["graph.json"].read_text())["links"]
            ei = torch.tensor([[l["source"] for l in links], [l["target"] for l in links]], dtype=torch.long)
            x = torch.from_numpy(np.load(files["feats.npy"], allow_pickle=False)).float()
            y = torch.from_numpy(np.load(files["labels.npy"], allow_pickle=False)).float()
            gid = torch.from_numpy(np.load(files["graph_id.npy"], allow_pickle=False)).long()
        except Exception as e:
            raise fail("ppi", f"garbled PPI file in {d} ({why(e)})", FIX) from None
        if not (len(x) == len(y) == len(gid)):
            raise fail("ppi", f"{split}: features, labels and graph ids disagree in length", FIX)
        graphs = []
        for i in gid.unique():
            nodes = (gid == i).nonzero().flatten()
            remap = torch.full((len(gid),), -1, dtype=torch.long)
            remap[nodes] = torch.arange(len(nodes))
            mask = (remap[ei[0]] >= 0) & (remap[ei[1]] >= 0)
            graphs.append(Data(x=x[nodes], edge_index=remap[ei[:, mask]], y=y[nodes]))
        out[split] = graphs
    return out


def load_ppi(data_dir=None, seed: int = 0) -> tuple[dict, str]:
    """(splits, note): the real PPI from `data_dir`, else the SYNTHETIC PPI-shaped stand-in."""
    if data_dir is None:
        s = generate(seed)
        nodes = sum(d.num_nodes for d in s["train"]) / 20
        edges = sum(d.edge_index.shape[1] for d in s["train"]) / 20
        return s, (f"SYNTHETIC PPI-shaped graphs (real PPI is not shipped): 24 graphs 20/2/2, "
                   f"~{nodes:.0f} nodes and ~{edges / 1e3:.0f}k directed edges each, {N_FEAT} features, "
                   f"{N_LABELS} labels from neighbourhood features (seed {seed})")
    s = read_pyg_raw(Path(data_dir))
    return s, f"PPI (PyG raw files in {data_dir}): {sum(len(v) for v in s.values())} graphs"
