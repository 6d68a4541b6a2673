"""GCN on Cora split across pipeline stages, with real micro-batches, RMSprop + cross-entropy.

Cora's 2708 nodes are cut into --parts sub-graphs with locality (mpipar/data/cora_parts.py,
cluster-GCN style: each keeps the edges inside it, equal train and test nodes per part). Each
sub-graph is one SAMPLE [n, n + F] = [normalised adjacency | node features], padded to the same
n, so the shared trainer's --batch-size, --microbatches and --grid work unchanged: one step is a
batch of all the sub-graphs, cut into micro-batches that flow through the stages. Every layer
maps [B, n, n + F_in] -> [B, n, n + F_out], carrying the adjacency along so one tensor crosses
each stage boundary; the last gives the logits [B, n, classes]. Training reads the train-mask
labels, testing the test-mask labels of the same sub-graphs (transductive, standard split).

    mpirun -np 4 python -m mpipar.run pipeline-gcn-cora --schedule 1f1b    # 4 stages, 4 micro-batches

Defaults (4 sub-graphs of 677 nodes keeping 9234 of Cora's 10556 directed edges, 87.5%; depth 4,
hidden 32, residual hidden layers, row-normalised features, 100 epochs, 4 micro-batches), measured:
test accuracy 0.800 at epoch 100 on 4 ranks with 1f1b (0.782 mean over the last 10 epochs, which
swing 0.73-0.80); single process 0.787-0.793 at epoch 100 (dropout draws are unseeded, so runs
differ by a point or two). Micro-batched runs without dropout equal single-process training
(tests/test_cora_pipeline.py).
"""
import torch
from torch import nn

from mpipar.data.cache import cached
from mpipar.data.common import Split
from mpipar.data.cora_parts import cora_parts
from mpipar.example import Example
from mpipar.model import LayerSpec
from mpipar.train.metrics import IGNORE


class GraphLayer(nn.Module):
    """One GCN convolution on a batch of sub-graphs: h' = A_hat (dropout(h) W) + b, then ReLU;
    a hidden layer of equal width adds its input back (residual: deep GCNs otherwise smooth the
    features away). Input [B, n, n + c_in] = [adjacency | features]; output the same adjacency
    beside the new features, or for the last layer the logits alone."""

    def __init__(self, n, c_in, c_out, last, residual, dropout):
        super().__init__()
        self.n, self.last, self.residual = n, last, residual and c_in == c_out and not last
        self.drop = nn.Dropout(dropout)
        self.lin = nn.Linear(c_in, c_out, bias=False)
        nn.init.xavier_uniform_(self.lin.weight)   # Glorot, as in the GCN paper
        self.bias = nn.Parameter(torch.zeros(c_out))

    def forward(self, x):
        a, h = x[..., :self.n], x[..., self.n:]
        z = a @ self.lin(self.drop(h)) + self.bias
        if self.last:
            return z
        z = z.relu() + h if self.residual else z.relu()
        return torch.cat([a, z], dim=-1)


class NodeCrossEntropy(nn.Module):
    """Cross-entropy over labelled nodes only (others carry IGNORE). Every sub-graph holds the
    same number of them, so this mean over nodes is also the mean over samples the pipeline's
    micro-batch weights assume."""

    def forward(self, out, y):
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), ignore_index=IGNORE)


def graph(args):
    return cached(("cora-parts", args.data_dir, args.parts), lambda: cora_parts(args.data_dir, args.parts, IGNORE))


def layers(args):
    g, h = graph(args), args.hidden
    n, features = g.nodes.shape[1], g.x.shape[2] - g.nodes.shape[1]
    classes = int(torch.cat([g.train_y, g.test_y]).max()) + 1
    dims = [features] + [h] * (args.depth - 1) + [classes]
    return [LayerSpec(f"gcn{i + 1}", lambda a=a, b=b, last=(i == args.depth - 1):
                      GraphLayer(n, a, b, last, args.residual, args.dropout))
            for i, (a, b) in enumerate(zip(dims, dims[1:]))]


def data(args):
    g = graph(args)
    return Split(g.x, g.train_y, g.note), Split(g.x, g.test_y, g.note)


def add_args(p):
    p.add_argument("--parts", type=int, default=4, help="sub-graphs (samples); must divide 140 and 1000 "
                   "(2, 4, 5, 10, 20); pass --batch-size equal to it for one step per epoch")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--depth", type=int, default=4, help="GCN layers (>= number of stages)")
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--residual", type=int, default=1, help="1: hidden layers add their input back")


EXAMPLE = Example(
    name="pipeline-gcn-cora",
    summary="GCN on Cora sub-graphs (standard split) across stages, micro-batched, RMSprop + cross-entropy",
    layers=layers,
    data=data,
    loss=NodeCrossEntropy,
    optimizer=lambda params, args: torch.optim.RMSprop(params, lr=args.lr, weight_decay=5e-4),
    task="classification",
    defaults=dict(epochs=100, batch_size=4, microbatches=4, lr=0.01, balance="layers"),
    add_args=add_args,
    report=lambda last, train, test, args: (f"{last['steps_per_s']:.1f} batches/s ({len(train)} sub-graphs "
                                            f"per epoch, {args.microbatches} micro-batch(es) per batch)"),
)
