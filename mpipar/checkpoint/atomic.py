"""Atomic file writes (temp file, fsync, rename, fsync the directory): a reader sees the old
file or the whole new one, never a torn one, even if the writer is killed mid-write."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, on_half_written=None, durable: bool = True) -> None:
    """Write `data` to `path` atomically. `on_half_written()` runs after half the bytes are on
    disk in the temp file (fault injection: a crash in the middle of a checkpoint write).
    durable=False skips the fsyncs (a file that only says what another durable file says)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        if on_half_written is not None:
            half = len(data) // 2
            f.write(data[:half])
            f.flush()
            os.fsync(f.fileno())
            on_half_written()
            f.write(data[half:])
        else:
            f.write(data)
        f.flush()
        if durable:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str, durable: bool = True) -> None:
    atomic_write(path, text.encode(), durable=durable)
