"""Gradient clipping by the GLOBAL norm over every stage's gradients (not per stage), computed
as torch.nn.utils.clip_grad_norm_ computes it on the whole model: each parameter's gradient
norm, then the norm of those norms in the single-process model's parameter order, so the clip
coefficient is bit-identical to single-process training (on CPU, where torch's per-tensor
norms are the plain vector norms). Each rank gathers the others' per-parameter norms over the
pipeline (a few numbers per parameter). With tensor parallelism a sharded gradient's norm is
first combined over tp (sqrt of the summed squares: equal to the full norm up to rounding);
replicated ones (equal on every tp rank) are counted once."""
from __future__ import annotations

import torch


def clip_global_norm(params, max_norm: float, pp_world, tp_world=None, sharded=(), order=None) -> float:
    """Scale grads so the norm over all stages is at most max_norm; returns the norm before.
    `sharded`: the ids of the parameters that are tensor-parallel shards over `tp_world`.
    `order`: each parameter's place in the whole model's parameter order (default: by pipeline
    rank, then as given), which sets the order the norms are combined in."""
    params = list(params)
    order = order if order is not None else [pp_world.rank * 2 ** 32 + i for i in range(len(params))]
    held = [(k, p) for k, p in zip(order, params) if p.grad is not None]
    norms = [torch.linalg.vector_norm(p.grad.detach(), 2.0).float() for _, p in held]
    split = [i for i, (_, p) in enumerate(held) if id(p) in sharded]
    if split and tp_world is not None and tp_world.size > 1:
        squares = torch.tensor([float(norms[i]) ** 2 for i in split], dtype=torch.float64)
        squares = tp_world.allreduce_native(squares)
        for i, sq in zip(split, squares.sqrt().tolist()):
            norms[i] = torch.tensor(sq, dtype=torch.float32)
    mine = [v for (k, _), n in zip(held, norms) for v in (k, float(n))]
    if pp_world.size > 1:
        width = 2 * int(pp_world.allgather_floats([len(held)]).max())
        rows = pp_world.allgather_floats(mine + [float("nan")] * (width - len(mine)))
        pairs = sorted({(k, n) for row in rows for k, n in zip(row[0::2], row[1::2]) if k == k})   # tied: once
    else:
        pairs = sorted(zip(mine[0::2], mine[1::2]))
    if not pairs:
        return 0.0
    total = torch.linalg.vector_norm(torch.tensor([n for _, n in pairs], dtype=torch.float32), 2.0)
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_([p for _, p in held], max_norm, total)
    return float(total)
