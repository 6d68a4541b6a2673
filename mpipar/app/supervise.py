"""The supervisor: runs the mpirun (or srun) job and, when it died because a rank died (killed
by a signal: an injected fault, the OOM killer, a crashed node), launches it again, up to
--max-restarts times; the ranks resume from the newest good checkpoint. An error a rank
reported itself (a Python exception, a bad flag) is not retried: it would happen again.

    python -m mpipar.run EXAMPLE --supervise --np 4 --checkpoint-dir D [flags]
    python -m mpipar.supervise [--np N] [--max-restarts R] [--launcher mpirun|srun] \\
        [--mpirun-arg=ARG ...] [--restart-on-error] [--] EXAMPLE [flags] | -m MODULE ... | SCRIPT.py ...

Inside a SLURM allocation (SLURM_JOB_ID set) -np defaults to SLURM_NTASKS and mpirun is not
told to oversubscribe; --launcher srun uses `srun --mpi=pmix` instead. mpirun is whichever MPI
this Python uses (mpipar.launcher: Open MPI, MPICH, Intel MPI). Commands are argument
lists, never a shell. Each launch gets MPIPAR_ATTEMPT=0,1,2,... in its environment.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
from collections import deque

from ..launcher import find, srun_command

# Open MPI: "exited on signal 9 (Killed)"; srun: "task 2: Killed"; hydra (MPICH, Intel MPI):
# "EXIT STRING: Killed (signal 9)".
RANK_DEATH = re.compile(r"exited on\s+signal|task \d+: (Killed|Segmentation)"
                        r"|signal \d+ \((Killed|Segmentation fault|Bus error|Aborted)\)"
                        r"|(Killed|Segmentation fault|Bus error) \(signal \d+\)")
REPORTED = re.compile(r"MPI_ABORT was invoked|calling\s+\"abort\"|application called MPI_Abort")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mpipar.supervise", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--np", type=int, default=None, help="ranks (default: SLURM_NTASKS, else 4)")
    p.add_argument("--max-restarts", type=int, default=3)
    p.add_argument("--launcher", choices=["mpirun", "srun"], default="mpirun")
    p.add_argument("--mpirun-arg", action="append", default=[], help="extra launcher argument (repeatable)")
    p.add_argument("--restart-on-error", action="store_true", help="also relaunch after a reported error")
    return p


def launcher_command(np_: int, python_argv: list[str], launcher: str = "mpirun", extra=(), env=None) -> list[str]:
    """The job's command: the MPI's own launcher (oversubscribing outside SLURM) or srun."""
    env = os.environ if env is None else env
    if launcher == "srun":
        return srun_command(np_, python_argv, extra=extra)
    return find(env).command(np_, python_argv, oversubscribe="SLURM_JOB_ID" not in env, extra=extra)


def launch_env(attempt: int) -> dict:
    env = {**os.environ, "MPIPAR_ATTEMPT": str(attempt), "MPIPAR_SUPERVISED": "1"}
    for k, v in find(env).environment(oversubscribed="SLURM_JOB_ID" not in env).items():
        env.setdefault(k, v)   # the user's own settings win
    return env


def rank_died(returncode: int, stderr_text: str) -> bool:
    """The job ended because a process was killed (not because a rank reported an error)."""
    if returncode == 0:
        return False
    if RANK_DEATH.search(stderr_text):
        return True
    if REPORTED.search(stderr_text):   # MPI_Abort from our failure handler: an error, not a death
        return False
    return returncode < 0 or returncode > 128


class Launch:
    """One launch: stdout and stderr pass through (their tails are kept to classify the end:
    hydra reports a killed rank on stdout, Open MPI on stderr); SIGTERM/SIGINT to the
    supervisor go to the whole job and stop the relaunching."""

    def __init__(self, cmd: list[str], env: dict):
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     errors="replace", start_new_session=True)
        self.tail: deque[str] = deque(maxlen=400)
        self.readers = [threading.Thread(target=self._pump, args=(src, dst), daemon=True)
                        for src, dst in ((self.proc.stdout, sys.stdout), (self.proc.stderr, sys.stderr))]
        for r in self.readers:
            r.start()

    def _pump(self, src, dst) -> None:
        for line in src:
            dst.write(line)
            dst.flush()
            self.tail.append(line)

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def wait(self) -> tuple[int, str]:
        rc = self.proc.wait()
        for r in self.readers:
            r.join(timeout=10)
        return rc, "".join(self.tail)


def supervise(python_argv: list[str], np_: int, max_restarts: int, launcher: str = "mpirun", extra=(),
              restart_on_error: bool = False, log=print) -> int:
    if "--checkpoint-dir" not in " ".join(python_argv):
        log("supervisor: note: no --checkpoint-dir given; unless the example sets one (ft-autoencoder-ecg does), "
            "a relaunch starts again from step 0")
    stop = {"sig": None}
    current: dict = {}

    def forward(sig, _frame):
        stop["sig"] = sig
        if current.get("launch"):
            current["launch"].signal(sig)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    failures, attempt, rc = 0, 0, 1
    try:
        while True:
            cmd = launcher_command(np_, python_argv, launcher, extra)
            log(f"supervisor: launch {attempt + 1} (restarts left {max_restarts - attempt}): {' '.join(cmd)}",
                flush=True)
            current["launch"] = Launch(cmd, launch_env(attempt))
            rc, err = current["launch"].wait()
            if rc == 0 or stop["sig"] is not None:
                break
            died = rank_died(rc, err)
            if not died and not restart_on_error:
                log(f"supervisor: the job failed with exit code {rc} (an error a rank reported, not a dead "
                    f"rank): not relaunching")
                break
            failures += 1
            if attempt >= max_restarts:
                log(f"supervisor: the job failed again (exit code {rc}); --max-restarts {max_restarts} used up")
                break
            log(f"supervisor: a rank died (exit code {rc}); relaunching to resume from the last checkpoint")
            attempt += 1
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    recovered = failures if rc == 0 else 0   # a failure is recovered when the job then completes
    rate = f"{100 * recovered / failures:.0f}%" if failures else "n/a"
    log(f"supervisor: launches={attempt + 1} failures={failures} recovered={recovered} "
        f"recovery_rate={rate} exit={rc}", flush=True)
    return rc


def split_argv(argv: list[str]):
    """(supervisor options, python argv): everything after `--`, or after the first word that is
    not an option of ours, is the job's; an example name becomes `-m mpipar.run NAME ...`."""
    if "--" in argv:
        i = argv.index("--")
        opts, rest = parser().parse_args(argv[:i]), argv[i + 1:]
    else:
        opts, rest = parser().parse_known_args(argv)
    if rest and not (rest[0] == "-m" or rest[0].endswith(".py")):
        rest = ["-m", "mpipar.run", *rest]
    return opts, rest


def default_np() -> int:
    return int(os.environ.get("SLURM_NTASKS") or 4)


def supervise_run(argv: list[str]) -> int:
    """`python -m mpipar.run ... --supervise [--np N] [--max-restarts R]` (not under mpirun)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--np", type=int, default=None)
    p.add_argument("--max-restarts", type=int, default=3)
    opts, _ = p.parse_known_args(argv)
    job, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == "--supervise" or a.startswith("--np="):
            continue
        if a == "--np":
            skip = True
            continue
        job.append(a)
    return supervise(["-m", "mpipar.run", *job], opts.np or default_np(), opts.max_restarts)


def main(argv=None) -> int:
    opts, job = split_argv(sys.argv[1:] if argv is None else argv)
    if not job:
        parser().print_help()
        return 2
    return supervise(job, opts.np or default_np(), opts.max_restarts, opts.launcher, opts.mpirun_arg,
                     opts.restart_on_error)


if __name__ == "__main__":
    sys.exit(main())
