"""Our own all-reduce over a World's point-to-point messages (never MPI_Allreduce): the pipelined
ring for bandwidth-bound sizes, recursive doubling or halving-doubling (algorithms.py)
for latency-bound ones, chosen by size, and, when every rank shares one host, a
reduction straight out of the peers' memory (shm.py), and, when the World spans hosts with
several ranks on some host, the hierarchical all-reduce (hier.py); plus ring reduce-scatter and
all-gather. Which one `auto` picks is choice.py's (choose_algorithm, importable from here too).

Any n >= 1, any size (0, 1, fewer elements than ranks), float and integer dtypes; bfloat16 and
float16 are accumulated in float32 and rounded once. All work in place. `make_plan` prepares an
all-reduce of one buffer for repeated runs (what gradient buckets use); the functions below
make, run and close one per call.
"""
from __future__ import annotations

import torch

from ..comm.shared import SharedBuffer, host_layout, one_host
from .algorithms import DoublingPlan, HalvingPlan, RingPlan
from .choice import choose_algorithm
from .compress import CastRingPlan, compressible
from .plan import Handle, Plan, RingLayout, StagedPlan, check_op, finished
from .hier import HierPlan, equal_hosts, hier_all_gather, hier_reduce_scatter
from .shm import SharedPlan, shared_all_gather, shared_reduce_scatter

AUTO_SEQ = 0x8000              # tag sequence numbers below this are per-World automatic ones
ALGORITHMS = ("ring", "halving", "doubling", "shm", "hier")


def next_seq(world) -> int:
    """Tag sequence number for the next collective on `world`: every rank issues collectives
    in the same order, so every rank draws the same number. The World carries the counter, so
    it lives and dies with the communicator."""
    s = world.state.get("ring_seq", 0)
    world.state["ring_seq"] = (s + 1) % AUTO_SEQ
    return s


class _Nothing(Plan):
    """One rank or no elements: nothing to send (avg over one rank is the identity)."""


def make_plan(world, t: torch.Tensor, op: str = "sum", algorithm: str = "auto",
              piece_bytes: int | None = None, shared_ok: bool = True, buffer=None,
              wire: torch.dtype | None = None) -> Plan:
    """Prepare an in-place all-reduce of `t` over `world` (op: sum | avg | max | min;
    algorithm: auto | ring | halving | doubling | shm). Run it with plan.run(seq) or plan.start(seq);
    close() when done. Every rank must use the same size, dtype, op and algorithm. Collective
    (every rank makes its plans in the same order): `auto` asks once whether the World lives on
    one host, and a shared-memory plan maps its buffer (its own, or `buffer`) now.
    shared_ok=False keeps `auto` off shared memory (so off 'shm' and 'hier').
    wire (torch.bfloat16 | torch.float16): float32 sums and averages cross hosts as that type
    (compress.py; `auto` then uses the ring at every size where no host holds several ranks);
    ignored on one host, where nothing crosses a link, and for other dtypes and ops."""
    check_op(op, t.dtype)
    if world.size == 1 or t.numel() == 0:
        return _Nothing(world, t)
    if algorithm not in ALGORITHMS + ("auto",):
        raise ValueError(f"unknown all-reduce algorithm {algorithm!r}; use auto, {', '.join(ALGORITHMS)}")
    alone = one_host(world)
    wire = wire if compressible(t, op, wire) and not alone else None
    if algorithm == "auto":
        algorithm = choose_algorithm(t.numel() * t.element_size(), world.size,
                                     shared_ok and alone, shared_ok and grouped(world), not alone)
        if wire is not None and algorithm in ("doubling", "halving"):
            algorithm = "ring"
    elif algorithm == "shm" and not alone:
        raise ValueError(f"algorithm 'shm' needs every rank of {world.name} on one host")
    elif wire is not None and algorithm in ("doubling", "halving"):
        raise ValueError(f"gradient compression runs on the ring or hier all-reduce, not {algorithm!r}")

    def make(x):
        if algorithm == "hier":
            return HierPlan(world, x, op, host_layout(world), buffer, wire=wire)
        if algorithm == "shm":
            return SharedPlan(world, x, op, buffer, piece_bytes)
        if algorithm == "ring" and wire is not None:
            return CastRingPlan(world, x, op, wire, piece_bytes)
        if algorithm == "ring":
            return RingPlan(world, x, op, 0, 2 * world.size - 3, piece_bytes, across=not alone)
        return (HalvingPlan if algorithm == "halving" else DoublingPlan)(world, x, op)
    plan = make(t) if t.device.type == "cpu" else StagedPlan(world, t, make)
    plan.algorithm = algorithm + (f" ({str(wire).removeprefix('torch.')} on the wire)" if wire is not None else "")
    return plan


def grouped(world) -> bool:
    """True when `world` spans hosts and some host holds several of its ranks (collective the
    first time, like one_host; cached)."""
    return not one_host(world) and max(host_layout(world).sizes) > 1


def all_reduce(world, t: torch.Tensor, op: str = "sum", algorithm: str = "auto",
               piece_bytes: int | None = None, wire: torch.dtype | None = None) -> torch.Tensor:
    """In-place all-reduce of `t` over `world` (blocking); returns `t`. The shared-memory
    algorithms reuse one buffer per host World (`arena`), grown as needed."""
    nbytes = t.numel() * t.element_size()
    if world.size > 1 and t.numel() > 0 and algorithm == "auto":
        alone = one_host(world)
        algorithm = choose_algorithm(nbytes, world.size, alone, grouped(world), not alone)
        algorithm = algorithm if algorithm in ("shm", "hier") else "auto"
    buffer = None
    if world.size > 1 and t.numel() > 0 and algorithm in ("shm", "hier"):
        buffer = arena(world if algorithm == "shm" else host_layout(world).node, 2 * nbytes)
    return make_plan(world, t, op, algorithm, piece_bytes, buffer=buffer, wire=wire).run_once(next_seq(world))


def arena(world, nbytes: int) -> SharedBuffer:
    """The World's shared buffer for blocking calls, at least `nbytes` per rank (collective:
    every rank asks for the same sizes in the same order, so all grow it together)."""
    buf = world.state.get("shm_arena")
    if buf is None or buf.nbytes < nbytes:
        if buf is not None:
            buf.free()
        size = 1 << max(20, (nbytes - 1).bit_length())
        buf = world.state["shm_arena"] = SharedBuffer(world, size)
    return buf


def all_reduce_start(world, t: torch.Tensor, op: str = "sum", algorithm: str = "auto",
                     seq: int | None = None, piece_bytes: int | None = None) -> Handle:
    """Start an in-place all-reduce of `t`; returns a Handle (progress() never blocks, wait()
    finishes). Concurrent collectives on one World need distinct `seq`s. (`auto` stays off
    shared memory here: a buffer per call would cost more than it saves.)"""
    plan = make_plan(world, t, op, algorithm, piece_bytes, shared_ok=False)
    seq = next_seq(world) if seq is None else seq
    if isinstance(plan, _Nothing):
        return finished(t)

    def steps():
        try:
            yield from plan.steps(seq)
        finally:
            plan.close()
    return Handle(steps(), t)


def _ring_pass(world, t, op, first, last, piece_bytes) -> None:
    seq = next_seq(world)
    if world.size == 1 or t.numel() == 0:
        return
    across = not one_host(world)
    make = lambda x: RingPlan(world, x, op, first, last, piece_bytes, across)
    (make(t) if t.device.type == "cpu" else StagedPlan(world, t, make)).run_once(seq)


def reduce_scatter(world, t: torch.Tensor, op: str = "sum", piece_bytes: int | None = None,
                   algorithm: str = "auto", bounds=None) -> torch.Tensor:
    """Reduce-scatter in place: afterwards segment `world.rank` of flat `t` (see `segment_of`)
    holds the reduction over all ranks and is returned (a view); the other segments are left
    as the algorithm leaves them. `auto`: through shared memory when the World is on one host
    (shm.shared_reduce_scatter), hierarchically when it spans hosts of several ranks each
    (hier.hier_reduce_scatter), else the ring; 'ring', 'shm' or 'hier' force one.
    `bounds`: each rank's (start, stop) instead of segment_of's (ZeRO's buckets); the ring's
    segments are fixed, so there it all-reduces the whole vector."""
    check_op(op, t.dtype)
    custom = bounds is not None
    bounds = bounds if custom else _bounds(world, t)
    a, b = bounds[world.rank]
    how = _scatter_algorithm(world, t, algorithm)
    nbytes = 2 * t.numel() * t.element_size()
    if how == "shm":
        return shared_reduce_scatter(world, t, op, arena(world, nbytes), bounds)
    if how == "hier":
        lay = host_layout(world)
        return hier_reduce_scatter(world, t, op, lay, arena(lay.node, nbytes), bounds, next_seq(world))
    if custom:
        all_reduce(world, t, op)
    else:
        _ring_pass(world, t, op, 0, world.size - 2, piece_bytes)
    return t.view(-1)[a:b]


def all_gather(world, t: torch.Tensor, piece_bytes: int | None = None, algorithm: str = "auto") -> torch.Tensor:
    """All-gather in place: each rank fills segment `world.rank` of flat `t` (see `segment_of`);
    afterwards every rank holds every segment. Returns `t`. `algorithm` as for reduce_scatter."""
    how = _scatter_algorithm(world, t, algorithm)
    nbytes = 2 * t.numel() * t.element_size()
    if how == "shm":
        return shared_all_gather(world, t, arena(world, nbytes), _bounds(world, t))
    if how == "hier":
        lay = host_layout(world)
        return hier_all_gather(world, t, lay, arena(lay.node, nbytes), _bounds(world, t), next_seq(world))
    _ring_pass(world, t, "sum", world.size - 1, 2 * world.size - 3, piece_bytes)
    return t


def scatter_algorithm(world) -> str:
    """What `auto` runs reduce-scatter and all-gather with on `world` (collective the first time):
    'shm' on one host, 'hier' across hosts of equal rank counts (several each), else 'ring'."""
    if one_host(world):
        return "shm"
    return "hier" if grouped(world) and equal_hosts(host_layout(world)) else "ring"


def _scatter_algorithm(world, t: torch.Tensor, algorithm: str) -> str:
    if algorithm not in ("auto", "ring", "shm", "hier"):
        raise ValueError(f"algorithm {algorithm!r}: auto, ring, shm or hier")
    if world.size < 2 or t.numel() == 0 or algorithm == "ring":
        return "ring"
    if algorithm == "shm" and not one_host(world):
        raise ValueError(f"algorithm 'shm' needs every rank of {world.name} on one host")
    if algorithm == "hier" and not equal_hosts(host_layout(world)):
        raise ValueError(f"algorithm 'hier' reduce-scatter/all-gather needs the same rank count on every "
                         f"host of {world.name} ({host_layout(world).describe()} here)")
    return scatter_algorithm(world) if algorithm == "auto" else algorithm


def _bounds(world, t: torch.Tensor) -> list[tuple[int, int]]:
    return [segment_of(t.numel(), world.size, j) for j in range(world.size)]


def segment_of(numel: int, n: int, rank: int) -> tuple[int, int]:
    """[start, stop) of the segment `rank` owns after reduce_scatter / supplies to all_gather."""
    return RingLayout(numel, n).segment(rank)
