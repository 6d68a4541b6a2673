"""The rank map: which rank holds which layers, written so people can read and write it.

Grid: pp x dp x tp ranks. Rank order puts tp fastest, then dp, then pp
(rank = (pp_rank * dp + dp_rank) * tp + tp_rank), so tensor-parallel peers, which talk most,
are neighbours and land on the same host when the hostfile fills hosts in order.

Partition: contiguous runs of layers per pipeline stage, from `--balance 3,3,2,2`, a JSON file
(`{"stages": [["conv1", "conv2"], ...]}`), `layers` (even layer counts), `params` (even parameter
counts) or `time` (the slowest stage as fast as it can be, by measured forward+backward time per
layer, optionally within a memory limit per stage: the command line's default).
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .errors import ConfigError, RankMapError


@dataclass(frozen=True)
class Grid:
    pp: int = 1
    dp: int = 1
    tp: int = 1

    @property
    def size(self) -> int:
        return self.pp * self.dp * self.tp

    @classmethod
    def parse(cls, text: str | None, world_size: int) -> "Grid":
        """'pp=4,dp=2' -> Grid(4, 2, 1); 'dp' -> every rank a data-parallel replica.
        Omitted: all ranks form pipeline stages."""
        if not text:
            return cls(pp=world_size)
        if text.strip() in ("pp", "dp", "tp"):   # one axis takes every rank
            return cls(**{text.strip(): world_size})
        vals = {}
        for part in text.split(","):
            key, _, val = part.partition("=")
            key = key.strip()
            if key not in ("pp", "dp", "tp") or not val.strip().isdigit() or int(val) < 1:
                raise RankMapError(f"--grid {text!r}: write it as pp=P,dp=D,tp=T with positive integers")
            vals[key] = int(val)
        g = cls(**vals)
        if g.size != world_size:
            raise RankMapError.ranks(f"--grid {text!r} needs pp*dp*tp = {g.pp}*{g.dp}*{g.tp} = {g.size} ranks",
                                     g.size, world_size)
        return g

    def coords(self, rank: int) -> tuple[int, int, int]:
        return rank // (self.dp * self.tp), (rank // self.tp) % self.dp, rank % self.tp

    def rank_of(self, pp: int, dp: int, tp: int) -> int:
        return (pp * self.dp + dp) * self.tp + tp


def linear_partition(weights: Sequence[float], k: int, memory=None, limit: float | None = None) -> list[int]:
    """Sizes of k contiguous non-empty groups minimising the heaviest group (exact DP; ties
    favour earlier cuts). `memory(j, a, b)`: bytes group j needs to hold layers a..b-1; with
    `limit`, no group may need more (RankMapError when no partition fits)."""
    n = len(weights)
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    INF = float("inf")
    best = [[INF] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for j in range(1, k + 1):
        for i in range(j, n + 1):
            for c in range(j - 1, i):
                if limit is not None and memory(j - 1, c, i) > limit:
                    continue
                cost = max(best[j - 1][c], prefix[i] - prefix[c])
                if cost < best[j][i] - 1e-12:
                    best[j][i], cut[j][i] = cost, c
    if best[k][n] == INF:
        raise RankMapError(f"no split of the {n} layers into {k} stages keeps every stage within "
                           f"{limit / 2 ** 20:.0f} MiB; raise the limit or add stages")
    sizes, i = [], n
    for j in range(k, 0, -1):
        sizes.append(i - cut[j][i])
        i = cut[j][i]
    return sizes[::-1]


EXHAUSTIVE_CUTS = 20000   # interleaved_partition tries every cut up to this many


def interleaved_partition(weights: Sequence[float], p: int, v: int, memory=None,
                          limit: float | None = None) -> list[int]:
    """Sizes of p*v contiguous groups for an interleaved schedule, where rank r holds groups
    r, r+p, ...: minimises the heaviest rank's sum (what sets its step time), then the heaviest
    group. Exact over every cut when there are at most EXHAUSTIVE_CUTS of them; otherwise a
    descent that moves one boundary at a time, from linear_partition's cut. `memory(j, a, b)`
    and `limit` bound each rank's sum of its groups' bytes."""
    n, k = len(weights), p * v
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)

    def score(bounds):
        groups = [prefix[b] - prefix[a] for a, b in zip(bounds, bounds[1:])]
        if limit is not None:
            held = [0.0] * p
            for j, (a, b) in enumerate(zip(bounds, bounds[1:])):
                held[j % p] += memory(j, a, b)
            if max(held) > limit:
                return None
        return max(sum(groups[r::p]) for r in range(p)), max(groups)

    if math.comb(n - 1, k - 1) <= EXHAUSTIVE_CUTS:
        scored = ((score((0, *c, n)), c) for c in itertools.combinations(range(1, n), k - 1))
        scored = [(s, c) for s, c in scored if s is not None]
        if not scored:
            raise RankMapError(f"no split of the {n} layers into {k} chunks keeps every rank within "
                               f"{limit / 2 ** 20:.0f} MiB; raise the limit or add stages")
        best = min(scored, key=lambda sc: (round(sc[0][0], 12), round(sc[0][1], 12), sc[1]))[1]
        bounds = [0, *best, n]
    else:
        sizes = linear_partition(weights, k)
        bounds = [0] + list(itertools.accumulate(sizes))
        current = score(bounds)
        improved = current is not None
        while improved:
            improved = False
            for i in range(1, k):
                for step in (-1, 1):
                    trial = bounds.copy()
                    trial[i] += step
                    if not trial[i - 1] < trial[i] < trial[i + 1]:
                        continue
                    s = score(trial)
                    if s is not None and s < current:
                        bounds, current, improved = trial, s, True
        if current is None:
            raise RankMapError(f"--stage-memory-mb: the {n} layers in {k} chunks exceed "
                               f"{limit / 2 ** 20:.0f} MiB on some rank; raise the limit or add stages")
    return [b - a for a, b in zip(bounds, bounds[1:])]


def stages_from_sizes(names: Sequence[str], sizes: Sequence[int]) -> list[list[str]]:
    out, i = [], 0
    for s in sizes:
        out.append(list(names[i:i + s]))
        i += s
    if i != len(names):
        missing = list(names[i:]) if i < len(names) else []
        what = f"leaves {', '.join(missing)} without a stage" if missing else f"asks for {i} layers"
        raise RankMapError(f"--balance {','.join(map(str, sizes))} covers {i} of the model's {len(names)} layers "
                           f"({what}); the numbers must add up to {len(names)}")
    return out


@dataclass(frozen=True)
class Balance:
    """How the layers are cut into stages, as a value parsed once (`Balance.parse`) from the
    --balance flag or Pipeline's balance=: `kind` is 'time', 'params', 'layers', 'auto'
    (Pipeline: 'time' when it has a sample micro-batch, else 'params'), 'sizes' (layers per
    stage in `sizes`) or 'file' (a JSON rank map at `path`). str() gives the flag back."""
    kind: str
    sizes: tuple[int, ...] = ()
    path: str = ""

    WORDS = ("time", "params", "layers", "auto")

    @classmethod
    def parse(cls, spec) -> "Balance":
        """A Balance from 'time' | 'params' | 'layers' | 'auto' | '3,3,2,2' | [3, 3, 2, 2] |
        'FILE.json' (None or '': 'params'); a Balance is returned as it is."""
        if isinstance(spec, Balance):
            return spec
        if isinstance(spec, (list, tuple)):
            sizes, text = tuple(int(b) for b in spec), ",".join(str(int(b)) for b in spec)
        else:
            text = str(spec or "params")
            if text in cls.WORDS:
                return cls(text)
            if text.endswith(".json"):
                return cls("file", path=text)
            try:
                sizes = tuple(int(x) for x in text.split(","))
            except ValueError:
                raise RankMapError(f"--balance {text!r}: expected sizes like 3,3,2,2, 'layers', 'params', 'time' "
                                   f"or a .json file") from None
        if any(s < 0 for s in sizes):
            raise RankMapError(f"--balance {text!r}: sizes must be non-negative")
        return cls("sizes", sizes=sizes)

    def __str__(self) -> str:
        return {"sizes": ",".join(map(str, self.sizes)), "file": self.path}.get(self.kind, self.kind)

    def count(self) -> int | None:
        """The stages it names (sizes, a file), or None where they are computed."""
        if self.kind == "sizes":
            return len(self.sizes)
        if self.kind == "file":
            return len(load_json(self.path))
        return None


def parse_balance(spec: Balance | str | None, names: Sequence[str], n_stages: int,
                  param_counts: Sequence[int] | None = None,
                  layer_times: Sequence[float] | None = None, memory=None,
                  limit: float | None = None, chunks: int = 1) -> list[list[str]]:
    """Turn a Balance (or a --balance value, parsed here) into stages (lists of layer names);
    validated. 'time' splits `layer_times` (within `limit` bytes per stage by `memory`, see
    linear_partition; with `chunks` > 1 per rank, by each rank's sum of its chunks, see
    interleaved_partition)."""
    if n_stages > len(names):
        raise RankMapError(f"{n_stages} pipeline stages but the model has only {len(names)} layers; "
                           f"use at most {len(names)} stages")
    balance = Balance.parse(spec)
    kind = balance.kind
    if kind == "layers":
        stages = stages_from_sizes(names, linear_partition([1] * len(names), n_stages))
    elif kind == "params":
        stages = stages_from_sizes(names, linear_partition(param_counts or [1] * len(names), n_stages))
    elif kind == "time":
        if layer_times is None:
            raise ConfigError("--balance time needs a profiling pass (layer_times)")
        sizes = (interleaved_partition(layer_times, n_stages // chunks, chunks, memory, limit) if chunks > 1
                 else linear_partition(layer_times, n_stages, memory, limit))
        stages = stages_from_sizes(names, sizes)
    elif kind == "file":
        stages = load_json(balance.path)
    elif kind == "sizes":
        stages = stages_from_sizes(names, balance.sizes)
    else:
        raise RankMapError(f"--balance {balance}: expected sizes like 3,3,2,2, 'layers', 'params', 'time' "
                           f"or a .json file ('auto' is Pipeline's, resolved before the cut)")
    validate(stages, names, n_stages)
    return stages


def load_json(path: str) -> list[list[str]]:
    p = Path(path)
    if not p.is_file():
        raise RankMapError(f"rank map file {path} does not exist")
    try:
        doc = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise RankMapError(f"rank map file {path} is not valid JSON: {e}") from None
    stages = doc.get("stages") if isinstance(doc, dict) else doc
    if not isinstance(stages, list) or not all(isinstance(s, list) and all(isinstance(n, str) for n in s)
                                              for s in stages):
        raise RankMapError(f'rank map file {path}: expected {{"stages": [["layer", ...], ...]}}')
    return stages


def validate(stages: Sequence[Sequence[str]], names: Sequence[str], n_stages: int) -> None:
    """Every layer in exactly one stage, stages contiguous and in model order, none empty."""
    if len(stages) != n_stages:
        raise RankMapError(f"the rank map has {len(stages)} stages but the grid has pp={n_stages}; "
                           f"give {n_stages} stages or change --grid")
    index = {n: i for i, n in enumerate(names)}
    where: dict[str, int] = {}
    for s, layers in enumerate(stages):
        if not layers:
            raise RankMapError(f"stage {s} has no layers; every stage needs at least one")
        for n in layers:
            if n not in index:
                raise RankMapError(f"stage {s} names layer {n!r}, which the model does not have "
                                   f"(layers: {', '.join(names)})")
            if n in where:
                raise RankMapError(f"layer {n!r} is in stage {where[n]} and stage {s} (overlap); "
                                   f"put it in one stage")
            where[n] = s
    missing = [n for n in names if n not in where]
    if missing:
        raise RankMapError(f"layer(s) {', '.join(missing)} are in no stage (gap); assign each to a stage")
    flat = [n for layers in stages for n in layers]
    for a, b in zip(flat, flat[1:]):
        if index[b] != index[a] + 1:
            raise RankMapError(f"stages must hold contiguous layers in model order, but {b!r} follows {a!r}")


@dataclass
class RankMap:
    grid: Grid
    stages: list[list[str]]

    def stage_of_rank(self, rank: int) -> int:
        return self.grid.coords(rank)[0]

    def layers_of_rank(self, rank: int) -> list[str]:
        return self.stages[self.stage_of_rank(rank)]

    def table(self, hosts: Sequence[str], params: Sequence[int]) -> str:
        """The map as people read it: one row per rank."""
        rows = [f"{'rank':>4} {'pp':>3} {'dp':>3} {'tp':>3} {'stage':>5}  {'layers':<28} {'params':>9}  host"]
        for r in range(self.grid.size):
            pp, dp, tp = self.grid.coords(r)
            chunks = self.stages[pp::self.grid.pp]   # v > 1 (interleaved): stages pp, pp+p, ...
            span = " + ".join(c[0] if len(c) == 1 else f"{c[0]}..{c[-1]}" for c in chunks)
            rows.append(f"{r:>4} {pp:>3} {dp:>3} {tp:>3} {pp:>5}  {span:<28} {human(params[r]):>9}  {hosts[r]}")
        return "\n".join(rows)


def human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{int(n)}"
