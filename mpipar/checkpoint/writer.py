"""Writes this rank's shard: in the caller (sync) or in a background thread after the state
was copied (async), so training does not wait on the disk."""
from __future__ import annotations

import threading
from pathlib import Path

from .atomic import atomic_write, sha256_hex
from .state import serialize


class ShardWriter:
    def __init__(self):
        self.thread: threading.Thread | None = None
        self.result: tuple[str, int] | None = None
        self.error: BaseException | None = None

    def _write(self, path: Path, obj, on_half_written) -> None:
        try:
            data = serialize(obj)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, data, on_half_written)
            self.result = (sha256_hex(data), len(data))
        except BaseException as e:   # re-raised in the training thread by wait()
            self.error = e

    def start(self, path: Path, obj, background: bool, on_half_written=None) -> None:
        """Write `obj` (already a private copy when `background`) to `path` atomically."""
        self.wait()
        self.result, self.error = None, None
        if background:
            self.thread = threading.Thread(target=self._write, args=(Path(path), obj, on_half_written),
                                           name="mpipar-checkpoint-writer", daemon=True)
            self.thread.start()
        else:
            self._write(Path(path), obj, on_half_written)

    @property
    def busy(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def wait(self) -> tuple[str, int] | None:
        """(sha256 hex, bytes) of the last shard written; raises what the writer raised."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            err, self.error = self.error, None
            raise err
        return self.result
