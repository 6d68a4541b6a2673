"""The checkpoint directory: one `step-NNNNNNNNN/` folder per checkpoint (shards + manifest),
found newest first, verified by size and sha256, pruned to the last K complete ones.

    ROOT/step-000000120/rank-00000.pt ... manifest.json   (manifest written last)
    ROOT/LATEST                                            (for people; never trusted on load)
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

from . import manifest as M
from .atomic import atomic_write_text, sha256_hex

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


def complete(root: Path) -> list[tuple[int, Path, M.Manifest]]:
    """Folders with a readable manifest, newest first (shards not yet verified)."""
    out = []
    for step, path in step_dirs(root):
        man, _ = M.read(path)
        if man is not None:
            out.append((step, path, man))
    return out


def read_verified(step_path: Path, info: M.ShardInfo) -> tuple[bytes | None, str | None]:
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
        done = (path / M.NAME).is_file()
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
    """Drop folders newer than the checkpoint we resume from (incomplete or rejected): a new
    run will write those steps again."""
    gone = [p for s, p in step_dirs(root) if s > step]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone
