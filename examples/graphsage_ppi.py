"""Unsupervised GraphSAGE node embeddings on PPI (SYNTHETIC unless --data-dir), layers split over stages.

Every training sample is a link triple (anchor u, neighbour v, random node n of the same graph),
each node carried as its neighbour-sampled computation tree (fan-outs --fanout, uniform, drawn once
from --seed), so a batch is one tensor of node ids [B, 3, 1 + k1 + k1*k2] and the shared trainer's
batching and --grid work unchanged. Node inputs are the 50 features plus a learnable embedding row
(nn.Embedding(sparse=True), optimised by SparseAdam; the dense weights by Adam). Loss: the
GraphSAGE link-reconstruction loss -log s(z_u.z_v) - log s(-z_u.z_n). Quality: micro-F1 of a
logistic-regression classifier on the frozen embeddings (fit on train-graph nodes, scored on test).
"""
import torch
from torch import nn

from mpipar.data.common import Split
from mpipar.data.ppi import load_ppi
from mpipar.example import Example
from mpipar.model import LayerSpec
from mpipar.train.callbacks import AfterBackward

SCALE = 2.0   # link logits are SCALE x cosine similarity


class Graphs:
    """All graphs as one disjoint union: features, labels, CSR neighbours, split node ranges."""

    def __init__(self, splits):
        xs, ys, rows, cols, self.ranges, off = [], [], [], [], {}, 0
        for name in ("train", "valid", "test"):
            start = off
            for g in splits[name]:
                xs.append(g.x), ys.append(g.y)
                rows.append(g.edge_index[0] + off), cols.append(g.edge_index[1] + off)
                self.ranges.setdefault(name, []).append((off, off + g.num_nodes))
                off += g.num_nodes
            self.ranges[name + "_all"] = (start, off)
        self.x, self.y = torch.cat(xs), torch.cat(ys)
        row, col = torch.cat(rows), torch.cat(cols)
        order = torch.argsort(row * off + col)
        self.col, self.n = col[order], off
        self.deg = torch.bincount(row, minlength=off)
        self.ptr = torch.cat([torch.zeros(1, dtype=torch.long), self.deg.cumsum(0)])

    def neighbours(self, nodes, k, g):
        """[len(nodes), k] uniform samples with replacement (isolated nodes sample themselves)."""
        r = torch.rand(len(nodes), k, generator=g)
        d = self.deg[nodes].unsqueeze(1)
        pick = self.col[(self.ptr[nodes].unsqueeze(1) + (r * d).long()).clamp(max=len(self.col) - 1)]
        return torch.where(d > 0, pick, nodes.unsqueeze(1))

    def trees(self, roots, fanout, g):
        """[len(roots), 1 + k1 + k1*k2] node ids: root, its sampled neighbours, theirs."""
        levels, frontier = [roots.unsqueeze(1)], roots.unsqueeze(1)
        for k in fanout:
            frontier = self.neighbours(frontier.reshape(-1), k, g).reshape(len(roots), -1)
            levels.append(frontier)
        return torch.cat(levels, 1)


def fanout(args):
    return [int(k) for k in args.fanout.split(",")]


def graphs(args):
    if not hasattr(args, "_ppi"):
        splits, note = load_ppi(args.data_dir, args.seed)
        args._ppi = (Graphs(splits), note)
    return args._ppi


def triples(G, lo, hi, count, fo, g):
    """`count` link triples from nodes [lo, hi): trees of anchor, a neighbour, a random node."""
    u = torch.randint(lo, hi, (count,), generator=g)
    v = G.neighbours(u, 1, g)[:, 0]
    n = torch.randint(lo, hi, (count,), generator=g)
    return torch.stack([G.trees(t, fo, g) for t in (u, v, n)], 1).float()   # ids < 2^24: exact


def data(args):
    if not hasattr(args, "_data"):
        G, note = graphs(args)
        g, fo = torch.Generator().manual_seed(args.seed), fanout(args)
        per = max(1, args.pairs // len(G.ranges["train"]))
        tr = torch.cat([triples(G, lo, hi, per, fo, g) for lo, hi in G.ranges["train"]])
        te = torch.cat([triples(G, lo, hi, 256, fo, g) for lo, hi in G.ranges["test"]])
        args._data = (Split(tr, torch.zeros(len(tr), 1), note), Split(te, torch.zeros(len(te), 1), note))
    return args._data


class NodeInput(nn.Module):
    """Node ids -> [features, learnable embedding row]; the table's gradient is sparse."""

    def __init__(self, G, dim, sparse):
        super().__init__()
        self.register_buffer("feats", G.x, persistent=False)
        self.table = nn.Embedding(G.n, dim, sparse=sparse)
        nn.init.normal_(self.table.weight, std=0.01)   # unseen (test) nodes stay near 0

    def forward(self, ids):
        ids = ids.long()
        return torch.cat([self.feats[ids], self.table(ids)], -1)


class Sage(nn.Module):
    """Mean-aggregator GraphSAGE layer on tree levels: each node's new state from itself and the
    mean of its k children; the deepest level is consumed, so the tree shrinks by one level."""

    def __init__(self, c_in, c_out, fo, last):
        super().__init__()
        self.fo, self.last = fo, last
        self.lin = nn.Linear(2 * c_in, c_out)

    def forward(self, h):
        sizes, out, start = [1], [], 0
        for k in self.fo:
            sizes.append(sizes[-1] * k)
        for lvl, k in enumerate(self.fo):
            me = h[..., start:start + sizes[lvl], :]
            kids = h[..., start + sizes[lvl]:start + sizes[lvl] + sizes[lvl + 1], :]
            agg = kids.reshape(*me.shape[:-1], k, kids.shape[-1]).mean(-2)
            out.append(self.lin(torch.cat([me, agg], -1)))
            start += sizes[lvl]
        z = torch.cat(out, -2)
        return z if self.last else z.relu()


class Project(nn.Module):
    """Final linear map to unit-length node embeddings."""

    def __init__(self, h):
        super().__init__()
        self.lin = nn.Linear(h, h)

    def forward(self, z):
        return nn.functional.normalize(self.lin(z.relu()), dim=-1)


def dense_table_grad(args) -> bool:
    """Data-parallel replicas sum the table gradient with the dense ring all-reduce."""
    dp = [v for k, _, v in (part.partition("=") for part in (args.grid or "").split(",")) if k.strip() == "dp"]
    return args.dense_table_grad or (args.grid or "").strip() == "dp" or any(v.strip() not in ("", "1") for v in dp)


def layers(args):
    G, _ = graphs(args)
    fo, h, d = fanout(args), args.hidden, args.emb_dim
    specs = [LayerSpec("input", lambda: NodeInput(G, d, sparse=not dense_table_grad(args)))]
    dims = [G.x.shape[1] + d] + [h] * len(fo)
    for i in range(len(fo)):
        specs.append(LayerSpec(f"sage{i + 1}", lambda i=i: Sage(dims[i], dims[i + 1], fo[:len(fo) - i],
                                                                 last=(i == len(fo) - 1))))
    return specs + [LayerSpec("project", lambda: Project(h))]


class LinkLoss(nn.Module):
    """out [B, 3, 1, H] (anchor, neighbour, negative) -> mean link-reconstruction loss."""

    def forward(self, out, y):
        z = out.reshape(out.shape[0], 3, -1) * SCALE   # unit vectors: scaled so s() can saturate
        pos = (z[:, 0] * z[:, 1]).sum(-1)
        neg = (z[:, 0] * z[:, 2]).sum(-1)
        return (nn.functional.softplus(-pos) + nn.functional.softplus(neg)).mean()


class TwoOptimizers:
    """SparseAdam for the embedding table (sparse gradients), Adam for every dense weight."""

    def __init__(self, params, lr):
        params = list(params)
        sparse = [p for p in params if p.dim() == 2 and getattr(p, "_sparse_table", False)]
        dense = [p for p in params if not any(p is s for s in sparse)]
        self.opts = ([torch.optim.SparseAdam(sparse, lr=lr)] if sparse else []) + \
                    ([torch.optim.Adam(dense, lr=lr)] if dense else [])

    def zero_grad(self, set_to_none=True):
        for o in self.opts:
            o.zero_grad(set_to_none=set_to_none)

    def step(self):
        for o in self.opts:
            o.step()


def optimizer(params, args):
    params = list(params)
    G, _ = graphs(args)
    for p in params:   # the table is the only [num_nodes, emb_dim] parameter
        if p.shape == (G.n, args.emb_dim):
            p._sparse_table = True
    return TwoOptimizers(params, args.lr)


def sparsify(trainer, args):
    """After a dense (data-parallel) reduction of the table's gradient: keep only touched rows
    as a sparse gradient, so SparseAdam still updates just those rows."""
    def hook(tr):
        for p in tr.params:
            if getattr(p, "_sparse_table", False) and p.grad is not None and not p.grad.is_sparse:
                rows = p.grad.abs().sum(1).nonzero().flatten()
                p.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), p.grad[rows], p.grad.shape,
                                                 is_coalesced=True, check_invariants=False)
    trainer.callbacks.append(AfterBackward(hook))


@torch.no_grad()
def micro_f1(trainer, train, test, args, log):
    """Embed nodes of the train and test graphs with the trained model (pipeline forward), fit a
    logistic regression on train-graph nodes, report micro-F1 on the test graphs."""
    G, note = graphs(args)
    g, fo = torch.Generator().manual_seed(args.seed + 1), fanout(args)
    lo, hi = G.ranges["train_all"]
    tr_nodes = torch.randperm(hi - lo, generator=g)[:args.eval_nodes] + lo
    te_nodes = torch.arange(*G.ranges["test_all"])
    embs = [None, None]
    trainer.module.eval()
    for j, nodes in enumerate((tr_nodes, te_nodes) if trainer.topo.dp_rank == 0 else ()):   # one replica
        got = []
        for chunk in nodes.split(512):
            t = G.trees(chunk, fo, g).float().unsqueeze(1).expand(-1, 3, -1).contiguous()
            trainer.pipe.forward_only(t, torch.zeros(len(t), 1), lambda mb, out: got.append(out[:, 0].reshape(len(out), -1)))
        embs[j] = torch.cat(got) if got else None
    trainer.module.train()
    f1 = -1.0
    if embs[0] is not None:
        f1 = logistic_f1(embs[0], G.y[tr_nodes], embs[1], G.y[te_nodes])
    f1 = float(trainer.topo.world.allgather_floats([f1]).max())
    raw = logistic_f1(G.x[tr_nodes], G.y[tr_nodes], G.x[te_nodes], G.y[te_nodes]) if trainer.topo.world.rank == 0 else 0.0
    return (f"micro-F1 {f1:.3f} vs {raw:.3f} on raw features (logistic regression on frozen embeddings, "
            f"{len(tr_nodes)} train-graph nodes -> "
            f"{len(te_nodes)} test-graph nodes); {len(trainer.step_seconds) / max(sum(trainer.step_seconds), 1e-9) / max(len(train), 1) * args.batch_size:.2f} "
            f"epochs/s (last epoch's steps); data: {note}")


def logistic_f1(xtr, ytr, xte, yte, iters=300):
    torch.manual_seed(0)
    with torch.enable_grad():
        lin = nn.Linear(xtr.shape[1], ytr.shape[1])
        opt = torch.optim.Adam(lin.parameters(), lr=0.05)
        for _ in range(iters):
            opt.zero_grad()
            nn.functional.binary_cross_entropy_with_logits(lin(xtr), ytr).backward()
            opt.step()
    pred = (lin(xte) > 0).float()
    tp, fp, fn = (pred * yte).sum(), (pred * (1 - yte)).sum(), ((1 - pred) * yte).sum()
    return float(2 * tp / (2 * tp + fp + fn))


def add_args(p):
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--emb-dim", type=int, default=16, help="learnable embedding per node (SparseAdam)")
    p.add_argument("--fanout", default="10,5", help="neighbours sampled per level (one SAGE layer each)")
    p.add_argument("--pairs", type=int, default=20000, help="training link triples (split over train graphs)")
    p.add_argument("--eval-nodes", type=int, default=4000, help="train-graph nodes for the linear classifier")
    p.add_argument("--dense-table-grad", action="store_true",
                   help="dense table gradient, sparsified before SparseAdam (automatic when --grid has dp > 1)")


EXAMPLE = Example(
    name="graphsage-ppi",
    summary="unsupervised GraphSAGE on PPI (SYNTHETIC unless --data-dir), SAGE layers split over stages, "
            "SparseAdam for the embedding table, micro-F1 of a linear classifier",
    layers=layers,
    data=data,
    loss=LinkLoss,
    optimizer=optimizer,
    task="regression",
    defaults=dict(epochs=2, batch_size=256, lr=5e-3, balance="layers"),
    add_args=add_args,
    on_trainer=sparsify,
    after_fit=micro_f1,
)
