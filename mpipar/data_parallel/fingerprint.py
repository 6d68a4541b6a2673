"""Agreement checks across data-parallel replicas: the gradient layout at construction (a model
built differently on one rank must fail with one clear line, not hang or silently mix
gradients), and bit-identical parameters every N steps in debug mode."""
from __future__ import annotations

import hashlib
from typing import Sequence

import torch

from ..errors import MpiparError

HASH_BITS = 48  # fits a float64 exactly, so fingerprints travel through allgather_floats


class ReplicaMismatchError(MpiparError):
    """Data-parallel replicas disagree (gradient layout, or parameters that should be identical)."""


def digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> (64 - HASH_BITS)


def layout_fingerprint(shapes: Sequence[tuple], dtypes: Sequence[torch.dtype],
                       plan: Sequence[Sequence[int]]) -> list[float]:
    """(parameters, elements, buckets, hash of shapes+dtypes, hash of the bucket plan)."""
    numel = sum(int(torch.Size(s).numel()) for s in shapes)
    described = ";".join(f"{list(s)}:{d}" for s, d in zip(shapes, dtypes))
    return [len(shapes), numel, len(plan), digest(described), digest(repr([list(b) for b in plan]))]


def check_layout(world, shapes, dtypes, plan) -> None:
    """Raise ReplicaMismatchError on every rank unless all ranks of `world` have the same layout."""
    mine = layout_fingerprint(shapes, dtypes, plan)
    rows = world.allgather_floats(mine)
    ref = rows[0]
    bad = [r for r in range(world.size) if not (rows[r] == ref).all()]
    if not bad:
        return

    def what(row):
        return f"{int(row[0])} parameters / {int(row[1]):,} elements in {int(row[2])} bucket(s)"
    why = ("parameter shapes or dtypes differ" if any(rows[r][3] != ref[3] for r in bad)
           else "bucket plans differ (is --bucket-mb the same everywhere?)")
    others = ", ".join(f"rank {world.world_rank_of(r)} has {what(rows[r])}" for r in bad)
    raise ReplicaMismatchError(
        f"data-parallel replicas on {world.name} disagree on the gradient layout: rank "
        f"{world.world_rank_of(0)} has {what(ref)}, {others} ({why}); build the same model "
        f"on every data-parallel rank")


def checksum(tensors: Sequence[torch.Tensor]) -> int:
    """A 48-bit hash of the exact bits of `tensors` (position-weighted, so swaps show)."""
    total = 0
    for t in tensors:
        b = t.detach().reshape(-1).contiguous().view(torch.uint8)
        if b.numel() % 4 == 0:
            b = b.view(torch.int32)
        v = b.to(torch.int64)
        w = torch.arange(1, v.numel() + 1, dtype=torch.int64, device=v.device) % 65_521 + 1
        total = (total * 1_000_003 + int((v * w).sum())) % (1 << HASH_BITS)
    return total


def check_identical(world, tensors: Sequence[torch.Tensor], what: str) -> None:
    """Raise ReplicaMismatchError unless `tensors` have the same bits on every rank of `world`."""
    sums = world.allgather_floats([checksum(tensors)])[:, 0]
    bad = [world.world_rank_of(r) for r in range(world.size) if sums[r] != sums[0]]
    if bad:
        raise ReplicaMismatchError(
            f"data-parallel replicas diverged: {what} on rank(s) {', '.join(map(str, bad))} differ "
            f"from rank {world.world_rank_of(0)} (checksums {int(sums[0])} vs "
            f"{', '.join(str(int(sums[r])) for r in range(world.size) if sums[r] != sums[0])})")
