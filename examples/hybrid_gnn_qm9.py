"""Message-passing GNN predicting the QM9 dipole moment, layers split over stages (+ --grid dp), Adam + MAE.

Each molecule is packed into one fixed-size padded tensor [MAX_ATOMS, F + 4] (node features,
3-D position, mask), so a batch is one tensor and the shared trainer's batching, micro-batching
and data-parallel sharding work unchanged. Between stages the activation is [B, MAX_ATOMS, H + 4]:
hidden state plus positions and mask. Each interaction layer rebuilds its neighbourhood from the
positions (atoms closer than --cutoff Å inside the same molecule), SchNet-style: messages are the
neighbour's state times a filter learned from the distance. The head sum-pools real atoms -> mu.

    mpirun -np 2 python -m mpipar.run hybrid-gnn-qm9                   # pp=2 (model parallel)
    mpirun -np 4 python -m mpipar.run hybrid-gnn-qm9 --grid pp=2,dp=2  # hybrid
"""
import torch
from torch import nn

from mpipar.app.datasets.cache import cached
from mpipar.app.datasets.common import Split
from mpipar.app.datasets.qm9 import load_qm9, mean_baseline_mae, split_qm9
from mpipar.app.example import Example
from mpipar.model import LayerSpec

EXTRA = 4   # trailing columns of every activation: x, y, z (Å) and the real-atom mask


def pack(graphs, max_atoms: int) -> torch.Tensor:
    """[N, max_atoms, F + 4]: node features (Z scaled to ~1), positions, mask; zero padding."""
    f = graphs[0].x.shape[1]
    out = torch.zeros(len(graphs), max_atoms, f + EXTRA)
    for i, g in enumerate(graphs):
        n = g.num_nodes
        x = g.x.clone()
        x[:, -1] /= 9.0
        out[i, :n, :f], out[i, :n, f:f + 3], out[i, :n, -1] = x, g.pos, 1.0
    return out


def split_extra(a):
    return a[..., :-EXTRA], a[..., -EXTRA:-1], a[..., -1:]


class Embed(nn.Module):
    def __init__(self, f, h):
        super().__init__()
        self.lin = nn.Linear(f, h)

    def forward(self, a):
        x, pos, mask = split_extra(a)
        return torch.cat([self.lin(x) * mask, pos, mask], -1)


class Interaction(nn.Module):
    """h_i += W2 act(sum_j adj_ij filter(d_ij) * W1 h_j), adj from distance < cutoff (masked)."""

    def __init__(self, h, rbf, cutoff):
        super().__init__()
        self.cutoff = cutoff
        self.register_buffer("centres", torch.linspace(0.0, cutoff, rbf), persistent=False)
        self.gamma = (rbf / cutoff) ** 2
        self.filter = nn.Sequential(nn.Linear(rbf, h), nn.SiLU(), nn.Linear(h, h))
        self.w1, self.w2 = nn.Linear(h, h, bias=False), nn.Linear(h, h)

    def forward(self, a):
        h, pos, mask = split_extra(a)
        d = torch.cdist(pos, pos)                                        # [B, A, A]
        eye = torch.eye(d.shape[-1], dtype=torch.bool)
        adj = (d < self.cutoff) & ~eye & (mask > 0) & (mask > 0).transpose(1, 2)
        rbf = torch.exp(-self.gamma * (d.unsqueeze(-1) - self.centres) ** 2)
        w = self.filter(rbf) * adj.unsqueeze(-1)                          # [B, A, A, H]
        msg = (w * self.w1(h).unsqueeze(1)).sum(2)                        # sum over neighbours j
        h = (h + self.w2(nn.functional.silu(msg))) * mask
        return torch.cat([h, pos, mask], -1)


class Head(nn.Module):
    """Per-atom MLP, masked sum over atoms -> mu (bias starts at the training mean)."""

    def __init__(self, h, mean):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(h, h), nn.SiLU(), nn.Linear(h, 1))
        self.bias = nn.Parameter(torch.tensor([float(mean)]))

    def forward(self, a):
        h, _, mask = split_extra(a)
        return (self.mlp(h) * mask).sum(1) + self.bias


def data(args):
    return cached(("qm9-packed", args.data_dir, args.max_molecules), lambda: _load(args.data_dir, args.max_molecules))


def _load(data_dir, max_molecules):
    graphs = load_qm9(data_dir, max_molecules)
    tr, te = split_qm9(graphs, 0.2, seed=0)
    a = max(g.num_nodes for g in graphs)
    note = (f"QM9 subset: {len(graphs)} molecules ({len(tr)} train / {len(te)} test), up to {a} atoms "
            f"incl. H packed as [{a}, {graphs[0].x.shape[1]}+{EXTRA}], target mu (Debye)")
    meta = {"baseline_mae": mean_baseline_mae(tr, te), "mean": float(torch.cat([g.y.flatten() for g in tr]).mean())}
    return (Split(pack(tr, a), torch.cat([g.y for g in tr]), note, meta),
            Split(pack(te, a), torch.cat([g.y for g in te]), note, meta))


def layers(args):
    train, _ = data(args)
    f, h = train.x.shape[-1] - EXTRA, args.hidden
    specs = [LayerSpec("embed", lambda: Embed(f, h))]
    specs += [LayerSpec(f"interact{i + 1}", lambda: Interaction(h, args.rbf, args.cutoff)) for i in range(args.depth)]
    return specs + [LayerSpec("head", lambda m=train.meta["mean"]: Head(h, m))]


def report(last, train, test, args):
    return (f"test MAE {last['test_loss']:.3f} D vs mean-predictor baseline "
            f"{test.meta['baseline_mae']:.3f} D (train MAE {last['train_loss']:.3f} D)")


def add_args(p):
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--depth", type=int, default=3, help="interaction layers")
    p.add_argument("--rbf", type=int, default=16, help="Gaussian distance features per pair")
    p.add_argument("--cutoff", type=float, default=3.0, help="neighbour radius in Å")
    p.add_argument("--max-molecules", type=int, default=None, help="first N molecules of the subset")


EXAMPLE = Example(
    name="hybrid-gnn-qm9",
    summary="message-passing GNN for the QM9 dipole moment, layers split over stages (--grid pp=P,dp=D), "
            "Adam + MAE, test MAE in Debye",
    layers=layers,
    data=data,
    loss=nn.L1Loss,
    optimizer=lambda params, args: torch.optim.Adam(params, lr=args.lr),
    task="regression",
    defaults=dict(epochs=2, batch_size=64, lr=2e-3, balance="layers", microbatches=2),
    add_args=add_args,
    report=report,
)
