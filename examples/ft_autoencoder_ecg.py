"""Fault-tolerant data-parallel ECG autoencoder (MIT-BIH 100): Adagrad + MSE, AUC-ROC, recovery rate.

Trained on normal beats only; a beat's anomaly score is its reconstruction error, and the AUC-ROC
says how well that separates the abnormal beats from held-out normal ones. Faults come from
--inject-fault (a rank SIGKILLs itself). Two ways to survive them:
  * ULFM (`mpirun --with-ft ulfm ...`): the survivors shrink the communicator and go on with n-1
    ranks, no relaunch (mpipar/train/survive.py);
  * otherwise: per-rank checkpoints + the supervisor relaunching the job, which resumes from
    the last checkpoint (`python -m mpipar.run ft-autoencoder-ecg --supervise --np 4 ...`).
"""
import dataclasses
import os
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _ecg_autoencoder as ecg  # noqa: E402

from mpipar.app.example import Example  # noqa: E402

WIDTHS = "128,32"


def specs(args):
    return ecg.layers(args, WIDTHS)


def add_args(p) -> None:
    ecg.add_args(p)
    p.add_argument("--resume", action="store_true",
                   help="keep the default checkpoint dir of an earlier launch (the supervisor's relaunches always do)")


def main(args, world, log):
    from mpipar.comm import ulfm
    log(ulfm.status())
    return surviving(args, world, log) if ulfm.enabled() else relaunching(args, world, log)


def relaunching(args, world, log):
    """Shared trainer (grid dp=N unless --grid says otherwise) + checkpoints + the supervisor."""
    from mpipar.app.session import run_example
    fresh = args.checkpoint_dir is None and not args.resume and os.environ.get("MPIPAR_ATTEMPT", "0") == "0"
    args.checkpoint_dir = args.checkpoint_dir or str(Path(args.out) / "ckpt")
    if fresh:   # the default dir starts empty on a first launch; relaunches resume from it
        if world.rank == 0:
            shutil.rmtree(args.checkpoint_dir, ignore_errors=True)
        world.barrier()
    args.grid = args.grid or f"dp={world.size}"
    log("fault tolerance: per-rank checkpoints + relaunch by the supervisor (--supervise)")
    return run_example(world, dataclasses.replace(EXAMPLE, main=None), args)


def after_fit(trainer, train, test, args, log) -> str:
    """AUC-ROC on the test beats, and how many injected faults this run came back from."""
    from mpipar.checkpoint.fault import fired_launches
    auc, text = ecg.pipeline_auc(trainer, test)
    launches = fired_launches(Path(args.checkpoint_dir) / "faults")
    attempt = int(os.environ.get("MPIPAR_ATTEMPT", "0"))
    recovered = sum(1 for k in launches if k < attempt)   # this launch got past every fault an earlier one died of
    rate = f" ({recovered / len(launches):.0%})" if launches else ""
    log(f"ft-autoencoder-ecg: {text}")
    log(f"recovery: {len(launches)} injected fault(s) fired, {recovered} recovered by relaunch + resume{rate}; "
        f"this is launch {attempt + 1}")
    return f"AUC-ROC {auc:.4f}, {recovered} of {len(launches)} fault(s) recovered"


def surviving(args, world, log):
    """ULFM: data parallel over all ranks; a dead rank is dropped and its samples re-assigned."""
    from mpipar.checkpoint import fault
    from mpipar.train.checkpointing import total_steps
    from mpipar.model import build_full
    from mpipar.app.session import train_config
    from mpipar.train.survive import SurvivingDataParallel
    train, test = ecg.data(args)
    faults = fault.resolve(fault.parse(args.inject_fault), world.size, total_steps(len(train.y), args.batch_size, args.epochs, args.steps), distinct=True)
    marks = Path(args.out) / "faults-ulfm"
    if world.rank == 0:
        shutil.rmtree(marks, ignore_errors=True)
    world.barrier()
    log(f"ULFM data parallel on {world.size} ranks | data: {train.note}\n"
        f"faults planned: {', '.join(f'rank {f.rank} at step {f.step}' for f in faults) or 'none'}")
    model = build_full(specs(args), args.seed)
    dp = SurvivingDataParallel(world, model, EXAMPLE.optimizer(model.parameters(), args), EXAMPLE.loss(),
                               train_config(EXAMPLE, args), faults, fault.FaultPlan(faults, marks, world.rank),
                               log=print)
    rows = dp.fit(train)
    summary = {"example": EXAMPLE.name, "ranks": dp.world.size, **rows[-1]}
    if dp.world.rank == 0:
        auc, text = ecg.report_auc(dp.model, test)
        rate = f"{100 * len(dp.lost) / len(faults):.0f}%" if faults else "n/a"
        print(f"ft-autoencoder-ecg: {text}")
        print(f"recovery: {len(faults)} injected fault(s), {len(dp.lost)} dead rank(s) survived without relaunch "
              f"(success rate {rate}); {dp.redone} step(s) redone; finished with {dp.world.size} of {world.size} "
              f"ranks", flush=True)
        summary.update(auc=auc, faults=len(faults), recovered=len(dp.lost))
    return summary


EXAMPLE = Example(
    name="ft-autoencoder-ecg",
    summary="fault-tolerant data-parallel ECG autoencoder (MIT-BIH 100), Adagrad + MSE, AUC-ROC + recovery rate",
    layers=specs,
    data=ecg.data,
    loss=nn.MSELoss,
    optimizer=lambda params, args: torch.optim.Adagrad(params, lr=args.lr),
    task="regression",
    defaults=dict(epochs=20, batch_size=64, lr=0.02, balance="layers"),
    add_args=add_args,
    after_fit=after_fit,
    main=main,
)
