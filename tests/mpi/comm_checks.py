"""Multi-rank checks of comm/: every dtype and shape kind round-trips, shape checks fire."""
import sys

import torch

from mpipar.comm import Kind, World, failure, tag
from mpipar.errors import ShapeError

torch.set_num_threads(1)
world = World()
failure.install(world.host)
r, n = world.rank, world.size
assert n >= 2
peer = 1 - r if r < 2 else None

CASES = [
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

if peer is not None:
    for i, (name, t) in enumerate(CASES):
        # blocking, rank 0 -> 1
        if r == 0:
            world.send(t, 1, tag(Kind.TEST, i))
        else:
            got = world.recv(0, tag(Kind.TEST, i))
            assert got.dtype == t.dtype and got.shape == t.shape, (name, got.shape, got.dtype)
            assert torch.equal(got, t), name
        # non-blocking both ways, receive pre-posted with the expected shape
        h_r = world.irecv(peer, tag(Kind.TEST, i, 1), like=t)
        h_s = world.isend(t, peer, tag(Kind.TEST, i, 1))
        got = h_r.wait()
        h_s.wait()
        assert torch.equal(got, t), f"nonblocking {name}"
    # into a caller's buffer
    out = torch.empty(3, 4)
    h = world.irecv(peer, tag(Kind.TEST, 99), out=out)
    world.isend(CASES[0][1], peer, tag(Kind.TEST, 99)).wait()
    assert h.wait() is out and torch.equal(out, CASES[0][1])
    # shape and dtype mismatches are reported with both ranks and both shapes
    for j, (send_t, expect) in enumerate([(torch.zeros(2, 3), dict(shape=(2, 4), dtype=torch.float32)),
                                          (torch.zeros(2, 3), dict(shape=(2, 3), dtype=torch.float16))]):
        if r == 0:
            world.send(send_t, 1, tag(Kind.TEST, 200 + j))
        else:
            try:
                world.recv(0, tag(Kind.TEST, 200 + j), **expect)
            except ShapeError as e:
                msg = str(e)
                assert "rank 1 expected" in msg and "from rank 0" in msg and "sent [2, 3] float32" in msg, msg
                print(f"ok mismatch message: {msg}")
            else:
                raise AssertionError("mismatch not detected")
    # the wait board saw every wait
    assert world.board.count > 0

# split worlds translate ranks back to COMM_WORLD
sub = world.split(r % 2, r, "parity")
assert sub.world_rank_of(sub.rank) == r
hosts = world.hosts()
assert len(hosts) == n and hosts[r] == world.host
world.barrier()
if r == 0:
    print(f"comm checks passed on {n} ranks")
