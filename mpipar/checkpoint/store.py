"""The checkpoint directory and its files: one `step-NNNNNNNNN/` folder per checkpoint (shards +
manifest), files written atomically, the manifest naming every shard with its size and sha256
(written last, so a folder without one is incomplete), found newest first and pruned; a
checkpoint rejected on resume is moved aside with the reasons, never deleted.

    ROOT/step-000000120/rank-00000.pt ... manifest.json   (manifest written last)
    ROOT/LATEST                                            (for people; never trusted on load)
    ROOT/quarantine/step-000000090/... WHY-rank-00002.txt  (rejected: kept as found, with why)"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import MpiparError


# -------------------------------------------------------------------------------------------------
# Atomic file writes (temp file, fsync, rename, fsync the directory): a reader sees the old
# file or the whole new one, never a torn one, even if the writer is killed mid-write.
# -------------------------------------------------------------------------------------------------
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


def atomic_write(path: Path, data: bytes, on_half_written=None, durable: bool = True, what: str = "") -> None:
    """Write `data` to `path` atomically. `on_half_written()` runs after half the bytes are on
    disk in the temp file (fault injection: a crash in the middle of a checkpoint write).
    durable=False skips the fsyncs (a file that only says what another durable file says).
    A failed write (a full disk) removes the temp file and raises a CheckpointError naming
    `what` was written where; the file it would have replaced is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
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
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise write_failed(e, what or path.name, path, len(data)) from e
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str, durable: bool = True, what: str = "") -> None:
    atomic_write(path, text.encode(), durable=durable, what=what)


def write_failed(e: OSError, what: str, path: Path, nbytes: int) -> "CheckpointError":
    """One line: what could not be written, where, why, and that earlier checkpoints are kept."""
    full = e.errno in (errno.ENOSPC, errno.EDQUOT)
    fix = ("free space on that file system or pass another --checkpoint-dir" if full
           else "check that the directory exists and is writable, or pass another --checkpoint-dir")
    code = f" ({errno.errorcode[e.errno]})" if e.errno in errno.errorcode else ""
    return CheckpointError(f"cannot write {what} ({nbytes / 1e6:.2f} MB) to {path}: {e.strerror or e}{code}; "
                           f"no temporary file is left and the checkpoints written before it are kept; {fix}")


# -------------------------------------------------------------------------------------------------
# The manifest: one JSON file per checkpoint naming every shard with its size and sha256, the
# grid and rank map it was written with, and where training stood. Written last, so a checkpoint
# without one is incomplete by definition.
# -------------------------------------------------------------------------------------------------
FORMAT = 1
NAME = "manifest.json"


class CheckpointError(MpiparError):
    """A checkpoint cannot be used for this run (model, optimizer or grid do not fit)."""


@dataclass
class ShardInfo:
    file: str
    rank: int
    coords: list[int]          # (pp, dp, tp) of the writer
    layers: list[str]          # layers whose model/optimizer state the shard holds ([] for replicas)
    bytes: int
    sha256: str
    zero: bool = False         # a ZeRO run: the shard holds this replica's part of its stage's parameters


@dataclass
class Manifest:
    step: int                  # global optimizer steps done
    epoch: int                 # resume in this epoch ...
    step_in_epoch: int         # ... skipping this many of its batches
    grid: dict                 # {"pp": P, "dp": D, "tp": T}
    stages: list[list[str]]    # the rank map's layers per stage
    shards: list[ShardInfo]
    tallies: list[list[float]] = field(default_factory=list)   # per rank: the epoch's metric sums so far
    rows: list[dict] = field(default_factory=list)             # finished epochs' metrics rows
    run: dict = field(default_factory=dict)                    # seed, batch size, schedule, ... (for people)
    format: int = FORMAT

    @property
    def world_size(self) -> int:
        return len(self.shards)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        doc = json.loads(text)
        if doc.get("format") != FORMAT:
            raise ValueError(f"manifest format {doc.get('format')!r}, expected {FORMAT}")
        doc["shards"] = [ShardInfo(**s) for s in doc["shards"]]
        return cls(**doc)


def read(step_dir: Path) -> tuple[Manifest | None, str | None]:
    """(manifest, None), or (None, why not) for a missing or unreadable manifest."""
    path = Path(step_dir) / NAME
    if not path.is_file():
        return None, "no manifest (incomplete: the job stopped while writing it)"
    try:
        return Manifest.from_json(path.read_text()), None
    except (ValueError, TypeError, KeyError) as e:
        return None, f"unreadable manifest ({type(e).__name__}: {' '.join(str(e).split())[:100]})"


# -------------------------------------------------------------------------------------------------
# The checkpoint directory: one `step-NNNNNNNNN/` folder per checkpoint (shards + manifest),
# found newest first, verified by size and sha256, pruned to the last K complete ones.
#
#     ROOT/step-000000120/rank-00000.pt ... manifest.json   (manifest written last)
#     ROOT/LATEST                                            (for people; never trusted on load)
# -------------------------------------------------------------------------------------------------
STEP_RE = re.compile(r"^step-(\d{9})$")


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:09d}"


def shard_name(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Every step folder (complete or not), newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_RE.match(p.name))]
    return sorted(found, reverse=True)


def complete(root: Path) -> list[tuple[int, Path, Manifest]]:
    """Folders with a readable manifest, newest first (shards not yet verified)."""
    out = []
    for step, path in step_dirs(root):
        man, _ = read(path)
        if man is not None:
            out.append((step, path, man))
    return out


def read_verified(step_path: Path, info: ShardInfo) -> tuple[bytes | None, str | None]:
    """The shard's bytes if size and sha256 match the manifest, else (None, what is wrong)."""
    path = Path(step_path) / info.file
    try:
        data = path.read_bytes()
    except OSError as e:
        return None, f"{path}: cannot read ({e.strerror or e})"
    if len(data) != info.bytes:
        return None, f"{path}: truncated ({len(data)} of {info.bytes} bytes)"
    if sha256_hex(data) != info.sha256:
        return None, f"{path}: corrupted (sha256 differs from the manifest)"
    return data, None


def write_latest(root: Path, step: int) -> None:
    """For people and scripts; restart never trusts it, so it needs no fsync."""
    atomic_write_text(Path(root) / "LATEST", step_dir(root, step).name + "\n", durable=False)


def prune(root: Path, keep: int) -> list[Path]:
    """Keep the newest `keep` complete checkpoints; remove older ones and every incomplete
    folder older than the newest complete one. Returns what was removed."""
    removed, kept = [], 0
    newest_complete = None
    for step, path in step_dirs(root):
        done = (path / NAME).is_file()
        if done:
            newest_complete = step if newest_complete is None else newest_complete
            kept += 1
            if keep > 0 and kept > keep:
                removed.append(path)
        elif newest_complete is not None:
            removed.append(path)
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def remove_newer(root: Path, step: int) -> list[Path]:
    """Drop the incomplete folders (no manifest: never a checkpoint) newer than the checkpoint we
    resume from: a new run will write those steps again. Rejected ones were quarantined."""
    gone = [p for s, p in step_dirs(root) if s > step]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


# -------------------------------------------------------------------------------------------------
# Quarantine: a checkpoint rejected on resume (a shard that fails its sha256, a truncated file,
# an unreadable manifest) is evidence, and may be the only copy of the work: it is moved to
# ROOT/quarantine/ as it was found, with each rejecting rank's reason, never deleted.
# -------------------------------------------------------------------------------------------------
QUARANTINE = "quarantine"


def note_rejection(step_path: Path, rank: int, problem: str) -> None:
    """This rank's reason, kept next to the shards it rejected (best effort: a full or read-only
    disk must not hide the rank's message, which is also printed)."""
    attempt = os.environ.get("MPIPAR_ATTEMPT", "0")
    try:
        (Path(step_path) / f"WHY-rank-{rank:05d}.txt").write_text(
            f"rejected on resume by rank {rank} at {time.strftime('%Y-%m-%d %H:%M:%S')} (attempt {attempt}): "
            f"{problem}\n")
    except OSError:
        pass


def rejection_reasons(step_path: Path) -> list[str]:
    """The reasons the ranks noted for a rejected folder, by rank."""
    out = []
    for f in sorted(Path(step_path).glob("WHY-rank-*.txt")):
        try:
            out.append(f.read_text().strip().split(": ", 1)[-1])
        except OSError:
            pass
    return out


def quarantine(root: Path, step_path: Path) -> Path:
    """Move a rejected step folder to ROOT/quarantine/ (a new name if one is there); returns it."""
    qdir = Path(root) / QUARANTINE
    qdir.mkdir(exist_ok=True)
    dst, n = qdir / Path(step_path).name, 1
    while dst.exists():
        n += 1
        dst = qdir / f"{Path(step_path).name}.{n}"
    os.replace(step_path, dst)
    fsync_dir(qdir)
    fsync_dir(Path(root))
    return dst
