"""What a rank holds for its model, counted by storage: the model-state line every run logs
(session.py) and `bench zero` check this against the ZeRO paper's formula per stage."""
from __future__ import annotations

import torch


def held_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (a view adds nothing, a copy does)."""
    storages = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_sparse:
            t = t.coalesce() if not t.is_coalesced() else t
            parts = [t.indices(), t.values()]
        else:
            parts = [t]
        for part in parts:
            if isinstance(part, torch.Tensor) and part.numel():
                st = part.untyped_storage()
                storages[st.data_ptr()] = st.nbytes()
    return sum(storages.values())


def optimizer_tensors(optimizer) -> list[torch.Tensor]:
    """The state tensors an optimizer holds: torch's (its .state), a ShardedOptimizer's (its
    inner optimizer's and its own vectors), or those of the torch optimizers an object wraps."""
    if optimizer is None:
        return []
    if callable(getattr(optimizer, "held", None)):     # a ShardedOptimizer (zero.py)
        return optimizer_tensors(optimizer.inner) + optimizer.held()
    state = getattr(optimizer, "state", None)
    if isinstance(state, dict):
        return [v for st in state.values() for v in st.values() if isinstance(v, torch.Tensor) and v.dim()]
    wrapped = [o for v in vars(optimizer).values() for o in (v if isinstance(v, (list, tuple)) else [v])
               if isinstance(o, torch.optim.Optimizer)]
    return [t for o in wrapped for t in optimizer_tensors(o)]


def model_state_bytes(params, optimizer) -> int:
    """What this rank holds for its model: parameters, gradients and optimizer state (ZeRO:
    its flat vectors and segments too), each storage counted once."""
    params = list(params)
    return held_bytes(params + [p.grad for p in params] + optimizer_tensors(optimizer))


def formula_bytes(stage: int, psi: int, n: int) -> float:
    """Model-state bytes per replica for fp32 Adam with psi parameters on n replicas (ZeRO paper)."""
    return {0: 16 * psi, 1: 8 * psi + 8 * psi / n, 2: 4 * psi + 12 * psi / n, 3: 16 * psi / n}[stage]
