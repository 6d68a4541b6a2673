"""Pipeline schedules as data: pure functions from (p stages, m micro-batches, stage) to the
ordered list of atomic actions that stage executes. The engine only executes lists, so
schedules differ in one function each and are tested without any process.

Symbols: p stages, m micro-batches, s this stage (0..p-1).
Actions: F forward, B backward, SEND_F/RECV_F activations, SEND_B/RECV_B gradients.
Each action is atomic: a barrier between any two successive actions cannot deadlock.
"""
from __future__ import annotations

from typing import NamedTuple


class Action(NamedTuple):
    op: str       # F, B, W, SEND_F, RECV_F, SEND_B, RECV_B
    mb: int       # micro-batch
    chunk: int = 0

    def __repr__(self) -> str:  # torch.distributed.pipelining style: "RECV_F3"
        return f"{self.op}{self.mb}" + (f".{self.chunk}" if self.chunk else "")


def forward_unit(s: int, p: int, mb: int) -> list[Action]:
    out = [Action("RECV_F", mb)] if s > 0 else []
    out.append(Action("F", mb))
    if s < p - 1:
        out.append(Action("SEND_F", mb))
    return out


def backward_unit(s: int, p: int, mb: int) -> list[Action]:
    out = [Action("RECV_B", mb)] if s < p - 1 else []
    out.append(Action("B", mb))
    if s > 0:
        out.append(Action("SEND_B", mb))
    return out


def gpipe(p: int, m: int, s: int) -> list[Action]:
    """All m forwards, then all m backwards (in reverse, as torchgpipe): the same gradients
    as one big batch; holds all m micro-batches' activations."""
    acts = [a for mb in range(m) for a in forward_unit(s, p, mb)]
    acts += [a for mb in reversed(range(m)) for a in backward_unit(s, p, mb)]
    return acts


def forward_only(p: int, m: int, s: int) -> list[Action]:
    """Evaluation: forwards only."""
    return [a for mb in range(m) for a in forward_unit(s, p, mb)]


SCHEDULES = {"gpipe": gpipe}


def get(name: str):
    try:
        return SCHEDULES[name]
    except KeyError:
        from ..errors import ConfigError
        raise ConfigError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}") from None
