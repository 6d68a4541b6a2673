"""The manifest: one JSON file per checkpoint naming every shard with its size and sha256, the
grid and rank map it was written with, and where training stood. Written last, so a checkpoint
without one is incomplete by definition."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import MpiparError

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
