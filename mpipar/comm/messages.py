"""What travels between ranks (under tags.py's tags, which cannot collide): fixed-format tensor headers (never pickle), tensor sends and receives checked against what
the receiver expects, and headerless numpy-array messages for the all-reduce hot loops."""
from __future__ import annotations

import numpy as np
import torch

from ..errors import ShapeError
from . import staging
from .cuda import mpi_buffer, pinned_buffer
from .mpi import MPI
from .tags import label
from .waits import BOARD


# -------------------------------------------------------------------------------------------------
# Fixed-format tensor headers: dtype and shape travel as int64s, never as pickle.
# -------------------------------------------------------------------------------------------------
MAGIC = 0x6D707031  # "mpp1": a header that does not start with this is not ours
MAX_DIMS = 8
HEADER_LEN = 3 + MAX_DIMS  # magic, dtype code, ndim, dims...

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
          torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]
CODE = {dt: i for i, dt in enumerate(DTYPES)}


_CACHE: dict = {}   # (shape, dtype) -> read-only header; training sends few distinct shapes


def encode(shape: torch.Size | tuple, dtype: torch.dtype) -> np.ndarray:
    """Header for a tensor of this shape and dtype, as a read-only int64 array of HEADER_LEN
    (cached: the same shapes go by every step, and building one costs microseconds)."""
    key = (tuple(shape), dtype)
    h = _CACHE.get(key)
    if h is None:
        h = _CACHE[key] = _build(*key)
        if len(_CACHE) > 4096:   # many distinct shapes (e.g. variable lengths): start over
            _CACHE.clear()
    return h


def _build(shape: tuple, dtype: torch.dtype) -> np.ndarray:
    if dtype not in CODE:
        raise TypeError(f"mpipar cannot send dtype {dtype}; supported: {', '.join(map(str, DTYPES))}")
    if len(shape) > MAX_DIMS:
        raise ValueError(f"mpipar sends tensors of at most {MAX_DIMS} dimensions, got {len(shape)}")
    h = np.zeros(HEADER_LEN, dtype=np.int64)
    h[0], h[1], h[2] = MAGIC, CODE[dtype], len(shape)
    h[3:3 + len(shape)] = shape
    h.flags.writeable = False
    return h


def decode(h: np.ndarray) -> tuple[tuple[int, ...], torch.dtype]:
    """(shape, dtype) from a header; ValueError if the bytes are not a header of ours."""
    v = h.tolist()   # plain ints: cheaper than indexing numpy element by element
    if len(v) != HEADER_LEN or v[0] != MAGIC:
        raise ValueError("received bytes are not an mpipar tensor header (mismatched send/recv pairing?)")
    code, ndim = v[1], v[2]
    dims = tuple(v[3:3 + ndim])
    if not 0 <= code < len(DTYPES) or not 0 <= ndim <= MAX_DIMS or any(d < 0 for d in dims):
        raise ValueError(f"corrupt mpipar tensor header {v}")
    return dims, DTYPES[code]


def describe(shape, dtype) -> str:
    """'[16, 64] float32' — how shapes appear in error messages."""
    return f"{list(shape)} {str(dtype).replace('torch.', '')}"


# -------------------------------------------------------------------------------------------------
# Tensor send/recv between ranks: a fixed-format header, then the raw bytes.
#
# Header and payload share a tag; MPI keeps messages between a pair of ranks with equal tags in
# order, so the payload always follows its header. When the receiver knows what it expects
# (`like=` or `shape=`+`dtype=`), the payload receive is posted at once into a ready buffer
# (a pre-posted receive); otherwise it is posted when the header has arrived.
# -------------------------------------------------------------------------------------------------
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
        self.hdr = np.empty(HEADER_LEN, dtype=np.int64)
        self.hreq = world.comm.Irecv(self.hdr, source=src, tag=tag)
        self.out, self.preq = out, None
        self.staged = world.policy.staged_recv(device)   # lands in a pinned host buffer, then the device
        self.buf = None if self.staged else out
        if self.staged and out is not None:
            self.shape, self.dtype = tuple(out.shape), out.dtype
        if self.buf is None and self.shape is not None and self.dtype is not None:
            self.buf = self._buffer(self.shape, self.dtype)
        if self.buf is not None:   # self.buf stays referenced, so the bare address is safe
            self.preq = world.comm.Irecv(pinned_buffer(self.buf), source=src, tag=tag)
        self.result = None

    def _buffer(self, shape, dtype) -> torch.Tensor:
        policy = self.world.policy
        return policy.pool.take(shape, dtype) if self.staged else policy.recv_buffer(shape, dtype, self.device)

    def _mismatch(self, got_shape, got_dtype) -> ShapeError:
        w = self.world
        return ShapeError(
            f"rank {w.world_rank} expected {describe(self.shape, self.dtype)} for {label(self.tag)} "
            f"from rank {w.world_rank_of(self.src)}, but rank {w.world_rank_of(self.src)} sent "
            f"{describe(got_shape, got_dtype)}")

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
            shape, dtype = decode(self.hdr)
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
            self.buf = self._buffer(shape, dtype)
            self.preq = w.comm.Irecv(pinned_buffer(self.buf), source=self.src, tag=self.tag)
            BOARD.wait(self.preq, "RECV {tag} from", peer, self.tag)
        if self.staged:   # to the device on the side stream; compute waits for the copy, not the host
            ops = w.policy.ops
            self.result = self.out if self.out is not None else ops.device_empty(shape, dtype, self.device)
            event = ops.copy_async(self.result, self.buf, self.device)
            ops.consume_after(event, self.device)
            w.policy.pool.give(self.buf, event)
            self.buf = None
        else:
            self.result = w.policy.from_wire(self.buf, self.device)
        return self.result


class StagedSend(SendHandle):
    """A device tensor sent through a pinned host copy (MPI not CUDA-aware): the header goes at
    once, the payload only when its copy to the host has completed -- checked by done(), forced
    by wait() and by any blocking wait of this process (waits.py calls staging.flush), so a peer
    waiting for it cannot deadlock us. The buffer returns to the pool when the send completes."""

    def __init__(self, world, tensor: torch.Tensor, dst: int, tag: int):
        policy = world.policy
        hdr = encode(tensor.shape, tensor.dtype)
        self.buf = policy.pool.take(tensor.shape, tensor.dtype)
        self.event = policy.ops.copy_async(self.buf, tensor, tensor.device)
        BOARD.sent(hdr.nbytes + tensor.numel() * tensor.element_size())
        super().__init__(world, [world.comm.Isend(hdr, dest=dst, tag=tag)], (hdr, tensor), dst, tag)
        self.posted = False
        staging.pending(self)

    def post(self, block: bool = False) -> bool:
        """Hand the payload to MPI once its copy is done (block: wait for the copy); True if posted."""
        if not self.posted:
            ops = self.world.policy.ops
            if block:
                ops.wait(self.event)
            elif not ops.done(self.event):
                return False
            self.reqs.append(self.world.comm.Isend(pinned_buffer(self.buf), dest=self.dst, tag=self.tag))
            self.posted = True
            staging.posted(self)
        return True

    def done(self) -> bool:
        if not self.post() or not super().done():
            return False
        self._release()
        return True

    def wait(self) -> None:
        self.post(block=True)
        super().wait()
        self._release()

    def _release(self) -> None:
        if self.buf is not None:
            self.world.policy.pool.give(self.buf)
            self.buf = None


def isend(world, tensor: torch.Tensor, dst: int, tag: int) -> SendHandle:
    """Start sending `tensor` to `dst`; any dtype in header.DTYPES, any shape, contiguous or not."""
    if not tensor.is_cpu or world.policy.stand_in:
        if world.policy.staged_send(tensor):
            return StagedSend(world, tensor.detach(), dst, tag)
        world.policy.ready_for_mpi(tensor)
    wire = world.policy.to_wire(tensor)
    hdr = encode(wire.shape, wire.dtype)
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


# -------------------------------------------------------------------------------------------------
# Tuples: what flows between the stages of a traced (split) module -- tensors and the Python
# numbers that cross a cut (a sequence length read at the top of forward). One header of
# (kind, word) pairs goes first (numbers travel in it), then each tensor as above, all under one
# tag: MPI keeps them in order, and the receiver takes the tensors one after another.
# -------------------------------------------------------------------------------------------------
TUPLE_MAGIC = 0x6D707054  # "mppT"
MAX_VALUES = 64
TENSOR, INT, FLOAT, BOOL = range(4)


def encode_values(values) -> np.ndarray:
    """The header of a tuple: [magic, n, (kind, word) per value]; a number is its own word."""
    if len(values) > MAX_VALUES:
        raise ValueError(f"mpipar sends tuples of at most {MAX_VALUES} values, got {len(values)}")
    h = np.zeros(2 + 2 * len(values), dtype=np.int64)
    h[0], h[1] = TUPLE_MAGIC, len(values)
    for i, v in enumerate(values):
        if isinstance(v, torch.Tensor):
            kind, word = TENSOR, 0
        elif isinstance(v, bool):
            kind, word = BOOL, int(v)
        elif isinstance(v, int):
            kind, word = INT, v
        elif isinstance(v, float):
            kind, word = FLOAT, int(np.float64(v).view(np.int64))
        else:
            raise TypeError(f"mpipar sends tensors, ints, floats and bools between ranks, not {type(v).__name__}")
        h[2 + 2 * i], h[3 + 2 * i] = kind, word
    return h


def decode_values(h: np.ndarray) -> list[tuple[int, object]]:
    """[(kind, number or None)] from a tuple header; ValueError if it is not one of ours."""
    if int(h[0]) != TUPLE_MAGIC or not 0 <= int(h[1]) <= MAX_VALUES:
        raise ValueError("received bytes are not an mpipar tuple header (mismatched send/recv pairing?)")
    out = []
    for kind, word in h[2:2 + 2 * int(h[1])].reshape(-1, 2).tolist():
        value = {TENSOR: None, INT: word, BOOL: bool(word),
                 FLOAT: float(np.int64(word).view(np.float64))}.get(kind, ValueError)
        if value is ValueError:
            raise ValueError(f"corrupt mpipar tuple header {h.tolist()}")
        out.append((kind, value))
    return out


class TupleSend:
    """A tuple's header and tensors in flight."""

    def __init__(self, world, values, dst: int, tag: int):
        self.hdr = encode_values(values)
        BOARD.sent(self.hdr.nbytes)
        self.parts = [SendHandle(world, [world.comm.Isend(self.hdr, dest=dst, tag=tag)], self.hdr, dst, tag)]
        for v in values:
            if isinstance(v, torch.Tensor):
                part = isend(world, v, dst, tag)
                if isinstance(part, StagedSend):
                    part.post(block=True)   # its payload goes before the next tensor's header
                self.parts.append(part)

    def wait(self) -> None:
        for part in self.parts:
            part.wait()

    def done(self) -> bool:
        return all([part.done() for part in self.parts])


class TupleRecv:
    """A tuple's receive: the header is posted at once, the tensors are taken by wait()."""

    def __init__(self, world, src: int, tag: int, device):
        self.world, self.src, self.tag, self.device = world, src, tag, device
        self.hdr = np.zeros(2 + 2 * MAX_VALUES, dtype=np.int64)
        self.hreq = world.comm.Irecv(self.hdr, source=src, tag=tag)
        self.result = None

    def wait(self) -> tuple:
        if self.result is None:
            w, peer = self.world, self.world.world_rank_of(self.src)
            BOARD.wait(self.hreq, "RECV {tag} header from", peer, self.tag)
            try:
                kinds = decode_values(self.hdr)
            except ValueError as e:
                raise ShapeError(f"rank {w.world_rank}: from rank {peer}: {e}") from None
            self.result = tuple(recv(w, self.src, self.tag, device=self.device) if kind == TENSOR else value
                                for kind, value in kinds)
        return self.result


def isend_tuple(world, values, dst: int, tag: int) -> TupleSend:
    """Start sending a tuple of tensors and numbers (ints, floats, bools) to `dst`."""
    return TupleSend(world, values, dst, tag)


def irecv_tuple(world, src: int, tag: int, *, device="cpu") -> TupleRecv:
    return TupleRecv(world, src, tag, device)


# Headerless transfers, for internal traffic whose sizes both sides already know
# (ring all-reduce chunks): one message each, nothing to decode.

def isend_raw(world, tensor: torch.Tensor, dst: int, tag: int):
    BOARD.sent(tensor.numel() * tensor.element_size())
    return world.comm.Isend(mpi_buffer(tensor), dest=dst, tag=tag)


def irecv_raw(world, out: torch.Tensor, src: int, tag: int):
    return world.comm.Irecv(mpi_buffer(out), source=src, tag=tag)


ANY_SOURCE = MPI.ANY_SOURCE


# -------------------------------------------------------------------------------------------------
# Headerless sends and receives of numpy arrays, for the all-reduce hot loops.
#
# A collective turns its CPU tensors into numpy views once, then slices those per message:
# about 1 us per call instead of a tensor-to-buffer conversion (~5 us) for each of the hundreds
# of pieces a pipelined ring moves. Both sides must use the same dtype and length (the ring's
# layout guarantees it); waits still go through BOARD.
# -------------------------------------------------------------------------------------------------
def isend_array(world, arr: np.ndarray, dst: int, tag: int):
    BOARD.sent(arr.nbytes)
    return world.comm.Isend(arr, dest=dst, tag=tag)


def irecv_array(world, arr: np.ndarray, src: int, tag: int):
    return world.comm.Irecv(arr, source=src, tag=tag)
