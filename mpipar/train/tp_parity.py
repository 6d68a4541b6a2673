"""Do the tensor-parallel parameters still equal single-process training's? Checked at a fixed
early step (default 20) with assert_close, and summarised as a relative difference at the end,
where the rounding differences of another summation order have had time to grow."""
from __future__ import annotations

import math

import torch


def parity_step(args, n_train: int) -> int:
    """The step at which both runs are compared: --parity-steps, or the last step if fewer."""
    per_epoch = math.ceil(n_train / args.batch_size)
    per_epoch = min(per_epoch, args.steps) if args.steps else per_epoch
    return max(1, min(getattr(args, "parity_steps", 20), per_epoch * args.epochs))


def largest_relative_difference(full: dict, ref: dict) -> tuple[float, str]:
    """max over tensors of max|a - b| / max|b| (floating-point entries only)."""
    best, where = 0.0, "-"
    for k, v in ref.items():
        if not v.is_floating_point() or not v.numel():
            continue
        rel = float((full[k].double() - v.double()).abs().max() / v.double().abs().max().clamp_min(1e-12))
        if rel > best:
            best, where = rel, k
    return best, where


def parity_line(full: dict, ref: dict, steps: int) -> str:
    """One log line: equal (torch.testing.assert_close, fp32 defaults) or not, and the worst entry."""
    rel, where = largest_relative_difference(full, ref)
    try:
        for k, v in ref.items():
            torch.testing.assert_close(full[k], v, msg=k)
        verdict = "equal single-process training (assert_close)"
    except AssertionError as e:
        verdict = f"DIFFER from single-process training ({str(e).splitlines()[0]})"
    return (f"parity after {steps} steps: tensor-parallel parameters {verdict}; "
            f"largest relative difference {rel:.1e} in {where}")


def add_parity_args(p) -> None:
    """Flags of the tensor-parallel examples' comparison with single-process training."""
    p.add_argument("--no-compare", dest="compare", action="store_false", help="skip single-process training")
    p.add_argument("--parity-steps", type=int, default=20, help="compare parameters after this many steps")
    p.add_argument("--float64", action="store_true", help="train in float64 (parity holds for the whole run)")
