"""PPI: the synthetic stand-in has PPI's shape and learnable labels; the real-format reader
reads PyG raw files and rejects garbled ones."""
import json

import numpy as np
import pytest
import torch

from mpipar.app.datasets import ppi
from mpipar.errors import DataError


def test_synthetic_graph_has_ppi_shape():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(100, 121, generator=g) / 10
    x, ei, y = ppi._graph(g, 2245, w, torch.rand(121, generator=g))
    assert x.shape == (2245, 50) and y.shape == (2245, 121)
    assert 50_000 < ei.shape[1] < 75_000              # PPI: ~61k directed edges per graph
    assert torch.equal(torch.unique(ei, dim=1), ei)   # no duplicates
    assert (ei[0] != ei[1]).all()
    rev = torch.stack([ei[1], ei[0]])
    assert torch.equal(torch.unique(rev, dim=1), ei)   # symmetric
    assert 0.02 < y.mean() < 0.6


def test_labels_are_a_function_of_neighbourhood_features():
    g = torch.Generator().manual_seed(1)
    w, th = torch.randn(100, 121, generator=g) / 10, torch.rand(121, generator=g)
    x, ei, y = ppi._graph(g, 500, w, th)
    deg = torch.bincount(ei[0], minlength=500).clamp(min=1).unsqueeze(1)
    neigh = torch.zeros(500, 50).index_add_(0, ei[0], x[ei[1]]) / deg
    assert torch.equal(y, (torch.cat([x, neigh], 1) @ w > th).float())


def write_raw(d, n=6):
    for split in ppi.SPLITS:
        links = [{"source": i, "target": (i + 1) % n} for i in range(n)]
        (d / f"{split}_graph.json").write_text(json.dumps({"links": links}))
        np.save(d / f"{split}_feats.npy", np.ones((n, 50), np.float32))
        np.save(d / f"{split}_labels.npy", np.zeros((n, 121), np.float32))
        np.save(d / f"{split}_graph_id.npy", np.array([1, 1, 1, 2, 2, 2]))


def test_real_format_reader(tmp_path):
    write_raw(tmp_path)
    splits, note = ppi.load_ppi(tmp_path)
    assert len(splits["train"]) == 2 and splits["train"][0].num_nodes == 3
    assert splits["train"][0].edge_index.shape[1] == 2   # 0->1, 1->2 (2->3 crosses graphs)
    assert "SYNTHETIC" not in note


def test_missing_and_garbled(tmp_path):
    with pytest.raises(DataError, match="ppi: missing directory"):
        ppi.load_ppi(tmp_path / "nope")
    write_raw(tmp_path)
    (tmp_path / "valid_feats.npy").write_bytes(b"garbage")
    with pytest.raises(DataError, match="garbled PPI file"):
        ppi.load_ppi(tmp_path)
