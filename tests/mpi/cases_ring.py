"""Ring all-reduce / reduce-scatter / all-gather against MPI_Allreduce, for every ring size 1..N in
one launch: the world is split into sub-worlds {0..m-1} and {m..N-1} (sizes m and N-m) for
m = 1..N/2, and each check below runs on this rank's sub-world of every split, then on the whole
world. Sizes 0, 1, n-1, odd, several ring pieces, one 64 MiB buffer; integers exact, floats close,
bf16/fp16 accumulated in float32; replicas bit-identical."""
import functools

import torch

from mpipar.data_parallel import all_gather, all_reduce, all_reduce_start, reduce_scatter, segment_of
from mpipar.data_parallel.reduce import make_plan

from mpipar.data_parallel.algorithms import RingPlan
from mpipar.data_parallel.compress import CastRingPlan

from allreduce_refs import check_compressed, data, native, same_everywhere

NP = (8,)
TIMEOUT = 240
STALL_TIMEOUT = 90   # 8 ranks on few cores: one sub-ring waits at a barrier while the other works

torch.set_num_threads(1)
F32 = dict(rtol=1e-5, atol=1e-5)


@functools.cache
def _splits(world):
    """This rank's sub-world of every split, smallest m first (made once: splitting is collective)."""
    out = []
    for m in range(1, world.size // 2 + 1):
        low = world.rank < m
        out.append(world.split(0 if low else 1, world.rank, f"ring{m if low else world.size - m}"))
    return out


def every_ring(world):
    """Sub-worlds of sizes m / N-m for m = 1..N/2 (a barrier after each split), then the world."""
    for w in _splits(world):
        yield w
        world.barrier()
    yield world


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


def sizes(w):
    """0, 1, n-1, odd, several ring pieces."""
    n = w.size
    return sorted({0, 1, max(n - 1, 0), 2 * n + 1, 1001, 300_001})


# -- every ring size 1..N ------------------------------------------------------------------------

def test_auto_algorithm_f32_sum(world):
    for w in every_ring(world):
        for numel in sizes(w):
            check_all_reduce(w, numel, torch.float32, "sum")                      # auto: by size


def test_ring_int64_sum_many_pieces(world):
    for w in every_ring(world):
        for numel in sizes(w):
            check_all_reduce(w, numel, torch.int64, "sum", "ring", salt=1, piece_bytes=1024)


def test_halving_int32_sum(world):
    for w in every_ring(world):
        for numel in sizes(w):
            check_all_reduce(w, numel, torch.int32, "sum", "halving", salt=3)


def test_doubling_f32_avg(world):
    for w in every_ring(world):
        for numel in sizes(w):
            check_all_reduce(w, numel, torch.float32, "avg", "doubling", salt=1)


def test_shared_memory_int64_sum_many_pieces(world):
    for w in every_ring(world):
        for numel in sizes(w):
            check_all_reduce(w, numel, torch.int64, "sum", "shm", salt=2, piece_bytes=1024)


def test_shared_memory_f32_avg(world):
    for w in every_ring(world):
        for numel in sizes(w):
            check_all_reduce(w, numel, torch.float32, "avg", "shm", salt=4)


def test_reduce_scatter_then_all_gather(world):
    """Both algorithms (the ring; shared memory, `auto` on one host) leave the same segments."""
    for w in every_ring(world):
        for algorithm in ("ring", "shm"):
            for numel, dtype in ((max(w.size - 1, 0), torch.float32), (1001, torch.float32),
                                 (300_001, torch.float32), (1001, torch.bfloat16)):
                x = data(numel, dtype, w.rank, 7)
                ref = native(w, x.float(), "sum")
                a, b = segment_of(numel, w.size, w.rank)
                mine = reduce_scatter(w, x, "sum", algorithm=algorithm)
                tol = F32 if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
                torch.testing.assert_close(mine.double(), ref[a:b], **tol,
                                           msg=lambda m: f"{algorithm} reduce_scatter n={w.size} numel={numel}: {m}")
                full = torch.full((numel,), float("nan"), dtype=dtype)
                full[a:b] = mine
                all_gather(w, full, algorithm=algorithm)
                torch.testing.assert_close(full.double(), ref, **tol,
                                           msg=lambda m: f"{algorithm} all_gather n={w.size} numel={numel}: {m}")
                same_everywhere(w, full, f"{algorithm} all_gather n={w.size} numel={numel}")


def test_bf16_sum_accumulates_in_float32(world):
    """bf16 sums equal round(float32 sum): accumulated in float32, not per hop."""
    for w in every_ring(world):
        x = torch.full((4099,), 1.0 + 2 ** -7, dtype=torch.bfloat16) * (1 + w.rank)
        ref = (x.float() * 0 + sum((1.0 + 2 ** -7) * (1 + q) for q in range(w.size))).to(torch.bfloat16)
        for algorithm in ("ring", "halving", "doubling", "shm"):
            got = all_reduce(w, x.clone(), "sum", algorithm)
            assert torch.isfinite(got.float()).all(), f"bf16 {algorithm} n={w.size}: not finite"
            assert torch.equal(got, ref), f"bf16 {algorithm} n={w.size}: {got[:3]} != {ref[:3]}"


def test_wire_compressed_ring(world):
    """The ring with bf16/fp16 messages (what --grad-compress runs across hosts), built directly
    here since on one host make_plan leaves the wire alone: identical bits everywhere, within
    one rounding per hop of the float32 sum, exact on small integers, half the bytes."""
    for w in every_ring(world):
        if w.size == 1:
            continue
        check_compressed(w, lambda x, op, wire: CastRingPlan(w, x, op, wire) if wire is not None
                         else RingPlan(w, x, op, 0, 2 * w.size - 3, across=True), "cast ring")


def test_wire_compression_is_a_no_op_on_one_host(world):
    x = data(70_001, torch.float32, world.rank, 13)
    plain = all_reduce(world, x.clone(), "sum", "ring")
    cast = all_reduce(world, x.clone(), "sum", "ring", wire=torch.bfloat16)
    assert torch.equal(plain, cast), "a bf16 wire changed a one-host all-reduce"


# -- other ops and dtypes, on the whole world ------------------------------------------------------

def test_max_min_and_avg_on_the_world(world):
    w = world
    check_all_reduce(w, 1001, torch.int32, "max", "ring", salt=2)
    check_all_reduce(w, 2 * w.size + 1, torch.int64, "min", "doubling", salt=2)
    check_all_reduce(w, 300_001, torch.float32, "avg", "halving", salt=2)
    check_all_reduce(w, 1001, torch.int32, "max", "shm", salt=7)
    check_all_reduce(w, 300_001, torch.float32, "min", "shm", salt=7)


def _dtype_checks(w, dtype):
    check_all_reduce(w, 300_001, dtype, "avg", "shm", salt=8)
    check_all_reduce(w, 300_001 if dtype == torch.bfloat16 else 1001, dtype, "avg", "ring", salt=4)
    check_all_reduce(w, 1001, dtype, "sum", "doubling", salt=5)
    check_all_reduce(w, 1001, dtype, "avg", "halving", salt=6)


def test_bf16_on_the_world(world):
    _dtype_checks(world, torch.bfloat16)


def test_f16_on_the_world(world):
    _dtype_checks(world, torch.float16)


def test_f64_on_the_world(world):
    _dtype_checks(world, torch.float64)


def test_concurrent_reductions_in_flight(world):
    """Several all-reduces in flight at once (as buckets are), progressed then waited."""
    w = world
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


def test_64_mib_int32_buffer_is_exact(world):
    """One 64 MiB (+12 bytes) int32 buffer on every rank: exact against MPI_Allreduce."""
    w, numel = world, 16 * 2 ** 20 + 3
    x = (torch.arange(numel, dtype=torch.int32) % 1009) * (w.rank + 1) - w.rank
    ref = x.clone()
    w.allreduce_native(ref, "sum")
    for algorithm in ("auto", "ring"):   # auto: shared memory on one host
        assert torch.equal(all_reduce(w, x.clone(), "sum", algorithm), ref), \
            f"64 MiB int32 all_reduce ({algorithm}) differs from MPI_Allreduce"
