"""Which shards a rank needs, and its state assembled from them, for any grid: shards are keyed
by global layer names, so a checkpoint written with pp=4 (or dp=2) loads on pp=2 (or dp=4) by
looking up, for each of this rank's layers, the shard that held it."""
from __future__ import annotations

from .manifest import CheckpointError, Manifest, ShardInfo


def layer_of(key: str) -> str:
    """'fc3.0.weight' -> 'fc3' (the stage's nn.Sequential names its children by layer name)."""
    return key.split(".", 1)[0]


def rank_layers(stages: list[list[str]], pp_rank: int, pp: int) -> list[str]:
    """The layers a pipeline rank holds: virtual stages pp_rank, pp_rank+p, ... (v chunks each)."""
    return [n for st in stages[pp_rank::pp] for n in st]


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
    r = rng_source(man, grid, rank, src)
    out.setdefault(r.file, r)
    return list(out.values())


def assemble(man: Manifest, payloads: dict[str, dict], grid, rank: int, coords, layers: list[str],
             model_keys: list[str]) -> dict:
    """This rank's {"model", "optim_state", "groups", "sched", "rng"} from the loaded shards."""
    src = model_sources(man, layers, coords[2], grid.tp)
    model, optim_state = {}, {}
    for key in model_keys:
        shard = payloads[src[layer_of(key)].file]
        if key not in shard["model"]:
            raise CheckpointError(f"the checkpoint has no tensor {key!r}; the model changed since it was written")
        model[key] = shard["model"][key]
    for name in layers:
        optim = payloads[src[name].file].get("optim")
        if optim:
            optim_state.update({k: v for k, v in optim["state"].items() if layer_of(k) == name})
    first = payloads[src[layers[0]].file]
    groups = (first.get("optim") or {}).get("groups", [])
    for name in layers:   # a stage whose first layers have no parameters: take the first that has
        optim = payloads[src[name].file].get("optim")
        if optim:
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
    return out
