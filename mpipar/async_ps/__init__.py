"""async_ps: asynchronous gradient pushes to parameter-server ranks, with bounded staleness.

Symbols: N ranks, S servers (ranks 0..S-1), W = N - S workers (ranks S..N-1, worker w is rank
S + w), k = max staleness, V = version (updates applied), b = the version a gradient was
computed on. Staleness of an applied gradient = V - b (0 = computed on the newest parameters).

Shape of a run (see protocol.py for the messages, gate.py for the rule):
  - the flat parameter vector is cut into S contiguous shards; server s owns shard s and the
    optimizer state for it (elementwise optimizers — SGD, RMSprop, Adam — give the same result
    per shard as on the whole vector);
  - a worker computes a gradient on the full model, then PUSHes: a control word [op, b] to
    server 0 and gradient shard s to server s, all non-blocking; then it waits for the answer
    (the new parameters), received straight into its model's flat parameter buffer;
  - server 0 decides, with the staleness gate, which pushes are applied when (alone, or
    averaged together), and commands the other servers in the same order, so every shard has
    the same version history; k = 0 is synchronous data parallelism, k > 0 lets fast workers
    run up to k versions ahead of the slowest, and the servers record every staleness;
  - a worker leaves with PUSH_DONE or DONE (its own step count, or the servers' budget said
    stop); the servers stop when every worker has left and nothing is buffered. Every send is
    waited for and every posted receive matched, so nothing is in flight at the end.

Why two-sided non-blocking sends rather than MPI one-sided Accumulate into a window:
  - the servers must see each push as an event (who, computed on which version) to enforce
    the staleness bound and record it; Accumulate only sums bytes into memory, so the version
    bookkeeping would need extra atomics, per-worker windows and lock/flush epochs;
  - the update is an optimizer step (RMSprop, Adam: not additive), applied once per push or
    once per averaged group; accumulating raw gradients into one window would mix pushes that
    must stay separate (buffered ones, or ones of different versions);
  - passive-target progress in Open MPI on an oversubscribed CPU host needs the target to
    enter MPI anyway, so Accumulate would not spare the server's attention; and two-sided
    messages reuse comm/'s shape-checked headers and the BOARD waiting path (stall reports).
  Accumulate would win for additive updates on RDMA hardware with many servers; not our case.

Files:

    protocol.py  the wire protocol: roles, shards of the flat vector, control words, tags
    gate.py      bounded staleness as a pure state machine (no MPI)
    flat.py      a model's parameters as one flat vector
    outbox.py    sends in flight, kept alive until MPI is done with them
    server.py    server ranks: a shard of the parameters and its optimizer state; server 0 decides
    worker.py    the worker's side: pull, push without waiting, take the answer into the model
    training.py  one asynchronous run on every rank: train_async
    report.py    after a run: snapshots evaluated, the staleness histogram, time to accuracy
"""
from .gate import ProtocolError, StalenessGate, Update
from .protocol import Op, Roles, ShardLayout
from .training import AsyncPlan, AsyncResult, train_async

__all__ = ["AsyncPlan", "AsyncResult", "train_async", "StalenessGate", "Update", "ProtocolError",
           "Op", "Roles", "ShardLayout"]
