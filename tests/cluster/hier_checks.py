"""Hierarchical all-reduce against MPI_Allreduce on whatever hosts the job spans (run by
tests/test_hier_hosts.py on network-namespace hosts; also runs on one host, with 'hier' forced).

On the whole World and on sub-worlds of other rank -> host layouts (with 5 ranks on hosts of
2+2+1: also 2+2 and 2+1+1), every dtype and op at sizes
0, 1, fewer elements than slices, odd, several ring pieces: integers exactly equal to MPI, floats
close, 16-bit types accumulated in float32 (bf16 sum == round(float32 sum)), every rank holding
the same bits; several plans in flight at once, as gradient buckets run them. Prints what `auto`
chose for each layout. Exits non-zero on failure.

Usage: mpirun ... python tests/cluster/hier_checks.py [--expect-hier]   (auto must pick 'hier'
on the whole World; tests/cluster/hier_stall.py runs these checks first)
"""
import sys
from pathlib import Path

import torch

from mpipar.comm import World, failure
from mpipar.comm.shared import host_layout
from mpipar.comm.shared import one_host
from mpipar.data_parallel import all_reduce
from mpipar.data_parallel.reduce import choose_algorithm, grouped, make_plan

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests/
from allreduce_refs import check_compressed, data, native, same_everywhere  # noqa: E402

torch.set_num_threads(1)
world = World()
failure.install(world.host, debug="--debug" in sys.argv)
watchdog = failure.start_watchdog(60, world.host)


def check(w, numel, dtype, op, algorithm="hier", salt=0):
    x = data(numel, dtype, w.rank, salt)
    ref = native(w, x, op)
    out = all_reduce(w, x, op, algorithm)
    what = f"all_reduce {w.name} n={w.size} numel={numel} {dtype} {op} {algorithm}"
    assert out.data_ptr() == x.data_ptr(), f"{what}: not in place"
    if dtype.is_floating_point:
        tol = {torch.bfloat16: 1e-2, torch.float16: 1e-3}.get(dtype, 1e-5)
        torch.testing.assert_close(out.double(), ref.to(out.dtype).double(), rtol=tol, atol=tol * 4,
                                   msg=lambda m: f"{what}: {m}")
    else:
        assert torch.equal(out, ref.to(dtype)), f"{what}: differs from MPI_Allreduce"
    same_everywhere(w, out, what)


def check_bf16_rounded_once(w):
    x = torch.full((4099,), 1.0 + 2 ** -7, dtype=torch.bfloat16) * (1 + w.rank)
    ref = (x.float() * 0 + sum((1.0 + 2 ** -7) * (1 + q) for q in range(w.size))).to(torch.bfloat16)
    got = all_reduce(w, x.clone(), "sum", "hier")
    assert torch.equal(got, ref), f"bf16 hier {w.name}: {got[:3]} != {ref[:3]}"


def check_concurrent(w):
    """Plans held and run in flight together (as gradient buckets do), twice each."""
    xs = [data(numel, torch.float32, w.rank, 3) for numel in (5, 70_000, 300_001)]
    refs = [native(w, x, "sum") for x in xs]
    plans = [make_plan(w, x.clone(), "sum", "hier") for x in xs]
    for rnd in range(2):
        for p, x in zip(plans, xs):
            p.tensor.copy_(x)
        handles = [p.start(0x8000 + i) for i, p in enumerate(plans)]
        for h in handles:
            h.progress()
        for h, ref in zip(reversed(handles), reversed(refs)):
            torch.testing.assert_close(h.wait().double(), ref, rtol=1e-5, atol=1e-5)
    for p in plans:
        p.close()


def check_data_parallel_compressed(w):
    """DataParallel with --grad-compress bf16 across hosts: replicas bit-identical after every
    step (check_every=1 raises otherwise), parameters within bf16 rounding of the uncompressed
    run's, and gradients that really were cast (not the uncompressed bits)."""
    from torch import nn
    from mpipar.data_parallel import DataParallel
    runs = {}
    for compress in (None, "bf16"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 8))
        dp = DataParallel(model, w, bucket_mb=0.05, check_every=1, grad_compress=compress)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(w.rank)
        for _ in range(3):
            x, y = torch.randn(16, 64, generator=g), torch.randn(16, 8, generator=g)
            opt.zero_grad()
            dp.begin_step()
            nn.functional.mse_loss(model(x), y).backward()
            dp.finish()
            grads = torch.cat([p.grad.flatten() for p in model.parameters()])
            opt.step()
        dp.remove()
        runs[compress] = (torch.cat([p.detach().flatten() for p in model.parameters()]), grads)
    (p0, g0), (p1, g1) = runs[None], runs["bf16"]
    torch.testing.assert_close(p1, p0, rtol=0, atol=2e-3, msg=lambda m: f"bf16 DataParallel on {w.name}: {m}")
    assert not torch.equal(g1, g0), f"bf16 DataParallel on {w.name}: gradients were not cast"


def check_scatter_gather(w, algorithm="auto"):
    """reduce_scatter and all_gather (what ZeRO steps on) against MPI_Allreduce's segments:
    integers exact, floats close, 16-bit within its rounding; also ZeRO's per-bucket bounds, some
    segments empty; returns the algorithm `auto` runs them with here."""
    from mpipar.data_parallel.reduce import all_gather, reduce_scatter, scatter_algorithm, segment_of
    n, r = w.size, w.rank
    cases = [(numel, torch.float32, "sum") for numel in (1, n - 1, 2 * n + 1, 1001, 300_001)]
    cases += [(1001, torch.int64, "sum"), (1001, torch.float32, "avg"), (1001, torch.bfloat16, "sum"),
              (257, torch.float64, "max"), (257, torch.int32, "min")]
    for i, (numel, dtype, op) in enumerate(cases):
        what = f"reduce_scatter {w.name} numel={numel} {dtype} {op} {algorithm}"
        x = data(numel, dtype, r, 20 + i)
        ref = native(w, x, op)
        a, b = segment_of(numel, n, r)
        got = reduce_scatter(w, x, op, algorithm=algorithm)
        assert got.data_ptr() == x[a:].data_ptr() or b == a, f"{what}: not a view of its segment"
        if dtype.is_floating_point:
            tol = {torch.bfloat16: 1e-2}.get(dtype, 1e-5)
            torch.testing.assert_close(got.double(), ref[a:b].to(dtype).double(), rtol=tol, atol=4 * tol,
                                       msg=lambda m: f"{what}: {m}")
        else:
            assert torch.equal(got, ref[a:b].to(dtype)), f"{what}: differs from MPI_Allreduce"
        whole = data(numel, dtype, 0, 40 + i)              # the same vector everywhere
        mine = data(numel, dtype, r + 1, 40 + i)            # this rank's own garbage around its segment
        mine[a:b] = whole[a:b]
        assert torch.equal(all_gather(w, mine, algorithm=algorithm), whole), f"all_gather {what[15:]}: wrong"
    # ZeRO stage 2's buckets: any bounds, some of them empty
    numel = 5003
    cuts = [0] + [numel * (q + 1) // (n + 1) for q in range(n - 1)] + [numel]
    bounds = [(cuts[q], cuts[q + 1]) for q in range(n)]
    bounds[n // 2] = (cuts[n // 2], cuts[n // 2])          # empty: those elements are nobody's
    x = data(numel, torch.int64, r, 60)
    ref = native(w, x, "sum")
    a, b = bounds[r]
    got = reduce_scatter(w, x, "sum", algorithm=algorithm, bounds=bounds)
    assert torch.equal(got, ref[a:b]), f"reduce_scatter {w.name} bounds={bounds}: differs from MPI_Allreduce"
    return scatter_algorithm(w)


def checks_for(w, full=False):
    lay = host_layout(w)
    slices = lay.slices
    for numel in sorted({0, 1, max(slices - 1, 0), 2 * w.size + 1, 1001, 300_001}):
        check(w, numel, torch.float32, "sum", "auto")
        check(w, numel, torch.int64, "sum", salt=1)
        check(w, numel, torch.float32, "avg", salt=2)
    for dtype in (torch.bfloat16, torch.float16, torch.float64, torch.int32):
        for op in ("sum", "max", "min") + (("avg",) if dtype.is_floating_point else ()):
            check(w, 1001 if full else 257, dtype, op, salt=5)
    check(w, 300_001, torch.bfloat16, "avg", salt=6)
    check_bf16_rounded_once(w)
    if full:
        check(w, 4 * 2 ** 20 + 3, torch.int32, "sum", "auto", salt=7)   # rails run the pipelined ring
        check_concurrent(w)
        check_data_parallel_compressed(w)
        for algorithm in ("auto", "ring"):    # bf16/fp16 on the links: hier's rails, the flat ring
            check_compressed(w, lambda x, op, wire: make_plan(w, x, op, algorithm, wire=wire),
                             f"--grad-compress {algorithm}")
    scatter = check_scatter_gather(w)
    picked = choose_algorithm(4 * 2 ** 20, w.size, one_host(w), grouped(w), not one_host(w))
    return (f"{w.name}: {w.size} ranks, {lay.describe()} per host, auto picks {picked}; "
            f"reduce-scatter/all-gather {scatter}")


def main():
    lines = []
    # sub-worlds of other layouts from the same hosts: the first four ranks, and all but rank 3
    # (on hosts of 2+2+1 ranks: 2+2, and 2+1+1); the ranks left out run alone
    if world.size >= 5:
        for name, inside in (("first4", world.rank < 4), ("no3", world.rank != 3)):
            sub = world.split(0 if inside else 1, world.rank, name if inside else "alone")
            line = checks_for(sub)
            if inside:
                lines.append(line)
    lines.append(checks_for(world, full=True))
    expect = "--expect-hier" in sys.argv
    if expect and not grouped(world):
        raise AssertionError(f"auto does not pick hier on {host_layout(world).describe()} ranks per host")
    world.barrier()
    if world.rank == 0:
        print("\n".join(lines))
        print(f"hier checks passed on {len(set(host_layout(world).host_of))} host(s)", flush=True)


if __name__ == "__main__":
    main()
