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
