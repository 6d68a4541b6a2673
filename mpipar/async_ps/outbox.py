"""Sends in flight: each keeps its tensor alive until MPI is done with it, finished ones are
dropped without blocking, and `flush` waits for the rest (through BOARD) so a run ends with
nothing in flight."""
from __future__ import annotations

import torch

from ..comm.waits import all_done
from ..comm.tags import label
from ..comm.waits import BOARD


class Outbox:
    def __init__(self, world):
        self.world = world
        self.raw_sends: list[tuple[object, torch.Tensor, int, int]] = []   # (request, tensor, dst, tag)
        self.tensor_sends: list = []                                      # p2p.SendHandle

    def raw(self, t: torch.Tensor, dst: int, tag: int) -> None:
        """Headerless send of a fixed-size word both sides know (control words, version stamps)."""
        self.raw_sends.append((self.world.isend_raw(t, dst, tag), t, dst, tag))

    def tensor(self, t: torch.Tensor, dst: int, tag: int) -> None:
        """Send with a header, so the receiver checks shape and dtype."""
        self.tensor_sends.append(self.world.isend(t, dst, tag))

    def prune(self) -> None:
        self.raw_sends = [s for s in self.raw_sends if not all_done([s[0]])]
        self.tensor_sends = [h for h in self.tensor_sends if not h.done()]

    def flush(self) -> None:
        for req, _, dst, tag in self.raw_sends:
            BOARD.wait(req, f"SEND {label(tag)} to", self.world.world_rank_of(dst))
        for h in self.tensor_sends:
            h.wait()
        self.raw_sends, self.tensor_sends = [], []

    def __len__(self) -> int:
        return len(self.raw_sends) + len(self.tensor_sends)
