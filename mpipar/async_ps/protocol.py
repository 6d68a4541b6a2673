"""The parameter-server wire protocol in one place: who is a server, how the flat parameter
vector is cut into shards, the control words and the tags every message uses.

Messages (W workers, S servers; server 0 is also the coordinator):

    worker -> server 0     CTRL   int64 [op, base]            raw, fixed size
    worker -> server s     PUSH   gradient shard s             tensor with header (shape-checked)
    server 0 -> worker     PARAM0 int64 [version, applied, stop]  raw, fixed size
    server s -> worker     PARAM1 parameter shard s            tensor with header (shape-checked)
    server 0 -> server s   CTRL1  int64 [cmd, n, w_1..w_W, reply_1..reply_W]  raw, fixed size

Every receive names its source: a gradient is received from the worker whose control word
announced it, never with ANY_SOURCE, so a payload can never be paired with another's header.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch

from ..comm.tags import Kind, tag
from ..data_parallel.plan import split_bounds
from ..errors import ConfigError

CTRL_TAG = tag(Kind.CTRL, 0, 0)      # worker -> coordinator: [op, base]
CMD_TAG = tag(Kind.CTRL, 0, 1)       # coordinator -> follower servers: what to apply, whom to answer
PUSH_TAG = tag(Kind.PUSH)            # gradient shards
META_TAG = tag(Kind.PARAM, 0, 0)     # coordinator -> worker: [version, applied, stop]
SHARD_TAG = tag(Kind.PARAM, 0, 1)    # server -> worker: parameter shard


class Op(IntEnum):
    """What a worker asks of the servers (first word of its control message)."""
    PULL = 1        # send me the current parameters
    PUSH = 2        # a gradient follows; answer with the parameters once it is applied
    PUSH_DONE = 3   # a gradient follows; I stop after it (no answer)
    DONE = 4        # I stop (no gradient)


class Cmd(IntEnum):
    """What the coordinator tells follower servers to do, in the order it decided."""
    APPLY = 1       # receive the listed workers' gradient shards, average them, one optimizer step
    REPLY = 2       # send the listed workers the current shard (their PULL)
    STOP = 3        # every worker is done


@dataclass(frozen=True)
class Roles:
    """Ranks 0..S-1 serve, S..N-1 work. `index` is this rank's server or worker number."""
    size: int
    servers: int
    rank: int

    def __post_init__(self):
        if self.servers < 1 or self.servers >= self.size:
            raise ConfigError(f"--servers {self.servers} on {self.size} ranks leaves no worker; "
                              f"use 1..{self.size - 1} servers (mpirun -np >= servers + 1)")

    @property
    def workers(self) -> int:
        return self.size - self.servers

    @property
    def is_server(self) -> bool:
        return self.rank < self.servers

    @property
    def is_coordinator(self) -> bool:
        return self.rank == 0

    @property
    def index(self) -> int:
        return self.rank if self.is_server else self.rank - self.servers

    def worker_rank(self, w: int) -> int:
        return self.servers + w


@dataclass(frozen=True)
class ShardLayout:
    """Server s owns elements [start, stop) of the flat parameter vector (sizes differ by <= 1)."""
    numel: int
    servers: int

    def bounds(self, s: int) -> tuple[int, int]:
        return split_bounds(self.numel, self.servers, s)

    def length(self, s: int) -> int:
        a, b = self.bounds(s)
        return b - a

    def shard(self, flat: torch.Tensor, s: int) -> torch.Tensor:
        """A view of server s's part of `flat` (contiguous, so it can be sent or received into)."""
        a, b = self.bounds(s)
        return flat[a:b]


def command(cmd: Cmd, workers: int, listed=(), reply=()) -> torch.Tensor:
    """The fixed-size int64 command word [cmd, n, w_1..w_W, reply_1..reply_W] (padded with -1/0)."""
    word = torch.full((2 + 2 * workers,), -1, dtype=torch.int64)
    word[0], word[1] = int(cmd), len(listed)
    word[2 + workers:] = 0
    for i, w in enumerate(listed):
        word[2 + i] = w
        word[2 + workers + i] = int(w in reply)
    return word


def parse_command(word: torch.Tensor, workers: int) -> tuple[Cmd, list[int], set[int]]:
    n = int(word[1])
    listed = [int(w) for w in word[2:2 + n]]
    reply = {w for i, w in enumerate(listed) if int(word[2 + workers + i])}
    return Cmd(int(word[0])), listed, reply
