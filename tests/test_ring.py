"""Ring all-reduce: the cut arithmetic in one process (every element in exactly one piece, each
rank sends 2(n-1)/n·S). Ring == MPI_Allreduce for every ring size 1..8 in one 8-rank launch
(sizes 0, 1, n-1, odd, multi-piece, one 64 MiB buffer; int exact, floats close, bf16/fp16
accumulated in float32; replicas bit-identical) is tests/mpi/cases_ring.py, run case by case by
tests/test_mpi_cases.py."""
import pytest
import torch

from mpipar.data_parallel.plan import RingLayout, pieces_for, split_bounds
from mpipar.data_parallel.plan import accumulate_dtype, check_op, finish_into, reduce_into
from mpipar.data_parallel.reduce import choose_algorithm


@pytest.mark.parametrize("numel", [0, 1, 2, 7, 8, 9, 1001])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("k", [1, 3])
def test_pieces_tile_the_buffer_exactly(numel, n, k):
    lay = RingLayout(numel, n, k)
    covered = []
    for seg in range(n):
        for j in range(k):
            a, b = lay.piece(seg, j)
            assert 0 <= a <= b <= numel
            covered.extend(range(a, b))
    assert covered == list(range(numel))


@pytest.mark.parametrize("n", [2, 3, 4, 5, 8])
def test_schedule_reduces_every_segment_once_and_moves_2_n_minus_1_over_n(n):
    numel = 1000 * n
    lay = RingLayout(numel, n, 2)
    for r in range(n):
        # reduce-scatter receives every segment but the one r starts (r-1), and ends owning r
        got = [lay.recv_segment(r, g) for g in range(n - 1)]
        assert sorted(got + [(r - 1) % n]) == list(range(n)) and got[-1] == r
        # what r receives at step g, its left neighbour sent at step g
        for g in range(2 * n - 2):
            assert lay.recv_segment(r, g) == lay.send_segment((r - 1) % n, g)
            if g:
                assert lay.send_segment(r, g) == lay.recv_segment(r, g - 1)
        assert lay.bytes_sent(r, 4, 0, 2 * n - 3) == 2 * (n - 1) * numel * 4 // n


def test_split_bounds_and_piece_count():
    assert [split_bounds(10, 3, i) for i in range(3)] == [(0, 4), (4, 7), (7, 10)]
    assert pieces_for(0, 4, 4, 1024) == 1
    assert pieces_for(4 * 2 ** 20, 4, 4, 512 * 1024) == 8      # 4 MiB float segments / 512 KiB
    assert pieces_for(2 ** 30, 2, 4, 1024) == 64               # capped


def test_algorithm_by_size():
    assert choose_algorithm(2 ** 30, 1) == "none"
    assert choose_algorithm(1024, 4) == "doubling"
    assert choose_algorithm(2 ** 20, 4) == "halving" and choose_algorithm(2 ** 20, 2) == "ring"
    assert choose_algorithm(2 ** 20, 6) == "ring" and choose_algorithm(64 * 2 ** 20, 4) == "ring"


def test_ops_accumulate_half_precision_in_float32():
    assert accumulate_dtype(torch.bfloat16) == torch.float32 and accumulate_dtype(torch.int64) == torch.int64
    with pytest.raises(TypeError, match="floating-point"):
        check_op("avg", torch.int32)
    with pytest.raises(ValueError, match="unknown reduction"):
        check_op("prod", torch.float32)
    acc = torch.tensor([1.0, 5.0])
    reduce_into("max", acc.numpy(), torch.tensor([3.0, 2.0]).numpy())
    assert acc.tolist() == [3.0, 5.0]
    out = torch.empty(2, dtype=torch.bfloat16)
    finish_into("avg", 2, out, acc.numpy(), same=False)   # rounded once into bf16
    assert out.tolist() == [1.5, 2.5] and acc.tolist() == [3.0, 5.0]
    finish_into("avg", 2, acc, acc.numpy(), same=True)     # same memory: in place
    assert acc.tolist() == [1.5, 2.5]

