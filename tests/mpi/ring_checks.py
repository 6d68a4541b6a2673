"""Ring all-reduce / reduce-scatter / all-gather against MPI_Allreduce, for every ring size
1..N in one launch (World.split into sub-worlds), many sizes and dtypes. Exits non-zero on failure.

Usage: mpirun -np N python tests/mpi/ring_checks.py [--large]   (--large adds one 64 MiB buffer)
"""
import sys

import torch

from mpipar.comm import World, failure
from mpipar.data_parallel import all_gather, all_reduce, all_reduce_start, reduce_scatter, segment_of
from mpipar.data_parallel.fingerprint import checksum
from mpipar.data_parallel.ring import make_plan

torch.set_num_threads(1)
world = World()
F32 = dict(rtol=1e-5, atol=1e-5)
failure.install(world.host, debug="--debug" in sys.argv)


def data(numel, dtype, rank, salt=0):
    g = torch.Generator().manual_seed(1000 * rank + salt + numel)
    if dtype.is_floating_point:
        return torch.randn(numel, generator=g).to(dtype)
    return torch.randint(-1000, 1000, (numel,), generator=g).to(dtype)


def native(w, x, op):
    """Reference: MPI_Allreduce in float64 (or int64), on a copy."""
    ref = x.to(torch.float64 if x.dtype.is_floating_point else torch.int64).clone()
    w.allreduce_native(ref, "sum" if op == "avg" else op)
    return ref / w.size if op == "avg" else ref


def same_everywhere(w, x, what):
    """Every rank of w holds the very same bits (one allgather of a bit-exact checksum)."""
    sums = w.allgather_floats([checksum([x])])[:, 0]
    assert (sums == sums[0]).all(), f"{what}: ranks of {w.name} disagree (checksums {sums.tolist()})"


def check_all_reduce(w, numel, dtype, op, algorithm="auto", salt=0, piece_bytes=None):
    x = data(numel, dtype, w.rank, salt)
    ref = native(w, x, op)
    out = all_reduce(w, x, op, algorithm, piece_bytes=piece_bytes)
    what = f"all_reduce n={w.size} numel={numel} {dtype} {op} {algorithm}"
    assert out.data_ptr() == x.data_ptr(), f"{what}: not in place"
    if dtype.is_floating_point:
        tol = {torch.bfloat16: 1e-2, torch.float16: 1e-3}.get(dtype, 1e-5)
        torch.testing.assert_close(out.double(), ref.to(out.dtype).double(), rtol=tol, atol=tol * 4,
                                   msg=lambda m: f"{what}: {m}")
        same_everywhere(w, out, what)
    else:   # every rank equals the same MPI result exactly, so the ranks agree too
        assert torch.equal(out, ref.to(dtype)), f"{what}: differs from MPI_Allreduce"


def check_scatter_gather(w, numel):
    x = data(numel, torch.float32, w.rank, 7)
    ref = native(w, x, "sum")
    a, b = segment_of(numel, w.size, w.rank)
    mine = reduce_scatter(w, x, "sum")
    torch.testing.assert_close(mine.double(), ref[a:b], **F32, msg=lambda m: f"reduce_scatter n={w.size} numel={numel}: {m}")
    full = torch.full((numel,), float("nan"))
    full[a:b] = ref[a:b].float()
    all_gather(w, full)
    torch.testing.assert_close(full.double(), ref, **F32, msg=lambda m: f"all_gather n={w.size} numel={numel}: {m}")


def check_concurrent(w):
    """Several all-reduces in flight at once (as buckets are), progressed then waited."""
    xs = [data(numel, torch.float32, w.rank, 3) for numel in (5, 70_000, 300_001)]
    refs = [native(w, x, "sum") for x in xs]
    originals = [x.clone() for x in xs]
    handles = [all_reduce_start(w, x, "sum", seq=0x8000 + i) for i, x in enumerate(xs)]
    for h in handles:
        h.progress()
    for h, ref in zip(reversed(handles), reversed(refs)):
        torch.testing.assert_close(h.wait().double(), ref, **F32)
    # shared-memory plans (what buckets hold) in flight together, each on its own buffer,
    # run twice so both halves of every buffer are used
    plans = [make_plan(w, x, "sum", "shm", piece_bytes=4096) for x in xs]
    for _ in range(2):
        for p, x in zip(plans, originals):
            p.tensor.copy_(x)
        handles = [p.start(0) for p in plans]
        for h in handles:
            h.progress()
        for h, ref in zip(reversed(handles), reversed(refs)):
            torch.testing.assert_close(h.wait().double(), ref, **F32)
    for p in plans:
        p.close()


def checks_for(w):
    """Every algorithm, exact on integers, on sizes 0, 1, n-1, odd, several ring pieces."""
    n = w.size
    for numel in sorted({0, 1, max(n - 1, 0), 2 * n + 1, 1001, 300_001}):
        check_all_reduce(w, numel, torch.float32, "sum")                      # auto: by size
        check_all_reduce(w, numel, torch.int64, "sum", "ring", salt=1, piece_bytes=1024)
        check_all_reduce(w, numel, torch.int32, "sum", "halving", salt=3)
        check_all_reduce(w, numel, torch.float32, "avg", "doubling", salt=1)
        check_all_reduce(w, numel, torch.int64, "sum", "shm", salt=2, piece_bytes=1024)   # many pieces
        check_all_reduce(w, numel, torch.float32, "avg", "shm", salt=4)
    for numel in (max(n - 1, 0), 1001):
        check_scatter_gather(w, numel)
    check_bf16_accuracy(w)


def more_checks(w):
    """Other ops and dtypes, on the whole world only."""
    check_all_reduce(w, 1001, torch.int32, "max", "ring", salt=2)
    check_all_reduce(w, 2 * w.size + 1, torch.int64, "min", "doubling", salt=2)
    check_all_reduce(w, 300_001, torch.float32, "avg", "halving", salt=2)
    check_all_reduce(w, 1001, torch.int32, "max", "shm", salt=7)
    check_all_reduce(w, 300_001, torch.float32, "min", "shm", salt=7)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        check_all_reduce(w, 300_001, dtype, "avg", "shm", salt=8)
        check_all_reduce(w, 300_001 if dtype == torch.bfloat16 else 1001, dtype, "avg", "ring", salt=4)
        check_all_reduce(w, 1001, dtype, "sum", "doubling", salt=5)
        check_all_reduce(w, 1001, dtype, "avg", "halving", salt=6)
    check_concurrent(w)


def check_bf16_accuracy(w):
    """bf16 sums equal round(float32 sum): accumulated in float32, not per hop."""
    x = torch.full((4099,), 1.0 + 2 ** -7, dtype=torch.bfloat16) * (1 + w.rank)
    ref = (x.float() * 0 + sum((1.0 + 2 ** -7) * (1 + q) for q in range(w.size))).to(torch.bfloat16)
    for algorithm in ("ring", "halving", "doubling", "shm"):
        got = all_reduce(w, x.clone(), "sum", algorithm)
        assert torch.isfinite(got.float()).all(), f"bf16 {algorithm} n={w.size}: not finite"
        assert torch.equal(got, ref), f"bf16 {algorithm} n={w.size}: {got[:3]} != {ref[:3]}"


def check_large(w, numel=16 * 2 ** 20 + 3):
    """One 64 MiB (+12 bytes) int32 buffer on every rank: exact against MPI_Allreduce."""
    x = (torch.arange(numel, dtype=torch.int32) % 1009) * (w.rank + 1) - w.rank
    ref = x.clone()
    w.allreduce_native(ref, "sum")
    for algorithm in ("auto", "ring"):   # auto: shared memory on one host
        assert torch.equal(all_reduce(w, x.clone(), "sum", algorithm), ref), \
            f"64 MiB int32 all_reduce ({algorithm}) differs from MPI_Allreduce"


def main():
    for m in range(1, world.size // 2 + 1):   # sub-worlds {0..m-1} and {m..N-1}: sizes m, N-m
        low = world.rank < m
        checks_for(world.split(0 if low else 1, world.rank, f"ring{m if low else world.size - m}"))
        world.barrier()
    checks_for(world)
    more_checks(world)
    if "--large" in sys.argv:
        check_large(world)
    world.barrier()
    if world.rank == 0:
        print(f"ring checks passed: ring sizes 1..{world.size}", flush=True)


main()
