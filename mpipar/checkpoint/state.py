"""What one rank saves and restores: its layers' parameters and buffers, optimizer and
LR-scheduler state (keyed by global parameter names, so it can move to another partition) and
its RNG states, as tensors and plain types only, so `torch.load(weights_only=True)` reads it
back without executing pickle code."""
from __future__ import annotations

import io
import random

import numpy as np
import torch

from ..data_parallel.zero import gathered


# -------------------------------------------------------------------------------------------------
# Training state as tensors and plain types only, so `torch.load(weights_only=True)` reads it
# back without executing pickle code: RNG states, and optimizer state keyed by global parameter
# names (not positions), so it can move to another partition of the layers.
# -------------------------------------------------------------------------------------------------
def serialize(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def deserialize(data: bytes):
    """Tensors and plain containers only: anything else (a pickled object) raises."""
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


def cloned(obj):
    """A deep copy in which every tensor is cloned (the snapshot an async writer may keep)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: cloned(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cloned(v) for v in obj)
    return obj


# -- random number generators ----------------------------------------------------------------

def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    cuda = {"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() and torch.cuda.is_initialized() else {}
    return {"torch": torch.get_rng_state(), **cuda,
            "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": int(version), "internal": [int(v) for v in internal], "gauss": gauss}}


def set_rng_state(state: dict) -> None:
    """Restores what was saved; a GPU run's CUDA generator only where there is a GPU (a GPU
    checkpoint resumes on CPU too: tensors load to the host and are copied to where the
    parameters live)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


# -- optimizer --------------------------------------------------------------------------------

def param_names(module: torch.nn.Module) -> list[str]:
    """Global names of the trainable parameters, in the order the trainer hands them to the optimizer."""
    return [n for n, p in module.named_parameters() if p.requires_grad]


def optimizer_by_name(optimizer, names: list[str]) -> dict:
    """{"state": {param name: {key: value}}, "groups": [{hyperparameters, "params": [names]}]}."""
    sd = optimizer.state_dict()
    state = {names[i]: s for i, s in sd["state"].items()}
    groups = [{**{k: v for k, v in g.items() if k != "params"},   # beyond the names: Pipeline.parameters()'s
               "params": [names[i] for i in g["params"] if i < len(names)]}   # placeholder (no state, no name)
              for g in sd["param_groups"]]
    return {"state": state, "groups": groups}


def load_optimizer_by_name(optimizer, names: list[str], state: dict, groups: list[dict]) -> None:
    """Load state keyed by name into an optimizer over `names` (hyperparameters of group i
    come from saved group i; the parameter lists stay this optimizer's own)."""
    own, at = [], 0                 # torch numbers parameters group after group (no state_dict():
    for g in optimizer.param_groups:  # a sharded optimizer's would gather its state)
        own.append({"params": list(range(at, at + len(g["params"])))})
        at += len(g["params"])
    if len(own) != len(groups):
        from .store import CheckpointError
        raise CheckpointError(f"the optimizer has {len(own)} parameter group(s) but the checkpoint has "
                              f"{len(groups)}; the example's optimizer changed since it was written")
    index = {n: i for i, n in enumerate(names)}
    merged = [{**{k: v for k, v in saved.items() if k != "params"}, "params": g["params"]}
              for g, saved in zip(own, groups)]
    optimizer.load_state_dict({"state": {index[n]: s for n, s in state.items() if n in index},
                               "param_groups": merged})


# -------------------------------------------------------------------------------------------------
# One rank's shard: its layers' parameters and buffers, optimizer and LR-scheduler state (on
# the dp=0 replica only: the other replicas hold identical copies), and its own RNG states.
# -------------------------------------------------------------------------------------------------
def snapshot(trainer, topo, copy: bool) -> dict:
    """What this rank writes; `copy` clones every tensor (for a background writer)."""
    out = {"rank": topo.world.rank, "coords": [topo.pp_rank, topo.dp_rank, topo.tp_rank], "rng": rng_state()}
    opt, names = trainer.optimizer, param_names(trainer.module)
    if hasattr(opt, "shard_state"):
        # ZeRO: every replica writes its part of the parameters and optimizer state, gathering
        # nothing; the first replica adds what is not sharded (buffers, frozen parameters)
        out["zero"] = opt.shard_state(names)
        if topo.dp_rank == 0:
            sharded = set(names)
            out["model"] = {k: v.detach() for k, v in trainer.module.state_dict().items() if k not in sharded}
            out["sched"] = trainer.scheduler.state_dict() if trainer.scheduler else None
    elif topo.dp_rank == 0:
        out["model"] = {k: v.detach() for k, v in trainer.module.state_dict().items()}
        out["optim"] = optimizer_by_name(opt, names) if opt else None
        out["sched"] = trainer.scheduler.state_dict() if trainer.scheduler else None
    return cloned(out) if copy else out


def apply(trainer, state: dict) -> None:
    """Load an assembled state (see reshard.assemble) into the trainer's stage, in place."""
    with gathered(trainer.optimizer, write_back=True):    # ZeRO stage 3: each replica keeps its segments of it
        trainer.module.load_state_dict(state["model"])
    if trainer.optimizer is not None:
        load_optimizer_by_name(trainer.optimizer, param_names(trainer.module), state["optim_state"],
                               state["groups"])
    if trainer.scheduler is not None and state.get("sched"):
        trainer.scheduler.load_state_dict(state["sched"])
    set_rng_state(state["rng"])
