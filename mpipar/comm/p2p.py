"""Tensor send/recv between ranks: a fixed-format header, then the raw bytes.

Header and payload share a tag; MPI keeps messages between a pair of ranks with equal tags in
order, so the payload always follows its header. When the receiver knows what it expects
(`like=` or `shape=`+`dtype=`), the payload receive is posted at once into a ready buffer
(a pre-posted receive); otherwise it is posted when the header has arrived.
"""
from __future__ import annotations

import numpy as np
import torch
from .mpi import MPI

from ..errors import ShapeError
from . import header as H
from .cuda import mpi_buffer, pinned_buffer
from .tags import label
from .waits import BOARD


class SendHandle:
    """A send in flight; the tensor stays referenced until wait()."""

    def __init__(self, world, reqs, keep, dst, tag):
        self.world, self.reqs, self.keep, self.dst, self.tag = world, reqs, keep, dst, tag

    def wait(self) -> None:
        if self.reqs:
            BOARD.waitall(self.reqs, "SEND {tag} to", self.world.world_rank_of(self.dst), self.tag)
            self.reqs, self.keep = [], None

    def done(self) -> bool:
        """True once the send has completed (never blocks); the tensor is released then."""
        if self.reqs and MPI.Request.Testall(self.reqs):
            self.reqs, self.keep = [], None
        return not self.reqs


class RecvHandle:
    """A receive in flight; wait() returns the tensor, checked against what was expected."""

    def __init__(self, world, src, tag, shape, dtype, device, out):
        self.world, self.src, self.tag, self.device = world, src, tag, device
        self.shape, self.dtype = (tuple(shape) if shape is not None else None), dtype
        self.hdr = np.empty(H.HEADER_LEN, dtype=np.int64)
        self.hreq = world.comm.Irecv(self.hdr, source=src, tag=tag)
        self.buf, self.preq = out, None
        if self.buf is None and self.shape is not None and self.dtype is not None:
            self.buf = world.policy.recv_buffer(self.shape, self.dtype, device)
        if self.buf is not None:   # self.buf stays referenced, so the bare address is safe
            self.preq = world.comm.Irecv(pinned_buffer(self.buf), source=src, tag=tag)
        self.result = None

    def _mismatch(self, got_shape, got_dtype) -> ShapeError:
        w = self.world
        return ShapeError(
            f"rank {w.world_rank} expected {H.describe(self.shape, self.dtype)} for {label(self.tag)} "
            f"from rank {w.world_rank_of(self.src)}, but rank {w.world_rank_of(self.src)} sent "
            f"{H.describe(got_shape, got_dtype)}")

    def wait(self) -> torch.Tensor:
        if self.result is not None:
            return self.result
        w, peer = self.world, self.world.world_rank_of(self.src)
        failed = None
        if self.preq is not None:   # pre-posted: header and payload in one wait
            try:
                BOARD.waitall([self.hreq, self.preq], "RECV {tag} from", peer, self.tag)
            except MPI.Exception as e:   # e.g. truncation: the header below says why
                failed = e
                BOARD.wait(self.hreq, "RECV {tag} header from", peer, self.tag)
        else:
            BOARD.wait(self.hreq, "RECV {tag} header from", peer, self.tag)
        try:
            shape, dtype = H.decode(self.hdr)
        except ValueError as e:
            raise ShapeError(f"rank {w.world_rank}: from rank {peer}: {e}") from None
        want_shape = self.shape if self.shape is not None else (tuple(self.buf.shape) if self.buf is not None else None)
        want_dtype = self.dtype if self.dtype is not None else (self.buf.dtype if self.buf is not None else None)
        if (want_shape is not None and tuple(shape) != tuple(want_shape)) or (want_dtype is not None and dtype != want_dtype):
            self.shape, self.dtype = want_shape or shape, want_dtype or dtype
            raise self._mismatch(shape, dtype)
        if failed is not None:
            raise failed
        if self.preq is None:
            self.buf = w.policy.recv_buffer(shape, dtype, self.device)
            self.preq = w.comm.Irecv(pinned_buffer(self.buf), source=self.src, tag=self.tag)
            BOARD.wait(self.preq, "RECV {tag} from", peer, self.tag)
        self.result = w.policy.from_wire(self.buf, self.device)
        return self.result


def isend(world, tensor: torch.Tensor, dst: int, tag: int) -> SendHandle:
    """Start sending `tensor` to `dst`; any dtype in header.DTYPES, any shape, contiguous or not."""
    wire = world.policy.to_wire(tensor)
    hdr = H.encode(wire.shape, wire.dtype)
    BOARD.sent(hdr.nbytes + wire.numel() * wire.element_size())
    reqs = [world.comm.Isend(hdr, dest=dst, tag=tag),
            world.comm.Isend(pinned_buffer(wire), dest=dst, tag=tag)]   # the handle holds `wire`
    return SendHandle(world, reqs, (hdr, wire), dst, tag)


def send(world, tensor: torch.Tensor, dst: int, tag: int) -> None:
    isend(world, tensor, dst, tag).wait()


def irecv(world, src: int, tag: int, *, like: torch.Tensor | None = None, shape=None, dtype=None,
          device="cpu", out: torch.Tensor | None = None) -> RecvHandle:
    """Start receiving a tensor from `src`. With like/shape/dtype/out, the header is checked
    and a mismatch raises ShapeError naming both ranks and both shapes."""
    if like is not None:
        shape, dtype, device = like.shape, like.dtype, like.device
    if out is not None:
        device = out.device
        if not out.is_contiguous():
            raise ValueError("irecv(out=...) needs a contiguous tensor")
    return RecvHandle(world, src, tag, shape, dtype, device, out)


def recv(world, src: int, tag: int, **expect) -> torch.Tensor:
    return irecv(world, src, tag, **expect).wait()


# Headerless transfers, for internal traffic whose sizes both sides already know
# (ring all-reduce chunks): one message each, nothing to decode.

def isend_raw(world, tensor: torch.Tensor, dst: int, tag: int):
    BOARD.sent(tensor.numel() * tensor.element_size())
    return world.comm.Isend(mpi_buffer(tensor), dest=dst, tag=tag)


def irecv_raw(world, out: torch.Tensor, src: int, tag: int):
    return world.comm.Irecv(mpi_buffer(out), source=src, tag=tag)


ANY_SOURCE = MPI.ANY_SOURCE
