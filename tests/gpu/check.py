"""The GPU check (issue #16), driven by tests/gpu/check.sh: each parallel mode on ranks sharing
one GPU, its training-loss curve against single-process training of the same model and seed on
the same GPU (`--compare`), the same run on CPU beside it for scale; then the device-tensor
benchmark. One summary line per check, exit 1 if any failed.

    python tests/gpu/check.py [--device cuda|cpu] [--only NAME,...]

A check passes when the largest per-epoch train-loss gap to single-process training on the device
is at most max(10 x the gap the same run shows on CPU, 1e-4): a GPU does not round like a CPU
(other kernels, fp16 autocast) but must not be further from its own reference than that.
`--device cpu` runs everything on CPU (how CI tests this script).
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

ROOT = Path(__file__).resolve().parents[2]
GAP = re.compile(r"largest train-loss gap to single process: ([0-9.e+-]+|nan)")

GPT = ["--epochs", "2", "--steps", "5", "--val-windows", "64", "--sample-chars", "20", "--log-every", "0"]
CHECKS = [   # name, ranks, argv (short runs: parity needs steps, not epochs)
    ("mlp", 2, ["mlp", "--schedule", "1f1b", "--microbatches", "4", "--epochs", "2", "--steps", "10"]),
    ("pipeline-cifar", 4, ["pipeline-cifar", "--schedule", "1f1b", "--microbatches", "8", "--balance", "layers",
                           "--epochs", "1", "--steps", "10"]),
    ("dp-cifar", 2, ["dp-cifar", "--epochs", "1", "--steps", "10"]),
    ("tp-mlp", 2, ["tp-mlp", "--grid", "pp=1,dp=1,tp=2", "--epochs", "1", "--steps", "10"]),
    ("transformer-split", 2, ["transformer-split", "--amp", "fp16", "--schedule", "1f1b", "--microbatches", "4",
                              "--balance", "layers", "--epochs", "1", "--steps", "10"]),
    # a user's GPT nn.Module (tied head) cut by Pipeline's trace: nanoGPT's CPU size, 10 steps
    ("gpt-pp2", 2, ["gpt-shakespeare", *GPT, "--grid", "pp=2"]),
    ("gpt-pp2xdp2", 4, ["gpt-shakespeare", *GPT, "--grid", "pp=2,dp=2"]),
]


def run(np_: int, argv: list[str], timeout: float) -> tuple[int, str, float]:
    cmd = [sys.executable, "-m", "mpipar.launcher", "--np", str(np_), "--", *argv]
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout + p.stderr, time.monotonic() - t0
    except subprocess.TimeoutExpired as e:
        return 124, f"{e.stdout or ''}{e.stderr or ''}\ntimed out after {timeout:.0f} s", time.monotonic() - t0


def gap_of(out: str) -> float | None:
    m = GAP.search(out)
    return float(m.group(1)) if m else None


def last_line(out: str) -> str:
    lines = [ln for ln in out.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"rank \d+ \(", ln.strip())]
    return (errors or lines or ["(no output)"])[-1].strip()[:300]


def parity(name: str, np_: int, argv: list[str], device: str, tmp: Path, timeout: float) -> bool:
    gaps, seconds = {}, 0.0
    for dev in dict.fromkeys([device, "cpu"]):
        rc, out, sec = run(np_, ["-m", "mpipar.run", *argv, "--device", dev, "--compare", "--out", str(tmp / f"{name}-{dev}")], timeout)
        seconds += sec
        gaps[dev] = gap_of(out) if rc == 0 else None
        if gaps[dev] is None:
            print(f"check {name} ({np_} ranks, {dev}): FAIL exit {rc}: {last_line(out)}", flush=True)
            return False
    tol = max(10 * gaps["cpu"], 1e-4)
    ok = gaps[device] <= tol
    print(f"check {name} ({np_} ranks on one {device}): {'PASS' if ok else 'FAIL'} train-loss gap to single "
          f"process {gaps[device]:.2e} on {device} vs {gaps['cpu']:.2e} on cpu (tolerance {tol:.1e}), "
          f"{seconds:.0f} s", flush=True)
    return ok


def bench(device: str, timeout: float) -> bool:
    rc, out, sec = run(2, ["-m", "mpipar.bench", "device", "--device", device, "--sizes", "64K,1M,16M",
                           "--rounds", "3"], timeout)
    table = [ln for ln in out.splitlines() if ln.startswith(("bench device", "    size")) or re.match(r"\s*[0-9.]+M ", ln)]
    print("\n".join(table), flush=True)
    print(f"check bench device (2 ranks): {'PASS' if rc == 0 else 'FAIL exit %d: %s' % (rc, last_line(out))}, "
          f"{sec:.0f} s", flush=True)
    return rc == 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--only", default=None, help="comma-separated check names (and 'bench')")
    p.add_argument("--timeout", type=float, default=150, help="seconds per run")
    args = p.parse_args()
    only = set(args.only.split(",")) if args.only else None
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    t0, results = time.monotonic(), []
    with tempfile.TemporaryDirectory(prefix="mpipar-gpu-") as tmp:
        for name, np_, argv in CHECKS:
            if only is None or name in only:
                results.append(parity(name, np_, argv, args.device, Path(tmp), args.timeout))
        if only is None or "bench" in only:
            results.append(bench(args.device, args.timeout))
    print(f"gpu check: {sum(results)} of {len(results)} passed in {time.monotonic() - t0:.0f} s on {args.device}")
    return 0 if results and all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
