"""Unsupervised GraphSAGE node embeddings on PPI (SYNTHETIC unless --data-dir), layers split over stages.

Every training sample is a link triple (anchor u, neighbour v, random node n of the same graph),
each node carried as its neighbour-sampled computation tree (fan-outs --fanout, uniform, drawn once
from --seed), so a batch is one tensor of node ids [B, 3, 1 + k1 + k1*k2] and the shared trainer's
batching and --grid work unchanged. Node inputs are the 50 features plus a learnable embedding row
(nn.Embedding(sparse=True), optimised by SparseAdam; the dense weights by Adam). Loss: the
GraphSAGE link-reconstruction loss -log s(z_u.z_v) - log s(-z_u.z_n) on unit-length embeddings.
Quality: micro-F1 of a logistic-regression classifier on the frozen, standardised embeddings (fit
on train-graph nodes, scored on the unseen test graphs), each node's embedding averaged over
--eval-samples neighbour samples.

Why the encoder looks the way it does: the labels are mostly a linear function of a node's OWN
features, which say nothing about its links (in the synthetic data features and links are
independent), so link reconstruction gives no reason to keep them. A narrow ReLU stack loses them
(micro-F1 0.42 against 0.90 on raw features), and so does a table that memorises the training
graphs' links. Hence: SAGE layers in GraphSAGE's concat form (own state and neighbour mean mapped
separately), ReLU on the neighbour half only, 256 wide; table rows dropped at random in training;
no final ReLU+Linear before the normalisation.
"""
import torch
from torch import nn

from mpipar.app.datasets.cache import cached
from mpipar.app.datasets.common import Split
from mpipar.app.datasets.ppi import load_ppi
from mpipar.app.example import Example
from mpipar.model import LayerSpec
from mpipar.callbacks import AfterBackward
from mpipar.data_parallel.partitioned import MARK, RowOwners, fetch_rows

SCALE = 5.0   # link logits are SCALE x cosine similarity (temperature 0.2: s() can saturate)


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
    def load():
        splits, note = load_ppi(args.data_dir, args.seed)
        return Graphs(splits), note
    return cached(("ppi-graphs", args.data_dir, args.seed), load)


def triples(G, lo, hi, count, fo, g):
    """`count` link triples from nodes [lo, hi): trees of anchor, a neighbour, a random node."""
    u = torch.randint(lo, hi, (count,), generator=g)
    v = G.neighbours(u, 1, g)[:, 0]
    n = torch.randint(lo, hi, (count,), generator=g)
    return torch.stack([G.trees(t, fo, g) for t in (u, v, n)], 1).float()   # ids < 2^24: exact


def data(args):
    def load():
        G, note = graphs(args)
        g, fo = torch.Generator().manual_seed(args.seed), fanout(args)
        per = max(1, args.pairs // len(G.ranges["train"]))
        tr = torch.cat([triples(G, lo, hi, per, fo, g) for lo, hi in G.ranges["train"]])
        te = torch.cat([triples(G, lo, hi, 256, fo, g) for lo, hi in G.ranges["test"]])
        return Split(tr, torch.zeros(len(tr), 1), note), Split(te, torch.zeros(len(te), 1), note)
    return cached(("graphsage-ppi-triples", args.data_dir, args.seed, args.pairs, args.fanout), load)


class NodeInput(nn.Module):
    """Node ids -> [features, learnable embedding row]; the table's gradient is sparse.
    In training a fraction `drop` of the looked-up rows reads as zero (and gets no gradient), as
    every row of an unseen test graph does: otherwise the table memorises the training graphs'
    links and the layers above never learn to use the features.
    `partitioned` (data parallel): after attach(dp_world) this rank keeps only its own nodes'
    feature and table rows and fetches the others' from their owners (data_parallel/partitioned.py);
    their gradients go back to the owners as sparse rows."""

    def __init__(self, G, dim, sparse, drop=0.0, partitioned=False):
        super().__init__()
        self.register_buffer("feats", G.x, persistent=False)
        self.table = nn.Embedding(G.n, dim, sparse=sparse)
        self.drop, self.owners = drop, None
        nn.init.normal_(self.table.weight, std=0.01)   # unseen (test) nodes stay near 0
        if partitioned:
            setattr(self.table.weight, MARK, True)

    def attach(self, world) -> None:
        """Keep this rank's rows only (collective over `world`, every replica of this stage)."""
        self.owners = RowOwners(self.feats.shape[0], world)
        lo, hi = self.owners.lo, self.owners.hi
        self.feats = self.feats[lo:hi].clone()
        self.table.weight.data = self.table.weight.data[lo:hi].clone()

    def forward(self, ids):
        ids = ids.long()
        drop = self.training and self.drop > 0
        keep = torch.rand(ids.shape) >= self.drop if drop else None
        if self.owners is not None:
            feats, rows = fetch_rows(ids, self.owners, None if drop else self.table.weight, self.feats)
            if drop:
                rows = self.table.weight.new_zeros(*ids.shape, self.table.embedding_dim)
                rows[keep] = fetch_rows(ids[keep], self.owners, self.table.weight)[1]
            return torch.cat([feats, rows], -1)
        if not drop:
            return torch.cat([self.feats[ids], self.table(ids)], -1)
        rows = self.table.weight.new_zeros(*ids.shape, self.table.embedding_dim)
        rows[keep] = self.table(ids[keep])
        return torch.cat([self.feats[ids], rows], -1)


class Sage(nn.Module):
    """Mean-aggregator GraphSAGE layer on tree levels: each node's new state from itself and the
    mean of its k children; the deepest level is consumed, so the tree shrinks by one level.
    Concat form [W_self me, W_neigh mean(kids)] (as in GraphSAGE's reference code) with the ReLU
    (not in the last layer) on the neighbour half only: a node's own features reach the embedding
    through linear maps, because a ReLU of a random projection is a poor linear read-out of them."""

    def __init__(self, c_in, c_out, fo, last):
        super().__init__()
        self.fo, self.last = fo, last
        self.self_lin = nn.Linear(c_in, c_out // 2)
        self.neigh_lin = nn.Linear(c_in, c_out - c_out // 2)

    def forward(self, h):
        sizes = [1]
        for k in self.fo:
            sizes.append(sizes[-1] * k)
        levels = h.split(sizes, -2)   # split, not slices: its backward is one cat, no zero-filled copies
        me = torch.cat(levels[:-1], -2)
        agg = torch.cat([kids.reshape(*lv.shape[:-1], k, kids.shape[-1]).mean(-2)
                         for lv, kids, k in zip(levels, levels[1:], self.fo)], -2)
        n = self.neigh_lin(agg)
        return torch.cat([self.self_lin(me), n if self.last else n.relu()], -1)


class Normalize(nn.Module):
    """Unit-length node embeddings (the link logits are scaled cosines)."""

    def forward(self, z):
        return nn.functional.normalize(z, dim=-1)


def data_parallel(args) -> bool:
    dp = [v for k, _, v in (part.partition("=") for part in (args.grid or "").split(",")) if k.strip() == "dp"]
    return (args.grid or "").strip() == "dp" or any(v.strip() not in ("", "1") for v in dp)


def partitioned(args) -> bool:
    """Data parallel: the nodes' features and table rows partitioned over the replicas (default)."""
    return data_parallel(args) and not args.dense_table_grad


def dense_table_grad(args) -> bool:
    """--dense-table-grad: every replica holds the whole table; the ring all-reduce sums its
    gradient densely (the whole table moves every step), sparsified before SparseAdam."""
    return args.dense_table_grad


def layers(args):
    G, _ = graphs(args)
    fo, h, d = fanout(args), args.hidden, args.emb_dim
    specs = [LayerSpec("input", lambda: NodeInput(G, d, sparse=not dense_table_grad(args), drop=args.table_dropout,
                                                  partitioned=partitioned(args)))]
    dims = [G.x.shape[1] + d] + [h] * len(fo)
    for i in range(len(fo)):
        specs.append(LayerSpec(f"sage{i + 1}", lambda i=i: Sage(dims[i], dims[i + 1], fo[:len(fo) - i],
                                                                 last=(i == len(fo) - 1))))
    return specs + [LayerSpec("normalize", Normalize)]


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


def on_trainer(trainer, args):
    """Partitioned: the first stage's replicas keep their own rows. Dense: sparsify after the
    all-reduce."""
    for layer in trainer.module.modules():
        if isinstance(layer, NodeInput) and is_marked(layer):
            layer.attach(trainer.topo.dp_world)
            trainer.log(f"graph partitioned over {trainer.topo.grid.dp} replicas: rank {trainer.topo.world.rank} owns "
                        f"nodes [{layer.owners.lo}, {layer.owners.hi}) of {int(layer.owners.bounds[-1])} "
                        f"(features and table rows); the rest are fetched by message")
    if dense_table_grad(args):
        sparsify(trainer, args)


def is_marked(layer: NodeInput) -> bool:
    return bool(getattr(layer.table.weight, MARK, False))


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
    logistic regression on train-graph nodes, report micro-F1 on the test graphs. A node's
    embedding is the mean over --eval-samples sampled computation trees: one sample of 10 of ~27
    neighbours is a noisy neighbourhood mean, and the labels depend on the exact one."""
    G, note = graphs(args)
    g, fo = torch.Generator().manual_seed(args.seed + 1), fanout(args)
    lo, hi = G.ranges["train_all"]
    tr_nodes = torch.randperm(hi - lo, generator=g)[:args.eval_nodes] + lo
    te_nodes = torch.arange(*G.ranges["test_all"])
    embs = [None, None]
    trainer.module.eval()
    inputs = [m for m in trainer.module.modules() if isinstance(m, NodeInput)]
    spread = partitioned(args)      # replicas fetch each other's rows: all embed, in lockstep
    moved = inputs[0].owners.bytes_sent if inputs and inputs[0].owners else None
    for j, nodes in enumerate((tr_nodes, te_nodes) if spread or trainer.topo.dp_rank == 0 else ()):
        got = []
        for chunk in nodes.split(512):
            t = torch.stack([G.trees(chunk, fo, g) for _ in range(args.eval_samples)], 1).float()
            trainer.pipe.forward_only(t, torch.zeros(len(t), 1), lambda mb, out: got.append(out.reshape(*t.shape[:2], -1).mean(1)))
        embs[j] = torch.cat(got) if got else None
    trainer.module.train()
    f1 = -1.0
    if embs[0] is not None and trainer.topo.dp_rank == 0:
        f1 = logistic_f1(embs[0], G.y[tr_nodes], embs[1], G.y[te_nodes])
    f1 = float(trainer.topo.world.allgather_floats([f1]).max())
    raw = logistic_f1(G.x[tr_nodes], G.y[tr_nodes], G.x[te_nodes], G.y[te_nodes]) if trainer.topo.world.rank == 0 else 0.0
    traffic = ""
    if spread:     # what training moved (counted before the evaluation's fetches), per first-stage rank
        per = trainer.topo.world.allgather_floats([moved if moved is not None else float("nan")])[:, 0]
        per = per[per == per]
        n, steps = trainer.topo.grid.dp, max(trainer.step_count, 1)
        ring = 2 * (n - 1) / n * G.n * args.emb_dim * 4
        traffic = (f"graph partitioned over {n} replicas: training sent {per.mean() / steps / 2**20:.2f} MiB per step "
                   f"per rank (node ids, feature rows, table rows and their gradients), against "
                   f"{ring / 2**20:.2f} MiB per step per rank for a ring all-reduce of the dense table alone "
                   f"(--dense-table-grad, which also keeps every feature row on every rank); ")
    return (traffic + f"micro-F1 {f1:.3f} vs {raw:.3f} on raw features (logistic regression on frozen standardised "
            f"embeddings, each the mean of {args.eval_samples} neighbour samples; {len(tr_nodes)} train-graph nodes -> "
            f"{len(te_nodes)} test-graph nodes); {len(trainer.step_seconds) / max(sum(trainer.step_seconds), 1e-9) / max(len(train), 1) * args.batch_size:.2f} "
            f"epochs/s (last epoch's steps); data: {note}")


def logistic_f1(xtr, ytr, xte, yte, iters=300):
    """Multi-label logistic regression (full-batch Adam) on inputs standardised with the training
    nodes' mean and std, threshold 0; micro-F1 on the test nodes."""
    mu, sd = xtr.mean(0), xtr.std(0).clamp(min=1e-6)
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
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
    p.add_argument("--hidden", type=int, default=256, help="width of each SAGE layer and of the embeddings")
    p.add_argument("--emb-dim", type=int, default=16, help="learnable embedding per node (SparseAdam)")
    p.add_argument("--fanout", default="10,5", help="neighbours sampled per level (one SAGE layer each)")
    p.add_argument("--pairs", type=int, default=20000, help="training link triples (split over train graphs)")
    p.add_argument("--eval-nodes", type=int, default=4000, help="train-graph nodes for the linear classifier")
    p.add_argument("--eval-samples", type=int, default=8,
                   help="neighbour samples averaged into each node's embedding for the classifier")
    p.add_argument("--table-dropout", type=float, default=0.5,
                   help="fraction of table rows read as zero in training (test graphs' rows are untrained)")
    p.add_argument("--dense-table-grad", action="store_true",
                   help="data parallel: replicate the whole table and all-reduce its gradient densely "
                        "(default with dp > 1: nodes partitioned over the replicas, rows fetched by message)")


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
    on_trainer=on_trainer,
    after_fit=micro_f1,
)
