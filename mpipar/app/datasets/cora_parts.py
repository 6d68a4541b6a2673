"""Cora cut into K sub-graphs (cluster-GCN style), each one SAMPLE, so a pipeline has samples to
cut into micro-batches and data-parallel replicas have samples to share.

Each part keeps only the edges inside it. Every part gets the same number of train nodes and the
same number of test nodes (and, as near as the counts allow, of the others): a loss that is the
mean over a sample's labelled nodes then averages over samples exactly as over nodes, so
micro-batches and replicas add up to the full batch's gradient (the trainer weights each
micro-batch by its share of samples). Pure numpy: seeded breadth-first growth under those quotas,
then swaps between parts (same kind of node, so quotas hold) that keep more edges.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from .common import fail
from .cora import load_cora

OTHER, TRAIN, TEST = 0, 1, 2
KINDS = ("other", "train", "test")


def split_evenly(count: int, parts: int) -> np.ndarray:
    """`count` items over `parts` bins: sizes differing by at most one, the larger ones first."""
    return np.array([count // parts + (p < count % parts) for p in range(parts)], dtype=np.int64)


def neighbours(edge_index: np.ndarray, num_nodes: int) -> list[np.ndarray]:
    """Sorted, de-duplicated undirected neighbour lists (no self loops): a fixed visiting order."""
    src, dst = np.concatenate([edge_index[0], edge_index[1]]), np.concatenate([edge_index[1], edge_index[0]])
    keep = src != dst
    pairs = np.unique(np.stack([src[keep], dst[keep]], 1), axis=0)
    cut = np.searchsorted(pairs[:, 0], np.arange(num_nodes + 1))
    return [pairs[cut[v]:cut[v + 1], 1] for v in range(num_nodes)]


def hops_from(starts, nbrs) -> np.ndarray:
    """Breadth-first hop count from the nearest of `starts` (-1: unreachable)."""
    dist = np.full(len(nbrs), -1, dtype=np.int64)
    q = deque(starts)
    dist[list(starts)] = 0
    while q:
        v = q.popleft()
        for u in nbrs[v]:
            if dist[u] < 0:
                dist[u] = dist[v] + 1
                q.append(u)
    return dist


def seeds(nbrs, parts: int) -> list[int]:
    """The best-connected node, then each next seed as far (in hops) from the chosen ones as its
    component allows, so parts start apart and grow into distinct regions."""
    degree = np.array([len(n) for n in nbrs])
    chosen = [int(np.argmax(degree))]
    while len(chosen) < parts:
        dist = hops_from(chosen, nbrs).astype(float)
        dist[chosen] = -1
        score = dist * (len(nbrs) + 1) + degree      # farthest first, then best connected
        chosen.append(int(np.argmax(score)))
    return chosen


def grow(nbrs, kind: np.ndarray, parts: int) -> np.ndarray:
    """Part of every node: breadth-first growth from the seeds, one node per part in turn, each
    part taking only nodes whose kind still has room in its quota (a part whose frontier runs dry
    restarts from the lowest-numbered node that fits: Cora has 78 components)."""
    n_kinds = int(kind.max()) + 1
    quota = np.stack([split_evenly(int((kind == k).sum()), parts) for k in range(n_kinds)], 1)
    part = np.full(len(kind), -1, dtype=np.int64)
    frontier = [deque([s]) for s in seeds(nbrs, parts)]
    left = len(kind)
    while left:
        for p in range(parts):
            if not quota[p].any():
                continue
            v = -1
            while frontier[p]:
                u = frontier[p].popleft()
                if part[u] < 0 and quota[p, kind[u]]:
                    v = u
                    break
            if v < 0:
                v = int(np.flatnonzero((part < 0) & (quota[p, kind] > 0))[0])
            part[v] = p
            quota[p, kind[v]] -= 1
            left -= 1
            frontier[p].extend(int(u) for u in nbrs[v] if part[u] < 0)
            if not left:
                break
    return part


def refine(part: np.ndarray, nbrs, kind: np.ndarray, parts: int, max_swaps: int = 5000) -> np.ndarray:
    """Swap pairs of same-kind nodes between two parts while a swap keeps more edges inside
    parts (Kernighan-Lin style, best pair first); quotas are unchanged by construction."""
    part = part.copy()
    links = np.zeros((len(part), parts), dtype=np.int64)   # links[v, q]: v's neighbours in part q
    for v, ns in enumerate(nbrs):
        np.add.at(links[v], part[ns], 1)
    nodes = np.arange(len(part))
    for _ in range(max_swaps):
        best = None
        own = links[nodes, part]
        for p in range(parts):
            for q in range(p + 1, parts):
                for k in np.unique(kind):
                    a = np.flatnonzero((part == p) & (kind == k))
                    b = np.flatnonzero((part == q) & (kind == k))
                    if not len(a) or not len(b):
                        continue
                    ga, gb = links[a, q] - own[a], links[b, p] - own[b]
                    i, j = int(np.argmax(ga)), int(np.argmax(gb))
                    va, vb = int(a[i]), int(b[j])
                    gain = int(ga[i] + gb[j]) - 2 * int(vb in nbrs[va])
                    if gain > 0 and (best is None or gain > best[0]):
                        best = (gain, va, vb)
        if best is None:
            break
        for v, to in ((best[1], part[best[2]]), (best[2], part[best[1]])):
            links[nbrs[v], part[v]] -= 1
            links[nbrs[v], to] += 1
            part[v] = to
    return part


def partition(edge_index, kind, parts: int) -> np.ndarray:
    """Part (0..parts-1) of every node, deterministic, with locality and equal quotas per kind."""
    edge_index, kind = np.asarray(edge_index), np.asarray(kind)
    nbrs = neighbours(edge_index, len(kind))
    return refine(grow(nbrs, kind, parts), nbrs, kind, parts)


def normalized_adjacency(edges: torch.Tensor, n_real: int, n: int) -> torch.Tensor:
    """[n, n] D^-1/2 (A + I) D^-1/2 over the first n_real nodes (edges local, both directions
    present); rows and columns of padding nodes stay zero."""
    a = torch.zeros(n, n)
    a[edges[0], edges[1]] = 1.0
    a[edges[1], edges[0]] = 1.0
    idx = torch.arange(n_real)
    a[idx, idx] = 1.0
    d = a.sum(1).clamp(min=1).rsqrt() * (a.sum(1) > 0)
    return d[:, None] * a * d[None, :]


@dataclass
class CoraParts:
    """x [K, n, n + F]: each sub-graph's normalised adjacency beside its node features; labels
    [K, n] per split (IGNORE off the split and on padding); nodes [K, n]: Cora's node ids (-1
    padding); kept: directed edges inside parts; note: one line for the log."""
    x: torch.Tensor
    train_y: torch.Tensor
    test_y: torch.Tensor
    nodes: torch.Tensor
    kept: int
    note: str


def pack(edge_index: torch.Tensor, features: torch.Tensor, labels: dict, part: np.ndarray, ignore: int):
    """(x [K, n, n + F], {name: [K, n] labels}, nodes [K, n], kept directed edges) for `part`."""
    parts = int(part.max()) + 1
    members = [np.flatnonzero(part == p) for p in range(parts)]
    n = max(len(m) for m in members)
    f = features.shape[1]
    x = torch.zeros(parts, n, n + f)
    ys = {name: torch.full((parts, n), ignore, dtype=torch.long) for name in labels}
    nodes = torch.full((parts, n), -1, dtype=torch.long)
    part_t = torch.as_tensor(part)
    src, dst = edge_index
    inside = part_t[src] == part_t[dst]
    local = torch.empty(len(part), dtype=torch.long)
    for p, m in enumerate(members):
        m = torch.as_tensor(m)
        local[m] = torch.arange(len(m))
        mine = inside & (part_t[src] == p)
        x[p, :, :n] = normalized_adjacency(local[edge_index[:, mine]], len(m), n)
        x[p, :len(m), n:] = features[m]
        nodes[p, :len(m)] = m
        for name, y in labels.items():
            ys[name][p, :len(m)] = y[m]
    return x, ys, nodes, int(inside.sum())


def cora_parts(data_dir=None, parts: int = 4, ignore: int = -100) -> CoraParts:
    """Cora's standard (Planetoid) split over `parts` sub-graphs; labels outside a split are
    `ignore`. `parts` must divide the train and test counts (see the module docstring)."""
    g = load_cora(data_dir)
    n_train, n_test = int(g.train_mask.sum()), int(g.test_mask.sum())
    if parts < 1 or n_train % parts or n_test % parts:
        raise fail("cora", f"--parts {parts}: {n_train} train and {n_test} test nodes do not split evenly over "
                   f"{parts} sub-graphs, so micro-batch losses would not add up to the batch's",
                   f"use a divisor of both, e.g. {', '.join(str(k) for k in range(2, 21) if not n_train % k and not n_test % k)}")
    kind = np.full(g.num_nodes, OTHER)
    kind[g.train_mask.numpy()] = TRAIN
    kind[g.test_mask.numpy()] = TEST
    part = partition(g.edge_index.numpy(), kind, parts)
    masked = {name: torch.where(mask, g.y, torch.full_like(g.y, ignore))
              for name, mask in (("train", g.train_mask), ("test", g.test_mask))}
    features = g.x / g.x.sum(1, keepdim=True).clamp(min=1)   # rows sum to 1, as the GCN paper's inputs
    x, ys, nodes, kept = pack(g.edge_index, features, masked, part, ignore)
    total = g.edge_index.shape[1]
    sizes = sorted({int((nodes[p] >= 0).sum()) for p in range(parts)})
    note = (f"Cora (Planetoid) in {parts} sub-graphs of {'/'.join(map(str, sizes))} nodes (padded to {nodes.shape[1]}), "
            f"{kept} of {total} directed edges kept inside them ({kept / total:.1%}), "
            f"{n_train // parts} train / {n_test // parts} test nodes each, {int(g.y.max()) + 1} classes")
    return CoraParts(x, ys["train"], ys["test"], nodes, kept, note)
