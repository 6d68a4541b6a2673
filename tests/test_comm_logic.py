"""Pure logic of comm/ (no MPI launch): headers, tags, buffer policy, CUDA detection."""
import types

import numpy as np
import pytest
import torch

from mpipar.comm import messages as H
from mpipar.comm.cuda import BufferPolicy, mpi_buffer, query_cuda_support
from mpipar.comm.tags import Kind, label, tag, untag


@pytest.mark.parametrize("shape", [(), (0,), (3, 4), (1, 2, 3, 4, 5, 6, 7, 8)])
@pytest.mark.parametrize("dtype", H.DTYPES)
def test_header_round_trip(shape, dtype):
    assert H.decode(H.encode(shape, dtype)) == (shape, dtype)


def test_header_rejects_garbage_and_too_many_dims():
    with pytest.raises(ValueError, match="not an mpipar tensor header"):
        H.decode(np.zeros(H.HEADER_LEN, dtype=np.int64))
    bad = H.encode((2, 2), torch.float32).copy()   # encode hands out a cached, read-only header
    bad[1] = 99
    with pytest.raises(ValueError, match="corrupt"):
        H.decode(bad)
    with pytest.raises(ValueError, match="at most 8"):
        H.encode((1,) * 9, torch.float32)
    with pytest.raises(TypeError, match="cannot send dtype"):
        H.encode((1,), torch.complex64)


def test_tags_are_distinct_and_readable():
    seen = {tag(k, mb, c) for k in Kind for mb in (0, 1, 65535) for c in (0, 1, 255)}
    assert len(seen) == len(Kind) * 9
    assert max(seen) < 2**31  # within Open MPI's and MPICH's MPI_TAG_UB
    assert untag(tag(Kind.GRAD, 7, 3)) == (Kind.GRAD, 7, 3)
    assert label(tag(Kind.ACT, 7)) == "ACT mb=7"
    assert tag(Kind.ACT, 65536 + 5) == tag(Kind.ACT, 5)  # documented wrap-around
    with pytest.raises(ValueError):
        tag(Kind.ACT, 0, 256)


def test_cpu_buffers_are_zero_copy_for_every_dtype():
    for dt in H.DTYPES:
        t = torch.zeros(4, dtype=dt)
        buf = mpi_buffer(t)
        assert buf.__array_interface__["data"][0] == t.data_ptr()
        assert buf.nbytes == t.numel() * t.element_size()


def test_buffer_policy_stages_only_without_cuda_awareness():
    cpu = torch.ones(3)
    fake_cuda = types.SimpleNamespace(device=torch.device("cuda", 0))
    assert not BufferPolicy(False).needs_staging(cpu)
    assert BufferPolicy(False).needs_staging(fake_cuda)
    assert not BufferPolicy(True).needs_staging(fake_cuda)
    assert BufferPolicy(False).recv_buffer((2,), torch.float32, "cuda:0").device.type == "cpu"
    assert BufferPolicy(False).to_wire(cpu.t() if cpu.dim() > 1 else cpu).data_ptr() == cpu.data_ptr()


def test_cuda_query_absent_symbol_means_not_cuda_aware(tmp_path):
    assert query_cuda_support(types.SimpleNamespace(__file__=str(tmp_path / "nolib.so"))) == 0
    # the real library, asked once MPI has started: tests/mpi/cases_comm.py (every MPI's suite)


def test_a_rank_that_was_stopped_does_not_blame_its_peer():
    """Issue 30 #9: a rank SIGSTOPped for 20 s, once continued, found its wait 20 s old and reported
    its peer as stalled. The watchdog's clock counts a wait only while the process runs."""
    from mpipar.comm import failure
    from mpipar.comm.waits import BOARD, Waiting
    dog = failure.Watchdog(timeout=5.0, host="h", poll=0.5)
    before = BOARD.current
    try:
        dog.last = 100.0
        BOARD.current = w = Waiting("RECV {tag} from", 1, since=100.0)
        assert dog.overdue(100.5) == (w, 0.5)
        assert dog.overdue(120.5) == (w, 0.0)          # stopped for 20 s: the wait starts again
        assert dog.overdue(121.0) == (w, 0.5)
        t = 121.0
        while t < 126.5:                               # a peer silent while this rank runs: reported
            t += 0.5
            _, waited = dog.overdue(t)
        assert waited > dog.timeout
        BOARD.current = w2 = Waiting("RECV {tag} from", 2, since=126.5)   # a new wait: its own clock
        assert dog.overdue(127.0) == (w2, 0.5)
    finally:
        BOARD.current = before
