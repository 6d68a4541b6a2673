"""Restart: every rank agrees on the newest checkpoint that is complete (has a manifest) and
whose shards this run needs all verify; a truncated or corrupted shard is reported and the
previous checkpoint is tried. Loading never executes pickle (weights_only)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from . import reshard, store
from .manifest import Manifest, read as read_manifest
from .state import deserialize


def candidate_steps(world, root: Path, log) -> list[int]:
    """Rank 0 lists the complete checkpoints, newest first, and tells everyone (one listing)."""
    steps = []
    if world.rank == 0:
        for step, path in store.step_dirs(root):
            man, why = read_manifest(path)
            if man is None:
                log(f"checkpoint: skipping {path.name}: {why}")
            else:
                steps.append(step)
    n = world.bcast_(torch.tensor([len(steps)], dtype=torch.int64), 0)
    buf = torch.tensor(steps if world.rank == 0 else [0] * int(n[0]), dtype=torch.int64)
    return world.bcast_(buf, 0).tolist() if int(n[0]) else []


def load_mine(man: Manifest, path: Path, grid, rank: int, coords, layers, model_keys):
    """(state, None) with this rank's state from the shards it needs, or (None, what is wrong)."""
    payloads = {}
    for info in reshard.needed(man, grid, rank, coords, layers):
        data, problem = store.read_verified(path, info)
        if problem:
            return None, problem
        try:
            payloads[info.file] = deserialize(data)
        except Exception as e:   # weights_only refuses anything but tensors and plain types
            return None, f"{path / info.file}: cannot be loaded safely ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    return reshard.assemble(man, payloads, grid, rank, coords, layers, model_keys), None


def find_and_load(world, root: Path, grid, coords, layers, model_keys, log):
    """(manifest, state) of the newest usable checkpoint, the same one on every rank, or (None, None).
    Folders newer than it (incomplete, or rejected) are removed by rank 0."""
    chosen = (None, None)
    for step in candidate_steps(world, root, log):
        path = store.step_dir(root, step)
        man, why = read_manifest(path)
        state, problem = (None, why) if man is None else load_mine(man, path, grid, world.rank, coords,
                                                                   layers, model_keys)
        if problem:
            sys.stderr.write(f"rank {world.rank}: checkpoint {path.name} is unusable: {problem}\n")
            sys.stderr.flush()
        ok = world.allreduce_native(torch.tensor([0 if problem else 1], dtype=torch.int64), "min")
        if int(ok[0]):
            chosen = (man, state)
            break
        log(f"checkpoint: {path.name} rejected (see the rank's message above); trying the previous one")
    if world.rank == 0:
        keep = chosen[0].step if chosen[0] else -1
        for gone in store.remove_newer(root, keep):
            log(f"checkpoint: removed {gone.name} (newer than the checkpoint we resume from)")
    world.barrier()
    return chosen
