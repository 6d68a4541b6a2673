"""The worker's side of the protocol: pull parameters, push gradients without waiting for the
sends, take the answer straight into the model's flat parameter buffer."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..comm.waits import BOARD
from .outbox import Outbox
from .protocol import CTRL_TAG, META_TAG, PUSH_TAG, SHARD_TAG, Op, Roles, ShardLayout


@dataclass(frozen=True)
class Reply:
    version: int    # the parameters now in the model are this version (the next push's base)
    applied: int    # gradients the servers have applied so far (all workers)
    stop: bool      # the servers' budget is spent: leave


class PSClient:
    def __init__(self, world, roles: Roles, layout: ShardLayout, flat: torch.Tensor,
                 poll: float | None = None):
        if flat.numel() != layout.numel:
            raise ValueError(f"model has {flat.numel()} parameters, the servers hold {layout.numel}")
        self.world, self.roles, self.layout, self.flat = world, roles, layout, flat
        self.poll = poll   # sleep-poll while waiting for an answer (None: spin in MPI)
        self.outbox = Outbox(world)
        self.base: int | None = None
        self.pushes = 0

    def pull(self) -> Reply:
        """The current parameters, written into `flat`."""
        return self._ask(Op.PULL)

    def push(self, grad: torch.Tensor, final: bool = False) -> Reply | None:
        """Send `grad` (same layout as `flat`) computed on the last pulled version. Returns the
        new parameters' Reply, or None when `final` (the worker leaves after this push)."""
        if self.base is None:
            raise RuntimeError("push before the first pull")
        if grad.shape != self.flat.shape or grad.dtype != self.flat.dtype:
            raise ValueError(f"gradient {tuple(grad.shape)} {grad.dtype} does not match the "
                             f"parameters {tuple(self.flat.shape)} {self.flat.dtype}")
        self.pushes += 1
        grad = grad.detach().contiguous()
        return self._ask(Op.PUSH_DONE if final else Op.PUSH, grad)

    def leave(self) -> None:
        """Stop without a gradient."""
        self._ask(Op.DONE)

    def close(self) -> None:
        """Wait for every send this worker started (nothing stays in flight)."""
        self.outbox.flush()

    def _ask(self, op: Op, grad: torch.Tensor | None = None) -> Reply | None:
        answered = op in (Op.PULL, Op.PUSH)
        if answered:   # post the answer's receives first, so it lands in a ready buffer
            meta = torch.zeros(3, dtype=torch.int64)
            meta_req = self.world.irecv_raw(meta, 0, META_TAG)
            shards = [self.world.irecv(s, SHARD_TAG, out=self.layout.shard(self.flat, s))
                      for s in range(self.roles.servers)]
        self.outbox.prune()
        word = torch.tensor([int(op), -1 if self.base is None else self.base], dtype=torch.int64)
        self.outbox.raw(word, 0, CTRL_TAG)
        if grad is not None:
            for s in range(self.roles.servers):
                self.outbox.tensor(self.layout.shard(grad, s), s, PUSH_TAG)
        if not answered:
            self.base = None
            return None
        BOARD.wait_any([meta_req], "RECV PARAM version from", self.poll, self.world.world_rank_of(0))
        for h in shards:
            h.wait()
        self.base = int(meta[0])
        return Reply(int(meta[0]), int(meta[1]), bool(meta[2]))
