"""One rank's shard: its layers' parameters and buffers, optimizer and LR-scheduler state (on
the dp=0 replica only: the other replicas hold identical copies), and its own RNG states."""
from __future__ import annotations

from .state import cloned, load_optimizer_by_name, optimizer_by_name, param_names, rng_state, set_rng_state


def snapshot(trainer, topo, copy: bool) -> dict:
    """What this rank writes; `copy` clones every tensor (for a background writer)."""
    out = {"rank": topo.world.rank, "coords": [topo.pp_rank, topo.dp_rank, topo.tp_rank], "rng": rng_state()}
    if topo.dp_rank == 0:
        out["model"] = {k: v.detach() for k, v in trainer.module.state_dict().items()}
        out["optim"] = (optimizer_by_name(trainer.optimizer, param_names(trainer.module))
                        if trainer.optimizer else None)
        out["sched"] = trainer.scheduler.state_dict() if trainer.scheduler else None
    return cloned(out) if copy else out


def apply(trainer, state: dict) -> None:
    """Load an assembled state (see reshard.assemble) into the trainer's stage, in place."""
    trainer.module.load_state_dict(state["model"])
    if trainer.optimizer is not None:
        load_optimizer_by_name(trainer.optimizer, param_names(trainer.module), state["optim_state"],
                               state["groups"])
    if trainer.scheduler is not None and state.get("sched"):
        trainer.scheduler.load_state_dict(state["sched"])
    set_rng_state(state["rng"])
