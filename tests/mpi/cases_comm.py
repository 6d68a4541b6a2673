"""comm/ on several ranks: every dtype and shape kind round-trips (blocking, non-blocking with a
pre-posted receive, into a caller's buffer), shape and dtype mismatches name both ranks and both
shapes, every wait goes through the wait board, split worlds translate ranks back to COMM_WORLD,
the library is asked whether it is CUDA-aware. Ranks 0 and 1 talk; any others only join the
collectives."""
import pytest
import torch

from mpipar.comm import Kind, tag
from mpipar.errors import ShapeError

NP = (2, 3)      # ranks 0 and 1 talk; on 3, rank 2 only joins the collectives
TIMEOUT = 120
QUICK = {2: ("test_blocking_send_recv_of_every_dtype_and_shape", "test_nonblocking_both_ways_into_a_preposted_receive",
             "test_the_real_library_is_asked_about_cuda_once_mpi_has_started")}

torch.set_num_threads(1)


def _cases():
    return [
        ("f32", torch.randn(3, 4, generator=torch.Generator().manual_seed(1))),
        ("f16", torch.randn(5, generator=torch.Generator().manual_seed(2)).half()),
        ("bf16", torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(3)).bfloat16()),
        ("i64", torch.arange(-5, 6, dtype=torch.int64)),
        ("bool", torch.tensor([True, False, True])),
        ("0-d", torch.tensor(3.25)),
        ("empty", torch.empty(0, 7)),
        ("noncontig", torch.arange(24, dtype=torch.float32).reshape(4, 6).t()),
        ("big", torch.arange(17 * 2**20, dtype=torch.float32)),   # 68 MiB
    ]


CASES = _cases()


def _peer(world):
    return 1 - world.rank if world.rank < 2 else None


def test_blocking_send_recv_of_every_dtype_and_shape(world):
    if _peer(world) is None:
        return
    for i, (name, t) in enumerate(CASES):   # rank 0 -> 1
        if world.rank == 0:
            world.send(t, 1, tag(Kind.TEST, i))
        else:
            got = world.recv(0, tag(Kind.TEST, i))
            assert got.dtype == t.dtype and got.shape == t.shape, (name, got.shape, got.dtype)
            assert torch.equal(got, t), name


def test_nonblocking_both_ways_into_a_preposted_receive(world):
    peer = _peer(world)
    if peer is None:
        return
    for i, (name, t) in enumerate(CASES):
        h_r = world.irecv(peer, tag(Kind.TEST, i, 1), like=t)
        h_s = world.isend(t, peer, tag(Kind.TEST, i, 1))
        got = h_r.wait()
        h_s.wait()
        assert torch.equal(got, t), f"nonblocking {name}"


def test_receive_into_the_callers_buffer(world):
    peer = _peer(world)
    if peer is None:
        return
    out = torch.empty(3, 4)
    h = world.irecv(peer, tag(Kind.TEST, 99), out=out)
    world.isend(CASES[0][1], peer, tag(Kind.TEST, 99)).wait()
    assert h.wait() is out and torch.equal(out, CASES[0][1])


@pytest.mark.parametrize("j, expect", [(0, dict(shape=(2, 4), dtype=torch.float32)),
                                       (1, dict(shape=(2, 3), dtype=torch.float16))], ids=["shape", "dtype"])
def test_mismatch_is_reported_with_both_ranks_and_both_shapes(world, j, expect):
    if _peer(world) is None:
        return
    if world.rank == 0:
        world.send(torch.zeros(2, 3), 1, tag(Kind.TEST, 200 + j))
    else:
        with pytest.raises(ShapeError) as e:
            world.recv(0, tag(Kind.TEST, 200 + j), **expect)
        msg = str(e.value)
        assert "rank 1 expected" in msg and "from rank 0" in msg and "sent [2, 3] float32" in msg, msg


def test_the_wait_board_sees_every_wait(world):
    before = world.board.count
    peer = _peer(world)
    if peer is not None:
        h = world.irecv(peer, tag(Kind.TEST, 300), shape=(2,), dtype=torch.float32)
        world.isend(torch.ones(2), peer, tag(Kind.TEST, 300)).wait()
        h.wait()
    world.barrier()
    assert world.board.count > 0
    # send, receive (header and pre-posted payload in one wait) and barrier: one wait each
    assert world.board.count - before == (3 if peer is not None else 1), (before, world.board.count)


def test_split_worlds_translate_ranks_back_to_comm_world(world):
    r = world.rank
    sub = world.split(r % 2, r, "parity")
    assert sub.world_rank_of(sub.rank) == r
    assert sub.size == len(range(r % 2, world.size, 2))
    assert [sub.world_rank_of(q) for q in range(sub.size)] == list(range(r % 2, world.size, 2))


def test_hosts_in_rank_order(world):
    hosts = world.hosts()
    assert len(hosts) == world.size and hosts[world.rank] == world.host


def test_the_real_library_is_asked_about_cuda_once_mpi_has_started(world):
    """MPIX_Query_cuda_support of the MPI this job runs (MPICH exits if asked before MPI_Init)."""
    assert world.cuda_support in (0, 1), world.cuda_support
