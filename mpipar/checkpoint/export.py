"""A checkpoint as one model, in one process (evaluation, export, parity checks): the newest
complete checkpoint whose model shards verify, merged by layer name, read with weights_only."""
from __future__ import annotations

from pathlib import Path

from . import store
from .manifest import CheckpointError, Manifest
from .reshard import full_model_state, model_sources
from .state import deserialize


def newest_full_state(root) -> tuple[Manifest, dict]:
    """(manifest, whole-model state dict); a bad shard makes it fall back to an older checkpoint."""
    problems = []
    for step, path, man in store.complete(Path(root)):
        layers = [n for stage in man.stages for n in stage]
        payloads, bad = {}, None
        for info in {s.file: s for s in model_sources(man, layers, 0, man.grid["tp"]).values()}.values():
            data, bad = store.read_verified(path, info)
            if bad:
                break
            payloads[info.file] = deserialize(data)
        if bad:
            problems.append(bad)
            continue
        return man, full_model_state(man, payloads)
    raise CheckpointError(f"no usable checkpoint in {root}" + (f" ({'; '.join(problems)})" if problems else ""))
