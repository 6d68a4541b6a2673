"""Checkpoint/restart benchmark (run WITHOUT mpirun: it launches the jobs itself).

    python -m mpipar.bench checkpoint --faults 20 [--np 4] [--example mlp] [--seed 1000]
    python -m mpipar.bench checkpoint --overhead [--np 4] [--epochs 20]

--faults N: one fault-free run, then N supervised runs in which a random rank SIGKILLs itself
at a random step (seeded; every other run dies in the middle of an async checkpoint write);
each must finish with final parameters bit-equal to the fault-free run.
--overhead: ft-autoencoder-ecg with checkpoints at the default interval; the checkpointer's
blocking time as a share of the training-step time, measured inside the run (and the same run
without checkpoints, end to end, for comparison).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..launcher import find

ROOT = Path(__file__).resolve().parents[2]


def run(cmd: list[str], timeout: float = 1800) -> tuple[int, str, str]:
    env = {**os.environ, **find().environment(oversubscribed=True), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def params(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("stage*.pt")):
        out.update(torch.load(f, weights_only=True))
    return out


def bit_equal(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def job(opts, tmp: Path, *flags) -> list[str]:
    return ["-m", "mpipar.run", opts.example, "--epochs", str(opts.epochs), "--steps", str(opts.steps),
            "--checkpoint-every", str(opts.every), "--checkpoint-dir", str(tmp / "ckpt"), "--out", str(tmp / "out"),
            "--save-params", str(tmp / "params"), "--log-level", "info", *opts.extra, *flags]


def faults(opts) -> int:
    from ..app.supervise import launcher_command
    with tempfile.TemporaryDirectory(prefix="mpipar-bench-ckpt-") as d:
        base = Path(d) / "fault-free"
        rc, out, err = run(launcher_command(opts.np, job(opts, base)))
        if rc:
            print(out[-2000:], err[-2000:])
            return 1
        reference = params(base / "params")
        print(f"fault-free run: {opts.example} on {opts.np} ranks, {opts.epochs} epochs x {opts.steps} steps, "
              f"checkpoint every {opts.every} steps ({len(reference)} tensors)")
        print(f"{'run':>3} {'fault':<34} {'launches':>8} {'resumed from':>13} {'seconds':>7}  bit-equal")
        ok = recovered = 0
        for i in range(opts.faults):
            seed = opts.seed + i
            flags = (["--inject-fault", f"random={seed}"] if i % 2 == 0 else
                     ["--inject-fault", f"random={seed},phase=write", "--async-checkpoint"])
            tmp = Path(d) / f"run{i}"
            t0 = time.perf_counter()
            rc, out, err = run([sys.executable, "-m", "mpipar.app.supervise", "--np", str(opts.np),
                                "--max-restarts", "3", "--", *job(opts, tmp, *flags)])
            dt = time.perf_counter() - t0
            died = re.search(r"rank (\d+): injected fault 0: SIGKILL at step (\d+) \(phase (\w+)", err)
            resumed = re.search(r"resumed from step-0*(\d+)", out)
            launches = re.search(r"launches=(\d+)", out)
            same = rc == 0 and bit_equal(params(tmp / "params"), reference)
            ok += same
            recovered += rc == 0 and bool(died)
            what = f"rank {died.group(1)} SIGKILL step {died.group(2)} ({died.group(3)})" if died else "none fired"
            print(f"{i:>3} {what:<34} {launches.group(1) if launches else '?':>8} "
                  f"{('step ' + resumed.group(1)) if resumed else 'step 0':>13} {dt:>7.1f}  {'yes' if same else 'NO'}",
                  flush=True)
            if rc:
                print(out[-1500:], err[-1500:])
        print(f"\n{ok}/{opts.faults} runs bit-equal to the fault-free run; {recovered}/{opts.faults} killed runs "
              f"recovered by the supervisor")
        return 0 if ok == opts.faults else 1


def overhead(opts) -> int:
    from ..app.supervise import launcher_command
    with tempfile.TemporaryDirectory(prefix="mpipar-bench-ckpt-") as d:
        common = ["-m", "mpipar.run", "ft-autoencoder-ecg", "--epochs", str(opts.epochs), *opts.extra]
        rc, out, err = run(launcher_command(opts.np, [*common, "--checkpoint-dir", f"{d}/ckpt", "--out", f"{d}/a"]))
        line = re.search(r"checkpoint: (\d+) saves .*", out)
        speed = re.search(r"([\d.]+) samples/s; total params", out)
        if rc or not line:
            print(out[-2000:], err[-2000:])
            return 1
        print(f"ft-autoencoder-ecg on {opts.np} ranks, {opts.epochs} epochs, default interval:\n  {line.group(0)}")
        print(f"  with checkpoints: {speed.group(1)} samples/s (last epoch)")
        if opts.async_too:
            rc, out, _ = run(launcher_command(opts.np, [*common, "--checkpoint-dir", f"{d}/ckpt2", "--out",
                                                         f"{d}/b", "--async-checkpoint"]))
            found = re.search(r"checkpoint: (\d+) saves .*", out)
            print(f"  async: {found.group(0) if found else out[-500:]}")
        return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mpipar.bench checkpoint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--faults", type=int, default=0, help="runs with a killed rank (the acceptance figure: 20)")
    p.add_argument("--overhead", action="store_true")
    p.add_argument("--async-too", action="store_true", help="--overhead: also measure async writes")
    p.add_argument("--np", type=int, default=4)
    p.add_argument("--example", default="mlp")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--seed", type=int, default=1000)
    opts, opts.extra = p.parse_known_args(argv)
    if not opts.faults and not opts.overhead:
        p.print_help()
        return 2
    rc = faults(opts) if opts.faults else 0
    if opts.overhead:
        if opts.epochs == 2:
            opts.epochs = 20
        rc |= overhead(opts)
    return rc
