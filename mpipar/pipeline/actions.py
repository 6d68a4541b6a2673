"""The atoms of every schedule: actions, the forward/backward units with their messages, and
which message (peer, kind, virtual stage) a send or receive is. Symbols as in schedules.py."""
from __future__ import annotations

from typing import NamedTuple


class Action(NamedTuple):
    op: str       # F, B, W, SEND_F, RECV_F, SEND_B, RECV_B, OPT
    mb: int       # micro-batch (OPT: batch), relative to this step's batch
    chunk: int = 0

    def __repr__(self) -> str:  # torch.distributed.pipelining style: "RECV_F3", chunk 1: "F3.1"
        return f"{self.op}{self.mb}" + (f".{self.chunk}" if self.chunk else "")


COMPUTE = ("F", "B", "W")


def message(a: Action, s: int, p: int) -> tuple[int, str, int]:
    """(peer rank, 'act' | 'grad', virtual stage the message belongs to) of a send/recv.

    Activations belong to the virtual stage that consumes them, gradients to the one that
    produces them, so the pair (kind, k) names a message uniquely per micro-batch; the engine
    turns it into a tag and the simulator into a matching key."""
    k = a.chunk * p + s
    if a.op == "SEND_F":
        return (s + 1) % p, "act", k + 1
    if a.op == "RECV_F":
        return (s - 1) % p, "act", k
    if a.op == "SEND_B":
        return (s - 1) % p, "grad", k
    if a.op == "RECV_B":
        return (s + 1) % p, "grad", k + 1
    raise ValueError(f"{a!r} is not a message")


def forward_unit(s: int, p: int, mb: int, chunk: int = 0, v: int = 1) -> list[Action]:
    k, n = chunk * p + s, p * v
    out = [Action("RECV_F", mb, chunk)] if k > 0 else []
    out.append(Action("F", mb, chunk))
    if k < n - 1:
        out.append(Action("SEND_F", mb, chunk))
    return out


def backward_unit(s: int, p: int, mb: int, chunk: int = 0, v: int = 1) -> list[Action]:
    k, n = chunk * p + s, p * v
    out = [Action("RECV_B", mb, chunk)] if k < n - 1 else []
    out.append(Action("B", mb, chunk))
    if k > 0:
        out.append(Action("SEND_B", mb, chunk))
    return out
