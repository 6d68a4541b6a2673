"""pipeline-gcn-cora with real micro-batches: Cora cut into sub-graphs (mpipar/app/datasets/cora_parts.py)
is a dataset of samples, so 4 stages with 1F1B micro-batches (and a pp x dp grid) train exactly
as one process does (tests/mpi/cases_parity.py: cora-*). The partition itself is checked here,
without MPI."""
import numpy as np
import pytest
import torch

from mpipar.app.datasets.cora import load_cora
from mpipar.app.datasets.cora_parts import TEST, TRAIN, cora_parts, normalized_adjacency, pack, partition
from mpipar.errors import DataError
from mpipar.train.metrics import IGNORE

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def cora():
    return load_cora()


@pytest.fixture(scope="module")
def parts5():
    return cora_parts(parts=5, ignore=IGNORE)   # 541/542 nodes: one part padded


def kinds(g):
    kind = np.zeros(g.num_nodes, dtype=np.int64)
    kind[g.train_mask.numpy()], kind[g.test_mask.numpy()] = TRAIN, TEST
    return kind


def test_partition_is_deterministic_and_covers_every_node_once(cora):
    a = partition(cora.edge_index.numpy(), kinds(cora), 4)
    b = partition(cora.edge_index.numpy(), kinds(cora), 4)
    assert np.array_equal(a, b)
    assert a.shape == (cora.num_nodes,) and set(np.unique(a)) == {0, 1, 2, 3}
    for k, each in ((TRAIN, 35), (TEST, 250)):          # equal quotas: 140 / 4, 1000 / 4
        assert np.bincount(a[kinds(cora) == k], minlength=4).tolist() == [each] * 4


def test_parts_pack_every_node_once_with_its_labels(cora, parts5):
    nodes = parts5.nodes
    real = nodes[nodes >= 0]
    assert sorted(real.tolist()) == list(range(cora.num_nodes))
    assert sorted((nodes >= 0).sum(1).tolist()) == [541, 541, 542, 542, 542]
    assert (parts5.train_y != IGNORE).sum(1).tolist() == [28] * 5
    assert (parts5.test_y != IGNORE).sum(1).tolist() == [200] * 5
    ids = nodes.clamp(min=0)
    pad = nodes < 0
    assert torch.equal(parts5.train_y[~pad], torch.where(cora.train_mask, cora.y, IGNORE)[ids[~pad]])
    assert torch.equal(parts5.test_y[~pad], torch.where(cora.test_mask, cora.y, IGNORE)[ids[~pad]])
    assert (parts5.train_y[pad] == IGNORE).all() and (parts5.test_y[pad] == IGNORE).all()
    n = nodes.shape[1]
    feats = parts5.x[..., n:]
    assert torch.allclose(feats[~pad].sum(-1)[cora.x[ids[~pad]].sum(-1) > 0], torch.tensor(1.0))
    assert (feats[pad] == 0).all()
    same = nodes.new_empty(cora.num_nodes)
    for p in range(5):
        same[nodes[p][nodes[p] >= 0]] = p
    src, dst = cora.edge_index
    assert parts5.kept == int((same[src] == same[dst]).sum()) and 0.8 * cora.edge_index.shape[1] < parts5.kept


def test_adjacency_is_gcn_normalised_symmetric_and_padding_zero(parts5):
    n = parts5.nodes.shape[1]
    for p in range(5):
        a, real = parts5.x[p, :, :n], int((parts5.nodes[p] >= 0).sum())
        torch.testing.assert_close(a, a.T)
        assert (a[real:] == 0).all() and (a[:, real:] == 0).all()
        binary = (a[:real, :real] > 0).float()                       # A + I within the part
        assert (binary.diagonal() == 1).all()
        d = binary.sum(1).rsqrt()
        torch.testing.assert_close(a[:real, :real], d[:, None] * binary * d[None, :])


def test_small_graph_by_hand():
    """Path 0-1-2 and edge 3-4 in two parts of 3 and 2 nodes: the second padded to 3."""
    edges = torch.tensor([[0, 1, 1, 2, 3, 4], [1, 0, 2, 1, 4, 3]])
    x, ys, nodes, kept = pack(edges, torch.eye(5), {"y": torch.arange(5)}, np.array([0, 0, 0, 1, 1]), IGNORE)
    assert x.shape == (2, 3, 3 + 5) and kept == 6 and nodes.tolist() == [[0, 1, 2], [3, 4, -1]]
    s2, s3 = 2 ** -0.5, 3 ** -0.5
    torch.testing.assert_close(x[0, :, :3], torch.tensor([[1 / 2, s2 * s3, 0], [s2 * s3, 1 / 3, s2 * s3],
                                                          [0, s2 * s3, 1 / 2]]))
    torch.testing.assert_close(x[1, :, :3], torch.tensor([[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 0]]))
    assert ys["y"].tolist() == [[0, 1, 2], [3, 4, IGNORE]]
    torch.testing.assert_close(normalized_adjacency(torch.zeros(2, 0, dtype=torch.long), 1, 2),
                               torch.tensor([[1.0, 0], [0, 0]]))


def test_parts_that_split_the_labels_unevenly_are_refused():
    with pytest.raises(DataError, match=r"--parts 3: 140 train and 1000 test nodes do not split evenly"):
        cora_parts(parts=3)
