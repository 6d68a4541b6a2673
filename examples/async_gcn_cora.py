"""Asynchronous GCN on Cora: workers push gradients to parameter-server ranks with bounded staleness, RMSprop + cross-entropy, batches/s and test accuracy.

Ranks 0..S-1 serve (`--servers S`), the others are workers. Each worker holds the whole model
and the whole graph (full-graph forward) but computes its loss on its own share of the 140
training nodes (every W-th one), pushes the gradient and continues with whatever parameters
the servers answer; `--max-staleness k` bounds how many versions old a gradient may be when
applied (k=0: synchronous, all W gradients of a round averaged into one update).

One epoch = W pushes (every training node's gradient contributed once, on average); the
servers stop every worker after `--epochs` of them, however they were shared out, so a fast
worker does more of the work than a straggler (`--slow-rank R --slow-factor F` makes worker
rank R sleep (F-1) x its compute time per step; with `--step-time T` every step is padded to T
seconds and the straggler's to F x T, emulating a core per worker). `--compare-sync` first runs
the same job with k=0, then with k, and prints both throughputs and accuracies. `--steps N`
caps each worker at N pushes; `--batch-size` does not apply (each step is the full graph).

Dropout acts on the hidden layer only: input dropout over the dense 2708 x 1433 bag-of-words
costs five times the rest of a step on one CPU thread. Test accuracy is measured after
training on snapshots the first non-straggling worker kept (timed run undisturbed).
"""
import functools
import json
from pathlib import Path

import torch
from torch import nn

from mpipar.async_ps import AsyncPlan, Roles, train_async
from mpipar.async_ps.training import check_plan
from mpipar.async_ps.report import evaluate_all, histogram_lines, share_snapshots, time_to
from mpipar.app.datasets.cora import load_cora
from mpipar.app.example import Example
from mpipar.extras import need
from mpipar.train.metrics import format_row


class GCN(nn.Module):
    """Two GCN layers over the fixed Cora graph (normalised adjacency cached after one call)."""

    def __init__(self, c_in, hidden, classes, dropout):
        super().__init__()
        GCNConv = need("torch_geometric.nn", "async-gcn-cora").GCNConv
        self.conv1, self.conv2 = GCNConv(c_in, hidden, cached=True), GCNConv(hidden, classes, cached=True)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, edge_index):
        return self.conv2(self.drop(self.conv1(x, edge_index).relu()), edge_index)


def make_plan(args, g, workers: int, k: int) -> AsyncPlan:
    shards = [g.train_mask.nonzero().flatten()[w::workers] for w in range(workers)]
    classes = int(g.y.max()) + 1

    def model():
        torch.manual_seed(args.seed)
        return GCN(g.num_features, args.hidden, classes, args.dropout)

    def grad_step(m, w, step):
        if step == 0:
            torch.manual_seed(args.seed + 1 + w)   # each worker its own dropout masks
        m.train()
        loss = nn.functional.cross_entropy(m(g.x, g.edge_index)[shards[w]], g.y[shards[w]])
        loss.backward()
        return loss

    return AsyncPlan(model=model, grad_step=grad_step,
                     optimizer=lambda params: torch.optim.RMSprop(params, lr=args.lr, weight_decay=5e-4),
                     servers=args.servers, max_staleness=k, steps=args.steps or None,
                     budget=args.epochs * workers, slow_rank=args.slow_rank, slow_factor=args.slow_factor,
                     step_time=args.step_time,
                     snapshot_every=workers * args.eval_every, idle_poll=args.idle_poll or None)


def evaluator(g):
    @torch.no_grad()
    def evaluate(m):
        m.eval()
        out = m(g.x, g.edge_index)
        acc = {f"{n}_accuracy": float((out[mask].argmax(-1) == g.y[mask]).float().mean())
               for n, mask in (("test", g.test_mask), ("val", g.val_mask))}
        return {"test_loss": float(nn.functional.cross_entropy(out[g.test_mask], g.y[g.test_mask])), **acc}
    return evaluate


def run_once(world, args, g, k: int, log, metrics_name: str) -> dict:
    """Train once with max staleness k; rows evaluated on every rank, printed and written by rank 0."""
    W = world.size - args.servers
    plan = make_plan(args, g, W, k)
    result = train_async(world, plan)
    snaps = share_snapshots(world, result)
    evals = evaluate_all(world, [s.flat for s in snaps] + [result.final], plan.model(), evaluator(g))
    per_batch = int(g.train_mask.sum()) / W
    rows = [{"epoch": s.applied // W, "seconds": s.seconds, "applied": s.applied, "version": s.version,
             "train_loss": s.loss, **e, "batches_per_s": s.applied / s.seconds,
             "samples_per_s": s.applied * per_batch / s.seconds} for s, e in zip(snaps, evals)]
    bps = result.applied / max(result.seconds, 1e-9)
    final = {"epoch": result.applied // W, "seconds": result.seconds, "applied": result.applied,
             "version": result.updates, **evals[-1], "batches_per_s": bps, "samples_per_s": bps * per_batch,
             "final": True}
    straggler = f", straggler rank {args.slow_rank} x{args.slow_factor:g}" if args.slow_rank >= 0 else ""
    label = f"k={k}" + (" (synchronous)" if k == 0 else "")
    log(f"--- {label}: {args.servers} server(s), {W} worker(s){straggler}; reporter rank {result.reporter} ---")
    for row in rows:
        log(format_row(row))
    if world.rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / metrics_name).write_text("".join(json.dumps(r) + "\n" for r in rows + [final]))
    log(f"staleness of the {result.applied} applied gradients ({result.updates} updates), "
        f"max {result.max_staleness_seen} <= k={k}:")
    for line in histogram_lines(result.histogram):
        log(line)
    tta = time_to(rows + [final], "test_accuracy", args.target)
    return {"k": k, "seconds": result.seconds, "batches": result.applied, "updates": result.updates,
            "batches_per_s": bps, "samples_per_s": bps * per_batch, "test_accuracy": final["test_accuracy"],
            "val_accuracy": final["val_accuracy"], "test_loss": final["test_loss"], "time_to_target": tta,
            "target": args.target, "pushes_per_worker": result.pushes,
            "compute_ms_per_worker": [round(v, 1) for v in result.compute_ms], "histogram": result.histogram,
            "max_staleness_seen": result.max_staleness_seen,
            "last10_test_accuracy": sum(r["test_accuracy"] for r in rows[-10:]) / max(1, len(rows[-10:])),
            "rows": rows}


@functools.lru_cache(maxsize=2)
def cora(data_dir):
    """Loaded once per process (the benchmark runs the example several times)."""
    return load_cora(data_dir)


def main(args, world, log):
    W = world.size - args.servers
    check_plan(AsyncPlan(None, None, None, servers=args.servers, max_staleness=args.max_staleness,
                         steps=args.steps or None, budget=args.epochs * W, slow_rank=args.slow_rank),
               Roles(world.size, args.servers, world.rank))   # fail before loading anything
    g = cora(args.data_dir)
    log(f"example async-gcn-cora on {world.size} ranks: {args.servers} server(s), {W} worker(s), "
        f"{args.epochs} epochs of {W} pushes, RMSprop lr {args.lr}, seed {args.seed}")
    log(f"data: {g.note}")
    sync = run_once(world, args, g, 0, log, "sync_metrics.jsonl") if args.compare_sync and args.max_staleness else None
    res = run_once(world, args, g, args.max_staleness, log, "metrics.jsonl")

    def tta(r):
        return f"{r['time_to_target']:.1f} s" if r["time_to_target"] is not None else "not reached"
    if sync:
        log(f"sync vs async (k={args.max_staleness}): {sync['batches_per_s']:.1f} vs {res['batches_per_s']:.1f} "
            f"batches/s (x{res['batches_per_s'] / sync['batches_per_s']:.2f}), test accuracy "
            f"{sync['test_accuracy']:.4f} vs {res['test_accuracy']:.4f} "
            f"({100 * (res['test_accuracy'] - sync['test_accuracy']):+.1f} points), time to "
            f"{args.target:.0%}: {tta(sync)} vs {tta(res)}")
    log(f"summary: async-gcn-cora on {world.size} ranks ({args.servers} server(s), {W} workers, "
        f"k={args.max_staleness}), {res['batches']} batches in {res['seconds']:.1f} s: "
        f"{res['batches_per_s']:.1f} batches/s, test accuracy {res['test_accuracy']:.4f}, "
        f"time to {args.target:.0%} {tta(res)}, max staleness {res['max_staleness_seen']}, "
        f"pushes per worker {res['pushes_per_worker']}, compute ms/step per worker {res['compute_ms_per_worker']}")
    world.barrier()
    summary = {"example": "async-gcn-cora", "ranks": world.size, **{k: v for k, v in res.items() if k != "rows"}}
    if sync:
        summary["sync"] = {k: v for k, v in sync.items() if k != "rows"}
    return summary


def add_args(p):
    p.add_argument("--servers", type=int, default=1, help="parameter-server ranks (the first S ranks)")
    p.add_argument("--max-staleness", type=int, default=8, help="k: versions a gradient may lag (0: synchronous)")
    p.add_argument("--slow-rank", type=int, default=-1, help="world rank of a simulated straggler worker")
    p.add_argument("--slow-factor", type=float, default=3.0, help="the straggler's step takes this many times longer")
    p.add_argument("--step-time", type=float, default=0.0,
                   help="pad every step to this many seconds by sleeping (the straggler's to F times it): "
                        "emulates a core per worker on a box with fewer cores (0: off)")
    p.add_argument("--compare-sync", action="store_true", help="also run k=0 first and compare")
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--eval-every", type=int, default=1, help="epochs between accuracy snapshots")
    p.add_argument("--target", type=float, default=0.75, help="test accuracy for time-to-accuracy")
    p.add_argument("--idle-poll", type=float, default=5e-4,
                   help="seconds between checks while a rank waits (0: spin in MPI; spinning steals "
                        "CPU from computing ranks when ranks outnumber cores)")


EXAMPLE = Example(
    name="async-gcn-cora",
    summary="asynchronous GCN on Cora: parameter servers, bounded staleness, straggler, sync comparison",
    defaults=dict(epochs=200, lr=0.01),
    add_args=add_args,
    main=main,
)
