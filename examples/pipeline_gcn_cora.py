"""GCN on Cora split across pipeline stages (full graph per step), RMSprop + cross-entropy."""
import torch
from torch import nn

from mpipar.data.cache import cached
from mpipar.data.common import Split
from mpipar.data.cora import load_cora
from mpipar.example import Example
from mpipar.model import LayerSpec
from mpipar.train.metrics import IGNORE


class GraphLayer(nn.Module):
    """A GCN convolution over the fixed Cora graph; activations are [1, nodes, features] so the
    whole graph travels between stages as one tensor."""

    def __init__(self, c_in, c_out, edge_index, relu, dropout):
        super().__init__()
        from torch_geometric.nn import GCNConv
        self.drop, self.relu = nn.Dropout(dropout), relu
        self.conv = GCNConv(c_in, c_out, cached=True)
        self.register_buffer("edge_index", edge_index, persistent=False)

    def forward(self, x):
        h = self.conv(self.drop(x[0]), self.edge_index)
        return (h.relu() if self.relu else h).unsqueeze(0)


class NodeCrossEntropy(nn.Module):
    """Cross-entropy over labelled nodes only (others carry IGNORE)."""

    def forward(self, out, y):
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), ignore_index=IGNORE)


def graph(args):
    return cached(("cora", args.data_dir), lambda: load_cora(args.data_dir))


def layers(args):
    g, h = graph(args), args.hidden
    dims = [g.num_features] + [h] * (args.depth - 1) + [int(g.y.max()) + 1]
    return [LayerSpec(f"gcn{i + 1}", lambda a=a, b=b, last=(i == args.depth - 1):
                      GraphLayer(a, b, g.edge_index, relu=not last, dropout=args.dropout))
            for i, (a, b) in enumerate(zip(dims, dims[1:]))]


def data(args):
    g = graph(args)
    def labels(mask):
        return torch.where(mask, g.y, torch.full_like(g.y, IGNORE)).unsqueeze(0)
    return (Split(g.x.unsqueeze(0), labels(g.train_mask), g.note),
            Split(g.x.unsqueeze(0), labels(g.test_mask), g.note))


def add_args(p):
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--depth", type=int, default=2, help="GCN layers (>= number of stages)")
    p.add_argument("--dropout", type=float, default=0.5)


EXAMPLE = Example(
    name="pipeline-gcn-cora",
    summary="GCN on Cora (standard split) split across stages, RMSprop + cross-entropy, test accuracy",
    layers=layers,
    data=data,
    loss=NodeCrossEntropy,
    optimizer=lambda params, args: torch.optim.RMSprop(params, lr=args.lr, weight_decay=5e-4),
    task="classification",
    defaults=dict(epochs=100, batch_size=1, lr=0.01, balance="layers"),
    add_args=add_args,
    report=lambda last, train, test, args: f"{last['steps_per_s']:.1f} batches/s (one full-graph batch per epoch)",
)
