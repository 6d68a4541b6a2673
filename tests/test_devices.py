"""Device placement and staged transfers, checked without a GPU through fake_device.FakeOps
(tests/mpi/cases_devices.py runs a whole pipeline through it)."""
from __future__ import annotations

import pytest
import torch

from mpipar.comm import World, devices, staging
from mpipar.comm.cuda import BufferPolicy
from mpipar.comm.mpi import MPI
from mpipar.errors import ConfigError
from fake_device import FakeOps


@pytest.fixture
def fake():
    ops = FakeOps()
    world = World(MPI.COMM_SELF, name="self", policy=BufferPolicy(False, ops=ops))
    return ops, world


class FakeCuda:
    def __init__(self, n: int):
        self.n, self.current = n, None

    def is_available(self):
        return self.n > 0

    def device_count(self):
        return self.n

    def set_device(self, d):
        self.current = d


def test_pick_device_from_local_rank():
    assert devices.pick("auto", 3, FakeCuda(0)) == torch.device("cpu")
    assert devices.pick("cpu", 3, FakeCuda(2)) == torch.device("cpu")
    assert devices.pick("auto", 3, FakeCuda(2)) == torch.device("cuda", 1)
    assert devices.pick("cuda", 4, FakeCuda(4)) == torch.device("cuda", 0)
    with pytest.raises(ConfigError, match=r"^--device cuda: this machine has no usable CUDA device") as e:
        devices.pick("cuda", 0, FakeCuda(0))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="choose one of auto, cpu, cuda"):
        devices.pick("gpu", 0, FakeCuda(1))


def test_choose_sets_the_device_and_local_rank_comes_from_mpi():
    world = World.alone()
    assert devices.local_rank(world) == (0, 1)
    cuda = FakeCuda(2)
    assert devices.choose("cuda", world, cuda) == torch.device("cuda", 0) and cuda.current == torch.device("cuda", 0)
    assert devices.choose("auto", world, FakeCuda(0)) == torch.device("cpu")
    assert torch.cuda.is_available() or devices.choose("auto", world) == torch.device("cpu")


def test_staged_send_hands_mpi_the_payload_only_after_its_copy(fake):
    ops, world = fake
    for step in range(5):                                   # same shape each time: buffers are reused
        x = ops.register(torch.arange(12, dtype=torch.float32).reshape(3, 4) + step)
        r = world.irecv(0, 100 + step, device="cuda:0")
        s = world.isend(x, 0, 100 + step)
        assert s.posted is False                            # copy still running: payload not with MPI
        while not s.post():                                 # polls the copy's event until it completes
            pass
        got = r.wait()
        s.wait()                                            # (MPICH completes a send to self only once received)
        assert ops.is_device(got)                           # received onto the (fake) device
        torch.testing.assert_close(got, x, rtol=0, atol=0)
    assert world.policy.pool.made <= 3, world.policy.pool.made   # one send + one receive buffer, reused
    assert ops.log.count("compute waits") == 5


def test_blocking_wait_posts_pending_staged_sends(fake):
    ops, world = fake
    x = ops.register(torch.randn(64))
    s = world.isend(x, 0, 7)
    assert s.posted is False and staging.any_pending()
    world.barrier()                                          # any blocking wait: staged sends go out first
    assert s.posted is True and not staging.any_pending()
    torch.testing.assert_close(world.recv(0, 7, device="cuda:0"), x, rtol=0, atol=0)
    s.wait()


def test_pool_reuses_a_buffer_only_after_its_copy_completed():
    ops = FakeOps(polls=2)
    pool = staging.PinnedPool(ops)
    a = pool.take((4,), torch.float32)
    event = ops.copy_async(torch.empty(4), a, "cuda:0")
    pool.give(a, event)
    b = pool.take((4,), torch.float32)                       # first query: copy still running
    assert b is not a and pool.made == 2
    pool.give(b)
    c = pool.take((4,), torch.float32)                       # a's copy now done: a or b, either is free
    assert c is a or c is b
    assert pool.made == 2


def test_cuda_aware_send_syncs_the_producer_once():
    ops = FakeOps()
    world = World(MPI.COMM_SELF, name="self", policy=BufferPolicy(True, ops=ops))
    x = torch.randn(5)
    r = world.irecv(0, 3, like=x)
    world.isend(x, 0, 3).wait()                              # CPU tensor: nothing to synchronise
    r.wait()
    assert "sync" not in ops.log and "copy" not in ops.log
