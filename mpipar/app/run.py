"""`python -m mpipar.run EXAMPLE [flags]` under mpirun: sets up the World, failure handling,
rank map and banner, then hands the example to the shared trainer."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from . import registry
from ..errors import ConfigError


def shared_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mpipar.run", description=__doc__)
    p.add_argument("example", nargs="?", help="example name (see --list) or path to a .py file defining EXAMPLE")
    p.add_argument("--list", action="store_true", help="list the examples and exit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64, help="global batch size")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"],
                   help="where each rank trains: cuda = GPU (local rank %% GPUs on its host), auto = cuda when "
                        "there is one, else cpu")
    p.add_argument("--steps", type=int, default=0, help="stop each epoch after this many steps (0: all)")
    p.add_argument("--data-dir", default=None, help="full dataset location (default: the copy shipped in examples/data)")
    p.add_argument("--out", default=None, help="output dir for metrics and plots (default runs/EXAMPLE)")
    p.add_argument("--grid", default=None, help="pp=P,dp=D,tp=T (default: pp = number of ranks)")
    p.add_argument("--balance", default="time", help="layers per stage: time | params | layers | 3,3,2,2 | "
                   "FILE.json (default time: the slowest stage as fast as it can be, from each layer's "
                   "forward+backward time measured on a micro-batch, cached; see --stage-memory-mb)")
    p.add_argument("--stage-memory-mb", type=float, default=None,
                   help="--balance time: no stage may need more than this (parameters, gradients, "
                        "optimizer state and the activations its schedule keeps in flight)")
    p.add_argument("--schedule", default="gpipe", help="pipeline schedule: gpipe | 1f1b | eager-1f1b | interleaved | zb | pipedream")
    p.add_argument("--microbatches", type=int, default=1, help="micro-batches per global batch")
    p.add_argument("--chunks", type=int, default=None, help="model chunks per rank (interleaved; default 2)")
    p.add_argument("--recompute", nargs="?", const="all", default=None, metavar="STAGES",
                   help="recompute activations in backward instead of storing them: all stages, or e.g. 0,1")
    p.add_argument("--timeline", default=None, help="PATH: write PATH.json (Chrome/Perfetto trace) and PATH.png (Gantt)")
    p.add_argument("--clip-grad", type=float, default=0.0, help="clip by the global norm over all stages (0: off)")
    p.add_argument("--on-nonfinite", default="stop", choices=["stop", "skip"],
                   help="a step whose loss or gradients hold inf/NaN on any rank: stop the job (default), or "
                        "skip the step on every rank (see --nonfinite-limit); never applied, never checkpointed")
    p.add_argument("--nonfinite-limit", type=int, default=3,
                   help="with --on-nonfinite skip: this many such steps in a row stop the job (default 3)")
    p.add_argument("--plot", action="store_true", help="write dashboard.png: loss, throughput and communication per rank")
    p.add_argument("--live", action="store_true", help="refresh dashboard.png/.html in --out after every epoch")
    p.add_argument("--compare", action="store_true", help="also train single-process; overlay curves in a PNG")
    p.add_argument("--wait", default="auto", choices=["auto", "spin", "poll"],
                   help="how ranks wait for messages: poll (sleep between tests) frees the core on "
                        "oversubscribed hosts; auto = poll when ranks on this host exceed its cores")
    p.add_argument("--stall-timeout", type=float, default=120.0, help="abort when a rank waits longer (s; 0: off)")
    p.add_argument("--log-level", default="info", choices=["quiet", "info", "debug"])
    p.add_argument("--save-params", default=None, help="dir: stageS.pt per stage, rankR.pt per rank (every replica; parity checks)")
    p.add_argument("--inject-error", default=None, help="rank=R,step=S: raise on that rank at that step (tests)")
    # checkpoint/restart and fault tolerance (mpipar/checkpoint)
    p.add_argument("--checkpoint-dir", default=None, help="per-rank shards + manifest here; resume from the newest good one")
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints (default: auto, ~2%% of step time)")
    p.add_argument("--keep", type=int, default=None, help="complete checkpoints to keep (default 3)")
    p.add_argument("--restart-from-scratch", action="store_true",
                   help="every checkpoint in --checkpoint-dir rejected (they are quarantined): train from step 0 "
                        "instead of stopping")
    p.add_argument("--async-checkpoint", action="store_true", help="copy the state, write it in a background thread")
    p.add_argument("--inject-fault", default=None, help="rank=R,step=S | random=SEED[,count=K] [,phase=write]: SIGKILL a rank")
    p.add_argument("--supervise", action="store_true", help="(no mpirun) launch mpirun and relaunch it when a rank dies")
    p.add_argument("--max-restarts", type=int, default=3, help="with --supervise: relaunches allowed")
    p.add_argument("--np", type=int, default=None, help="with --supervise: ranks (default: SLURM_NTASKS or 4)")
    add_dp_args(p)
    return p


def add_dp_args(p: argparse.ArgumentParser) -> None:
    """Data-parallel flags (--bucket-mb, --allreduce, --dp-check-every)."""
    from ..data_parallel.buckets import DEFAULT_BUCKET_MB
    p.add_argument("--bucket-mb", type=float, default=DEFAULT_BUCKET_MB,
                   help=f"data parallel: gradient bucket size in MiB (default {DEFAULT_BUCKET_MB:g}, "
                        f"see python -m mpipar.bench allreduce --overlap)")
    p.add_argument("--allreduce", default="auto", choices=["auto", "ring", "halving", "doubling", "shm", "hier"],
                   help="data parallel: all-reduce algorithm (default auto: by size and placement; "
                        "shm when the dp group shares one host, hier when it spans hosts with "
                        "several ranks on some host)")
    p.add_argument("--grad-compress", default=None, choices=["none", "bf16", "fp16"],
                   help="data parallel: float32 gradients cross hosts as this 16-bit type, summed in "
                        "float32 (default none; within a host nothing is cast)")
    p.add_argument("--zero", type=int, default=0, choices=[0, 1, 2, 3],
                   help="data parallel: 1 = ZeRO stage 1, the optimizer state sharded over the replicas "
                        "(gradients reduce-scattered, parameters all-gathered); 2 = also the gradients "
                        "(reduced per bucket during backward, each replica keeping its part); 3 = also the parameters "
                        "(each layer all-gathered for its forward and its backward, freed after); 0 = replicated (default)")
    p.add_argument("--dp-check-every", type=int, default=0,
                   help="data parallel: every N steps check replicas are bit-identical (0: never)")


def parse(argv):
    first, _ = shared_parser().parse_known_args(argv)
    if first.list:
        return first, None
    if not first.example:
        raise ConfigError("no example given; usage: python -m mpipar.run EXAMPLE [flags] (--list shows them)")
    example = registry.load(first.example)
    p = shared_parser()
    if example.add_args:
        example.add_args(p)
    p.set_defaults(**example.defaults)
    args = p.parse_args(argv)
    args.out = args.out or str(Path("runs") / example.name)
    # parsed once, here: from now on args.schedule is a schedules.Schedule (aliases resolved, its
    # --chunks inside; str() is its name) and args.balance a rankmap.Balance
    from ..pipeline.schedules import get as get_schedule
    from ..rankmap import Balance
    args.schedule = get_schedule(args.schedule, args.chunks)
    args.balance = Balance.parse(args.balance)
    check_numbers(args)
    return args, example


# the numeric flags a value outside [least, inf) or not finite would break silently (-5 steps
# between checkpoints, a watchdog off at -1, NaN weights from --lr nan); None: the flag's default
# says what leaving it out means
LEAST = {"lr": 0.0, "clip_grad": 0.0, "stall_timeout": 0.0, "checkpoint_every": 1, "keep": 1, "max_restarts": 0,
         "np": 1, "nonfinite_limit": 1, "dp_check_every": 0, "bucket_mb": None, "stage_memory_mb": None}
MEANS = {"clip_grad": " (0: no clipping)", "stall_timeout": " (0: no watchdog)", "dp_check_every": " (0: never)",
         "checkpoint_every": " (leave it out: an interval measured from the run)"}


def check_numbers(args) -> None:
    """Refuse, naming the flag, a number it cannot take: below its least value, or NaN/inf."""
    for name, least in LEAST.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if least is None:       # a size: positive
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{flag} {value}: must be a finite number > 0")
        elif not (math.isfinite(value) and value >= least):
            kind = "an integer" if isinstance(least, int) else "a finite number"
            raise ConfigError(f"{flag} {value}: must be {kind} >= {least:g}{MEANS.get(name, '')}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--list" in argv:
        for name, doc in registry.summaries():
            print(f"{name:<28} {doc}")
        return 0
    if "--supervise" in argv:   # relaunch-on-failure wrapper; the ranks run without the flag
        from .supervise import supervise_run
        return supervise_run(argv)
    from ..comm import World
    from ..comm import failure
    world = World()
    failure.install(world.host, debug="debug" in argv)
    import os
    if world.size == 1 and int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        raise ConfigError(f"srun started {os.environ['SLURM_STEP_NUM_TASKS']} separate 1-rank jobs: "
                          f"launch with `srun --mpi=pmix` or mpirun inside the allocation")
    args, example = parse(argv)
    failure.start_watchdog(args.stall_timeout, world.host)
    from .session import run_example
    run_example(world, example, args)
    from ..comm.world import finalize
    finalize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
