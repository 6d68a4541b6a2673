"""Tables partitioned over the data-parallel replicas instead of replicated: rank r of the group
owns rows [lo_r, hi_r) (an even split), and a replica that needs other rows fetches them from
their owners by message; in backward the gradients of fetched rows go back to their owners as
sparse rows. For per-node features and embedding tables of graphs too large to copy to every
rank: only the rows a batch touches move, never the whole table.

Every replica must fetch in lockstep (the same number of fetches, in the same order): the
trainer's synchronous schedules do (each replica runs the same micro-batches). The exchange runs
on its own communicator, so it never mixes with the all-reduce of the replicated parameters.
A partitioned parameter is marked, and DataParallel neither broadcasts nor all-reduces it.
"""
from __future__ import annotations

import torch

MARK = "_mpipar_partitioned"


def is_partitioned(p: torch.Tensor) -> bool:
    return bool(getattr(p, MARK, False))


class RowOwners:
    """Which rank of `world` owns which rows of a `num_rows`-row table, and the exchange."""

    def __init__(self, num_rows: int, world):
        self.world = world.split(0, world.rank, f"{world.name}/rows")
        n = world.size
        self.bounds = torch.tensor([num_rows * r // n for r in range(n + 1)], dtype=torch.int64)
        self.lo, self.hi = int(self.bounds[world.rank]), int(self.bounds[world.rank + 1])
        self.bytes_sent = 0

    def owner(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.bucketize(ids, self.bounds[1:], right=True)

    def exchange(self, sends: list[torch.Tensor]) -> list[torch.Tensor]:
        self.bytes_sent += sum(t.numel() * t.element_size() for t in sends)
        return self.world.alltoallv(sends)

    def route(self, ids: torch.Tensor):
        """For sorted unique `ids`: (owner of each, the ids every rank asks this one for)."""
        owner = self.owner(ids)
        asked = self.exchange([ids[owner == p] for p in range(self.world.size)])
        return owner, asked

    def answer(self, owner, asked, local: torch.Tensor) -> torch.Tensor:
        """Rows [len(owner), D] for the routed ids, from the owners' `local` [hi - lo, D] rows."""
        d = local.shape[1]
        got = self.exchange([local[a - self.lo].reshape(-1) for a in asked])
        out = local.new_empty(len(owner), d)
        for p, rows in enumerate(got):
            out[owner == p] = rows.reshape(-1, d)
        return out


class _Fetch(torch.autograd.Function):
    """Rows of a partitioned parameter; backward returns this rank's rows' gradient, sparse,
    summed over every replica that fetched them."""

    @staticmethod
    def forward(ctx, weight, owners: RowOwners, owner, asked):
        ctx.owners, ctx.owner, ctx.asked, ctx.shape = owners, owner, asked, weight.shape
        return owners.answer(owner, asked, weight.detach())

    @staticmethod
    def backward(ctx, grad):
        owners, d = ctx.owners, grad.shape[1]
        sends = [grad[ctx.owner == p].reshape(-1).contiguous() for p in range(owners.world.size)]
        got = owners.exchange(sends)
        idx = torch.cat(ctx.asked) - owners.lo
        vals = torch.cat(got).reshape(-1, d)
        g = torch.sparse_coo_tensor(idx.unsqueeze(0), vals, ctx.shape, check_invariants=True).coalesce()
        return g, None, None, None


def fetch_rows(ids: torch.Tensor, owners: RowOwners, weight: torch.Tensor | None = None,
               constant: torch.Tensor | None = None):
    """For `ids` of any shape: (rows of `constant` [*ids.shape, Dc] or None, rows of `weight`
    [*ids.shape, Dw] with gradient or None), both this rank's share of a partitioned table
    ([hi - lo, D] each). One routing exchange, then one answer per table."""
    uniq, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
    owner, asked = owners.route(uniq)
    const = owners.answer(owner, asked, constant)[inverse].reshape(*ids.shape, -1) if constant is not None else None
    rows = _Fetch.apply(weight, owners, owner, asked)[inverse].reshape(*ids.shape, -1) if weight is not None else None
    return const, rows
