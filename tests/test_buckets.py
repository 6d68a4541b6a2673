"""Gradient buckets and replica fingerprints, in one process (no MPI)."""
import torch

from mpipar.data_parallel.buckets import plan_buckets
from mpipar.data_parallel.buckets import checksum, layout_fingerprint

F, H = torch.float32, torch.bfloat16


def test_buckets_fill_in_reverse_order_up_to_the_cap():
    sizes = [(100, F), (100, F), (300, F), (50, F)]          # 400, 400, 1200, 200 bytes
    assert plan_buckets(sizes, 1000) == [[3], [2], [1, 0]]
    assert plan_buckets(sizes, 10 ** 9) == [[3, 2, 1, 0]]
    assert plan_buckets(sizes, 1) == [[3], [2], [1], [0]]   # each parameter alone


def test_buckets_never_mix_dtypes():
    plan = plan_buckets([(10, F), (10, H), (10, F), (10, H)], 10 ** 6)
    assert plan == [[3, 1], [2, 0]]
    assert plan_buckets([], 1000) == []


def test_layout_fingerprint_tells_shapes_and_plans_apart():
    shapes, dtypes = [(4, 3), (4,)], [F, F]
    a = layout_fingerprint(shapes, dtypes, [[1, 0]])
    assert a == layout_fingerprint(shapes, dtypes, [[1, 0]])
    assert a[:2] == [2, 16]
    assert a[3] != layout_fingerprint([(3, 4), (4,)], dtypes, [[1, 0]])[3]      # same numel, other shape
    assert a[3] != layout_fingerprint(shapes, [F, H], [[1, 0]])[3]
    assert a[4] != layout_fingerprint(shapes, dtypes, [[1], [0]])[4]
    assert all(v < 2 ** 53 for v in a)                                         # exact in float64


def test_checksum_sees_one_bit_and_a_swap():
    x = torch.randn(1000)
    y = x.clone()
    y.view(torch.int32)[17] ^= 1
    assert checksum([x]) != checksum([y])
    assert checksum([x[:2], x[2:]]) != checksum([x[2:], x[:2]])
    assert checksum([x]) == checksum([x.clone()])
    assert checksum([torch.ones(3, dtype=torch.bfloat16)]) == checksum([torch.ones(3, dtype=torch.bfloat16)])
