"""Restart: every rank agrees on the newest checkpoint that is complete and whose shards this run
needs all verify, then assembles its state from them for any grid (shards are keyed by global
layer names, so pp=4 or dp=2 loads on pp=2 or dp=4); and the whole model's state for export."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from . import store
from .state import deserialize
from .store import CheckpointError, Manifest, ShardInfo, read as read_manifest


# -------------------------------------------------------------------------------------------------
# Which shards a rank needs, and its state assembled from them, for any grid: shards are keyed
# by global layer names, so a checkpoint written with pp=4 (or dp=2) loads on pp=2 (or dp=4) by
# looking up, for each of this rank's layers, the shard that held it.
# -------------------------------------------------------------------------------------------------
def layer_of(key: str) -> str:
    """'fc3.0.weight' -> 'fc3' (the stage's nn.Sequential names its children by layer name)."""
    return key.split(".", 1)[0]


def rank_layers(stages: list[list[str]], pp_rank: int, pp: int) -> list[str]:
    """The layers a pipeline rank holds: virtual stages pp_rank, pp_rank+p, ... (v chunks each)."""
    return [n for st in stages[pp_rank::pp] for n in st]


def merge_shards(parts: list[dict]) -> tuple[dict, dict, list]:
    """Every replica's shard_state() of one stage -> (whole parameters by name, the optimizer
    state by name as an unsharded optimizer holds it, the param groups): what a checkpoint of
    a ZeRO run resumes from, on any number of replicas, with or without ZeRO."""
    shapes = {k: v for part in parts for k, v in part["shapes"].items()}
    pieces: dict = {}
    state: dict = {}
    for part in parts:
        for name, (start, values) in part["params"].items():
            pieces.setdefault(name, []).append((start, values))
        for name, entries in part["state"].items():
            for key, v in entries.items():
                if isinstance(v, list):
                    state.setdefault(name, {}).setdefault(key, []).append(v)
                else:
                    state.setdefault(name, {})[key] = v
    def whole(name, stretches):
        stretches, at = sorted(stretches, key=lambda sv: sv[0]), 0
        for start, v in stretches:
            if start != at:
                break
            at += v.numel()
        if at != math.prod(shapes[name]) or stretches[-1][0] + stretches[-1][1].numel() != at:
            raise CheckpointError(f"the replicas' parts of {name} do not cover it once (elements 0..{at} of "
                              f"{math.prod(shapes[name])}): a replica's shard is missing")
        return torch.cat([v.reshape(-1) for _, v in stretches]).view(shapes[name])
    params = {name: whole(name, st) for name, st in pieces.items()}
    optim = {name: {k: (whole(name, v) if isinstance(v, list) else v) for k, v in entries.items()}
             for name, entries in state.items()}
    groups = next((part["groups"] for part in parts if part.get("groups")), [])
    return params, optim, groups


def zero_parts(man: Manifest, holder: ShardInfo) -> list[ShardInfo]:
    """The shards of every replica of `holder`'s stage (and tp rank): a ZeRO run's parameters
    and optimizer state are spread over them."""
    return [s for s in man.shards if s.zero and s.coords[0] == holder.coords[0] and s.coords[2] == holder.coords[2]]


def same_grid(man: Manifest, grid) -> bool:
    return (man.grid["pp"], man.grid["dp"], man.grid["tp"]) == (grid.pp, grid.dp, grid.tp)


def model_sources(man: Manifest, layers: list[str], tp_rank: int, tp_size: int) -> dict[str, ShardInfo]:
    """layer -> the shard holding its parameters and optimizer state (written by a dp=0 rank)."""
    if man.grid["tp"] != tp_size:
        raise CheckpointError(f"the checkpoint was written with tp={man.grid['tp']} and this run has tp={tp_size}; "
                              f"tensor-parallel shards cannot be re-split yet: use --grid with tp={man.grid['tp']}")
    holder = {}
    for s in man.shards:
        if s.coords[2] == tp_rank:
            for name in s.layers:
                holder.setdefault(name, s)
    missing = [n for n in layers if n not in holder]
    if missing:
        raise CheckpointError(f"the checkpoint has no state for layer(s) {', '.join(missing)} "
                              f"(it holds {', '.join(n for st in man.stages for n in st)}); "
                              f"the model changed since it was written: use another --checkpoint-dir")
    return {n: holder[n] for n in layers}


def rng_source(man: Manifest, grid, rank: int, sources: dict[str, ShardInfo]) -> ShardInfo:
    """Same grid: this rank's own shard. Otherwise: the shard that ran this rank's first layer."""
    if same_grid(man, grid):
        return man.shards[rank]
    return next(iter(sources.values()))


def needed(man: Manifest, grid, rank: int, coords, layers: list[str]) -> list[ShardInfo]:
    """Every shard this rank must read (and verify) to resume, without duplicates."""
    src = model_sources(man, layers, coords[2], grid.tp)
    out = {s.file: s for s in src.values()}
    for holder in list(out.values()):
        out.update({s.file: s for s in (zero_parts(man, holder) if holder.zero else [])})
    r = rng_source(man, grid, rank, src)
    out.setdefault(r.file, r)
    return list(out.values())


def assemble(man: Manifest, payloads: dict[str, dict], grid, rank: int, coords, layers: list[str],
             model_keys: list[str]) -> dict:
    """This rank's {"model", "optim_state", "groups", "sched", "rng"} from the loaded shards."""
    src = model_sources(man, layers, coords[2], grid.tp)
    merged = {h.file: merge_shards([payloads[s.file]["zero"] for s in zero_parts(man, h)])
              for h in {h.file: h for h in src.values()}.values() if h.zero}   # ZeRO: (params, optim, groups)
    model, optim_state = {}, {}
    for key in model_keys:
        holder = src[layer_of(key)]
        shard = payloads[holder.file]
        if key in shard["model"]:
            model[key] = shard["model"][key]
        elif holder.file in merged and key in merged[holder.file][0]:
            model[key] = merged[holder.file][0][key]
        else:
            raise CheckpointError(f"the checkpoint has no tensor {key!r}; the model changed since it was written")
    for name in layers:
        holder = src[name]
        optim = ({"state": merged[holder.file][1], "groups": merged[holder.file][2]} if holder.file in merged
                 else payloads[holder.file].get("optim"))
        if optim:
            optim_state.update({k: v for k, v in optim["state"].items() if layer_of(k) == name})
    first = payloads[src[layers[0]].file]
    groups = (first.get("optim") or {}).get("groups", [])
    for name in layers:   # a stage whose first layers have no parameters: take the first that has
        optim = payloads[src[name].file].get("optim") or ({"groups": merged[src[name].file][2]}
                                                         if src[name].file in merged else None)
        if optim and optim["groups"]:
            groups = optim["groups"]
            break
    return {"model": model, "optim_state": optim_state, "groups": groups, "sched": first.get("sched"),
            "rng": payloads[rng_source(man, grid, rank, src).file]["rng"]}


def full_model_state(man: Manifest, payloads: dict[str, dict]) -> dict:
    """The whole model's state dict (single process: evaluation, export, parity checks)."""
    layers = [n for stage in man.stages for n in stage]
    src = model_sources(man, layers, 0, man.grid["tp"]) if man.grid["tp"] == 1 else None
    if src is None:
        raise CheckpointError("a tensor-parallel checkpoint cannot be merged into one model yet")
    out = {}
    for s in {s.file: s for s in src.values()}.values():
        out.update(payloads[s.file]["model"])
        if s.zero:           # a ZeRO run: the parameters from every replica's part
            out.update(merge_shards([payloads[t.file]["zero"] for t in zero_parts(man, s)])[0])
    return out


# -------------------------------------------------------------------------------------------------
# Restart: every rank agrees on the newest checkpoint that is complete (has a manifest) and
# whose shards this run needs all verify; a truncated or corrupted shard is reported, the
# checkpoint quarantined (moved aside with the reasons, never deleted) and the previous one
# tried. When every checkpoint is rejected the run stops rather than silently train from step
# 0, unless told to start over. Loading never executes pickle (weights_only).
# -------------------------------------------------------------------------------------------------
RESTART_FLAG = "--restart-from-scratch"


def candidate_steps(world, root: Path, log) -> list[int]:
    """Rank 0 lists the checkpoints (folders with a manifest, readable or not), newest first,
    and tells everyone (one listing); incomplete folders are skipped."""
    steps = []
    if world.rank == 0:
        for step, path in store.step_dirs(root):
            if (path / store.NAME).is_file():
                steps.append(step)
            else:
                log(f"checkpoint: skipping {path.name}: {read_manifest(path)[1]}")
    n = world.bcast_(torch.tensor([len(steps)], dtype=torch.int64), 0)
    buf = torch.tensor(steps if world.rank == 0 else [0] * int(n[0]), dtype=torch.int64)
    return world.bcast_(buf, 0).tolist() if int(n[0]) else []


def load_mine(man: Manifest, path: Path, grid, rank: int, coords, layers, model_keys):
    """(state, None) with this rank's state from the shards it needs, or (None, what is wrong)."""
    payloads = {}
    for info in needed(man, grid, rank, coords, layers):
        data, problem = store.read_verified(path, info)
        if problem:
            return None, problem
        try:
            payloads[info.file] = deserialize(data)
        except Exception as e:   # weights_only refuses anything but tensors and plain types
            return None, f"{path / info.file}: cannot be loaded safely ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    return assemble(man, payloads, grid, rank, coords, layers, model_keys), None


def find_and_load(world, root: Path, grid, coords, layers, model_keys, log, restart_from_scratch: bool = False):
    """(manifest, state) of the newest usable checkpoint, the same one on every rank, or (None, None)
    when there is none. Rejected ones are quarantined and incomplete newer folders removed by rank
    0. Checkpoints there but none usable: a CheckpointError on every rank, unless
    `restart_from_scratch` (then (None, None))."""
    chosen, rejected = (None, None), []
    for step in candidate_steps(world, root, log):
        path = store.step_dir(root, step)
        man, why = read_manifest(path)
        state, problem = (None, why) if man is None else load_mine(man, path, grid, world.rank, coords,
                                                                   layers, model_keys)
        if problem and (man is not None or world.rank == 0):   # a bad manifest: every rank alike, one line
            sys.stderr.write(f"rank {world.rank}: checkpoint {path.name} is unusable: {problem}\n")
            sys.stderr.flush()
            store.note_rejection(path, world.rank, problem)
        ok = world.allreduce_native(torch.tensor([0 if problem else 1], dtype=torch.int64), "min")
        if int(ok[0]):
            chosen = (man, state)
            break
        rejected.append(path)
        log(f"checkpoint: {path.name} rejected (see the rank's message above); trying the previous one")
    why_first = (store.rejection_reasons(rejected[0]) or ["see the ranks' messages above"])[0] if rejected else ""
    world.barrier()   # every rank has read the notes before rank 0 moves the folders
    if world.rank == 0:
        for path in rejected:
            log(f"checkpoint: moved {path.name} to {store.quarantine(root, path)} (kept as found, with the "
                f"reasons in WHY-rank-*.txt; move it back to try it again)")
        keep = chosen[0].step if chosen[0] else -1
        for gone in store.remove_newer(root, keep):
            log(f"checkpoint: removed {gone.name} (incomplete, newer than the checkpoint we resume from)")
    world.barrier()
    earlier = 0     # no checkpoint now, but an earlier run quarantined some: still nothing usable
    if chosen[0] is None and not rejected:
        qdir = Path(root) / store.QUARANTINE
        n = len([p for p in qdir.iterdir()]) if world.rank == 0 and qdir.is_dir() else 0
        earlier = int(world.bcast_(torch.tensor([n], dtype=torch.int64), 0)[0])
    if chosen[0] is None and (rejected or earlier):
        if rejected:
            what = (f"no usable checkpoint in {root}: all {len(rejected)} were rejected (newest, {rejected[0].name}: "
                    f"{why_first}) and moved to {Path(root) / store.QUARANTINE}")
        else:
            what = (f"no usable checkpoint in {root}: an earlier run rejected {earlier} and moved them to "
                    f"{Path(root) / store.QUARANTINE} (the reasons are in their WHY-rank-*.txt)")
        if not restart_from_scratch:
            raise CheckpointError(f"{what}; to train from step 0 anyway pass {RESTART_FLAG} (your own loop: "
                                  f"mpipar.Checkpoint(..., restart_from_scratch=True)); the quarantined ones stay")
        log(f"checkpoint: {what}; starting from step 0 ({RESTART_FLAG})")
    return chosen


# -------------------------------------------------------------------------------------------------
# A checkpoint as one model, in one process (evaluation, export, parity checks): the newest
# complete checkpoint whose model shards verify, merged by layer name, read with weights_only.
# -------------------------------------------------------------------------------------------------
def newest_full_state(root) -> tuple[Manifest, dict]:
    """(manifest, whole-model state dict); a bad shard makes it fall back to an older checkpoint."""
    problems = []
    for step, path, man in store.complete(Path(root)):
        layers = [n for stage in man.stages for n in stage]
        payloads, bad = {}, None
        holders = {s.file: s for s in model_sources(man, layers, 0, man.grid["tp"]).values()}
        for h in list(holders.values()):      # a ZeRO run: every replica's part too
            holders.update({s.file: s for s in (zero_parts(man, h) if h.zero else [])})
        for info in holders.values():
            data, bad = store.read_verified(path, info)
            if bad:
                break
            payloads[info.file] = deserialize(data)
        if bad:
            problems.append(bad)
            continue
        return man, full_model_state(man, payloads)
    raise CheckpointError(f"no usable checkpoint in {root}" + (f" ({'; '.join(problems)})" if problems else ""))
