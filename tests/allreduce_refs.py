"""What all-reduce checks compare against, shared by tests/mpi/cases_ring.py (one host) and
tests/cluster/hier_checks.py (network-namespace hosts): per-rank data, MPI_Allreduce as the
reference, and a proof that every rank holds the same bits."""
import torch

from mpipar.data_parallel.buckets import checksum


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
    if not (sums == sums[0]).all():   # not assert: this module is not rewritten by pytest (-O)
        raise AssertionError(f"{what}: ranks of {w.name} disagree (checksums {sums.tolist()})")


def check_compressed(w, make, what):
    """A wire-compressed all-reduce (make(x, op, wire) -> a plan on w) against MPI_Allreduce:
    the same bits on every rank; close to the float32 sum within the wire type's rounding (one
    rounding per ring hop); exact where every partial sum fits the wire type (small integers);
    half the bytes of the uncompressed ring on the wire."""
    from mpipar.comm.waits import BOARD
    from mpipar.data_parallel.reduce import next_seq
    for wire, rtol in ((torch.bfloat16, 2.0 ** -8), (torch.float16, 2.0 ** -11)):
        for numel in (1, w.size - 1, 1001, 300_001):
            for op in ("sum", "avg"):
                x = data(numel, torch.float32, w.rank, 11)
                ref = native(w, x, op)
                # a partial sum is rounded once per hop: at most n roundings of a sum <= sum |x|
                bound = (w.size * rtol) * native(w, x.abs(), op)
                plan = make(x, op, wire)
                got = plan.run(next_seq(w))
                plan.close()
                label = f"{what} {wire} {op} numel={numel} on {w.name}"
                same_everywhere(w, got, label)
                err = (got.double() - ref).abs()
                if not (err <= bound + 1e-30).all():
                    raise AssertionError(f"{label}: error {float((err - bound).max()):.3g} past the "
                                         f"rounding bound")
        small = (torch.arange(4097) % 7 + w.rank).float()
        ref = native(w, small, "sum")
        plan = make(small, "sum", wire)
        got = plan.run(next_seq(w))
        plan.close()
        if not torch.equal(got.double(), ref):
            raise AssertionError(f"{what} {wire}: small integers not exact on {w.name}")
    x = data(300_001, torch.float32, w.rank, 12)
    sent = []
    for wire in (None, torch.bfloat16):
        before = BOARD.bytes_sent
        plan = make(x.clone(), "sum", wire)
        plan.run(next_seq(w))
        plan.close()
        sent.append(BOARD.bytes_sent - before)
    if w.size > 1 and not abs(sent[1] / sent[0] - 0.5) < 0.01:
        raise AssertionError(f"{what}: bf16 wire sent {sent[1]} bytes against {sent[0]} uncompressed")
