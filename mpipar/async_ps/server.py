"""Server ranks: each owns one shard of the flat parameters and the optimizer state for it.

Server 0 also coordinates: it alone receives the workers' control words, runs the staleness
gate and decides every update; it tells the other servers what to apply (a small command
word) in the same order, so every shard goes through the same versions and a worker's base
version means the same thing on every server. The gradient shards themselves go straight
from each worker to each server, so no server carries more than its share of the bytes.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from ..comm.waits import BOARD
from .gate import ProtocolError, StalenessGate, Update
from .outbox import Outbox
from .protocol import (CMD_TAG, CTRL_TAG, META_TAG, PUSH_TAG, SHARD_TAG, Cmd, Op, Roles,
                       ShardLayout, command, parse_command)


class ShardState:
    """This server's parameters, its optimizer (elementwise: SGD, RMSprop, Adam... work per
    shard exactly as on the whole vector) and the last published copy workers are sent."""

    def __init__(self, shard: torch.Tensor, make_optimizer):
        self.param = nn.Parameter(shard.detach().clone())
        self.optimizer = make_optimizer([self.param])
        self.published = self.param.detach().clone()

    def apply(self, grads: list[torch.Tensor]) -> None:
        """One optimizer step on the mean of `grads` (summed in worker order: deterministic)."""
        g = grads[0].clone()
        for other in grads[1:]:
            g += other
        if len(grads) > 1:
            g /= len(grads)
        self.param.grad = g
        self.optimizer.step()
        self.param.grad = None
        self.published = self.param.detach().clone()   # replies in flight keep the old copy


def receive_grad(world, roles: Roles, layout: ShardLayout, w: int, dtype) -> torch.Tensor:
    """Worker w's gradient shard for this server (known source: it follows w's own control word)."""
    return world.recv(roles.worker_rank(w), PUSH_TAG, shape=(layout.length(roles.index),), dtype=dtype)


class Coordinator:
    """Server 0's loop: one posted control receive per worker, wait for any, act, repeat."""

    def __init__(self, world, roles: Roles, layout: ShardLayout, state: ShardState,
                 max_staleness: int, budget: int = 0, poll: float | None = None):
        self.world, self.roles, self.layout, self.state = world, roles, layout, state
        self.poll = poll
        self.gate = StalenessGate(roles.workers, max_staleness)
        self.budget = budget
        self.outbox = Outbox(world)
        self.grads: dict[int, torch.Tensor] = {}
        self.pushes = [0] * roles.workers
        self.seconds = 0.0

    def run(self, t0: float) -> "Coordinator":
        W, world = self.roles.workers, self.world
        words = [torch.zeros(2, dtype=torch.int64) for _ in range(W)]
        reqs = [world.irecv_raw(words[w], self.roles.worker_rank(w), CTRL_TAG) for w in range(W)]
        while not self.gate.finished:
            w = BOARD.wait_any(reqs, "RECV CTRL (any worker) from", self.poll)
            if w < 0:
                raise ProtocolError("every worker is gone but the gate still holds work")
            op, base = (int(v) for v in words[w])
            if op == Op.PULL:
                self.gate.pull(w)
                self._command(Cmd.REPLY, [w], [w])
                self._reply([w], self.gate.version, self.gate.applied)
                updates = []
            elif op in (Op.PUSH, Op.PUSH_DONE):
                self.grads[w] = receive_grad(world, self.roles, self.layout, w, self.state.param.dtype)
                self.pushes[w] += 1
                updates = self.gate.push(w, base, final=op == Op.PUSH_DONE)
            elif op == Op.DONE:
                updates = self.gate.leave(w)
            else:
                raise ProtocolError(f"worker {w} (rank {self.roles.worker_rank(w)}) sent unknown op {op}")
            if op in (Op.PULL, Op.PUSH):
                reqs[w] = world.irecv_raw(words[w], self.roles.worker_rank(w), CTRL_TAG)
            for u in updates:
                self._apply(u)
            self.outbox.prune()
        self.seconds = time.perf_counter() - t0
        self._command(Cmd.STOP, [], [])
        self.outbox.flush()
        return self

    def _apply(self, u: Update) -> None:
        self._command(Cmd.APPLY, list(u.workers), list(u.reply))   # followers start at once
        self.state.apply([self.grads.pop(w) for w in u.workers])
        self._reply(u.reply, u.version + 1, u.applied)

    def _reply(self, workers, version: int, applied: int) -> None:
        """Send the current shard (= `version`) with [version, applied, stop] to `workers`."""
        stop = int(self.budget > 0 and applied >= self.budget)
        meta = torch.tensor([version, applied, stop], dtype=torch.int64)
        for w in workers:
            self.outbox.raw(meta, self.roles.worker_rank(w), META_TAG)
            self.outbox.tensor(self.state.published, self.roles.worker_rank(w), SHARD_TAG)

    def _command(self, cmd: Cmd, listed, reply) -> None:
        word = command(cmd, self.roles.workers, listed, reply)
        for s in range(1, self.roles.servers):
            self.outbox.raw(word, s, CMD_TAG)


def follow(world, roles: Roles, layout: ShardLayout, state: ShardState, poll: float | None = None) -> None:
    """Servers 1..S-1: do what the coordinator decided, in its order, until STOP."""
    outbox, W = Outbox(world), roles.workers
    while True:
        word = torch.empty(2 + 2 * W, dtype=torch.int64)
        BOARD.wait_any([world.irecv_raw(word, 0, CMD_TAG)], "RECV CTRL command from", poll,
                       world.world_rank_of(0))
        cmd, listed, reply = parse_command(word, W)
        if cmd == Cmd.STOP:
            break
        if cmd == Cmd.APPLY:
            state.apply([receive_grad(world, roles, layout, w, state.param.dtype) for w in listed])
        for w in listed:
            if w in reply:
                outbox.tensor(state.published, roles.worker_rank(w), SHARD_TAG)
        outbox.prune()
    outbox.flush()
