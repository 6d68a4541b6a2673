"""Which slice of each full tensor a tp rank holds, written once per layer as a ShardRule, so a
full state dict can be cut into per-rank shards and put back together (checkpoints that reload
on another tp size).

A plan maps full state-dict names to rules; names without a rule are replicated on every rank.
Tensor-parallel modules keep their state-dict names equal to the single-device module's, so a
plain `nn.Sequential`/`nn.TransformerEncoderLayer` state dict shards directly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .group import divisible


@dataclass(frozen=True)
class ShardRule:
    """Split dimension `dim` into p equal parts; with blocks=k the dimension is k stacked tensors
    (e.g. q;k;v) and each block is split separately, rank r taking part r of every block."""
    dim: int
    blocks: int = 1

    def indices(self, full: int, rank: int, size: int) -> torch.Tensor:
        if full % self.blocks:
            raise ValueError(f"dimension {self.dim} of size {full} cannot hold {self.blocks} stacked blocks")
        block = full // self.blocks
        part = divisible(block, size, f"dimension {self.dim} of a sharded tensor")
        starts = torch.arange(self.blocks) * block + rank * part
        return (starts[:, None] + torch.arange(part)[None, :]).reshape(-1)

    def text(self) -> str:
        return f"dim{self.dim}" + (f"x{self.blocks}" if self.blocks > 1 else "")

    @classmethod
    def parse(cls, text: str) -> "ShardRule":
        """'dim0' or 'dim0x3' (as written by `text`, e.g. into a checkpoint manifest)."""
        dim, _, blocks = text.removeprefix("dim").partition("x")
        return cls(int(dim), int(blocks or 1))


COLUMN = ShardRule(0)        # output features of a Linear weight/bias, channels of a norm
ROW = ShardRule(1)           # input features of a Linear weight
QKV = ShardRule(0, 3)        # stacked [q; k; v] projection, heads split inside each block


def tp_plan(module: nn.Module) -> dict[str, ShardRule]:
    """Full state-dict name -> rule, for every sharded parameter or buffer of `module`."""
    plan = {}
    for prefix, m in module.named_modules():
        for name, rule in getattr(m, "shard_rules", {}).items():
            plan[f"{prefix}.{name}" if prefix else name] = rule
    return plan


def full_shape(shard: torch.Tensor, rule: ShardRule | None, size: int) -> tuple[int, ...]:
    shape = list(shard.shape)
    if rule is not None:
        shape[rule.dim] *= size
    return tuple(shape)


def shard_state_dict(full_sd: dict, plan: dict, tp_rank: int, tp_size: int) -> dict:
    """This rank's shard of a full state dict (copies; replicated entries cloned)."""
    out = {}
    for name, t in full_sd.items():
        rule = plan.get(name)
        if rule is None:
            out[name] = t.detach().clone()
        else:
            idx = rule.indices(t.shape[rule.dim], tp_rank, tp_size)
            out[name] = t.detach().index_select(rule.dim, idx)
    return out


def gather_state_dict(shard_sds: list[dict], plan: dict) -> dict:
    """The full state dict from every rank's shard (in tp-rank order); replicated entries from rank 0."""
    size = len(shard_sds)
    out = {}
    for name, first in shard_sds[0].items():
        rule = plan.get(name)
        if rule is None:
            out[name] = first.detach().clone()
            continue
        full = torch.empty(full_shape(first, rule, size), dtype=first.dtype, device=first.device)
        for r, sd in enumerate(shard_sds):
            full.index_copy_(rule.dim, rule.indices(full.shape[rule.dim], r, size), sd[name].detach())
        out[name] = full
    return out


def gather_full_state_dict(module: nn.Module, group) -> dict:
    """Collective: every tp rank gets the full (single-device) state dict of `module`."""
    plan, local = tp_plan(module), module.state_dict()
    shards = [dict() for _ in range(group.size)]
    for name, t in local.items():
        if name in plan:
            stacked = group.all_gather(t.detach(), "state")
            for r in range(group.size):
                shards[r][name] = stacked[r]
        else:
            for r in range(group.size):
                shards[r][name] = t
    return gather_state_dict(shards, plan)


def load_full_state_dict(module: nn.Module, full_sd: dict, group) -> None:
    """Load a full (single-device) state dict into this rank's shards (no communication)."""
    module.load_state_dict(shard_state_dict(full_sd, tp_plan(module), group.rank, group.size))


def shard_layer(tp_layer: nn.Module, full_layer: nn.Module, group) -> nn.Module:
    """`tp_layer` holding this rank's slice of `full_layer`'s values: a pipeline stage's
    tensor-parallel layer starts exactly where the single-process model's layer starts (the full
    layer is built once, sliced, and dropped: peak memory is one layer, not the stage)."""
    full = full_layer.state_dict()
    if sorted(full) != sorted(tp_layer.state_dict()):
        raise ValueError(f"the tensor-parallel layer's state dict {sorted(tp_layer.state_dict())} does not "
                         f"match the single-device layer's {sorted(full)}; give them the same structure")
    load_full_state_dict(tp_layer, full, group)
    return tp_layer.to(next(full_layer.parameters(), torch.empty(0)).device)
