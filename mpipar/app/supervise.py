"""The supervisor: runs the mpirun (or srun) job and launches it again, up to --max-restarts
times, when it ended for a reason that a relaunch can fix: a rank killed by a signal (an injected
fault, the OOM killer, a crashed node), a rank that reported a stall (a cut link, a lost host), a
launcher that lost a host, or a preemption (exit PREEMPTED_EXIT after a checkpoint). The ranks
resume from the newest good checkpoint. An error a rank reported itself (a Python exception, a bad
flag) is not retried: it would happen again.

    python -m mpipar.run EXAMPLE --supervise --np 4 --checkpoint-dir D [flags]
    python -m mpipar.supervise [--np N] [--max-restarts R] [--launcher mpirun|srun] \\
        [--mpirun-arg=ARG ...] [--restart-on-error] [--] EXAMPLE [flags] | -m MODULE ... | SCRIPT.py ...

A job never ends "successfully" after a fault: once a rank has reported an error or a stall (its
one line), or the launcher has lost a host, the supervisor ends the launcher if it is still up
HUNG_AFTER seconds later (Open MPI's mpirun waits on an unreachable host until TCP gives up,
~15 minutes, and then exits 0), and that is a failure whatever the exit code; so is an exit 0
after which some ranks, but not all, left a "done" marker (written at a clean exit into
$MPIPAR_DONE_DIR, mpipar.comm.mpi.mark_done).

SIGTERM or SIGUSR1 to the supervisor (SLURM's warning signal: `#SBATCH --signal=B:USR1@120`) is
a preemption: the job's launcher gets SIGUSR1 and passes it to every rank, which write a
checkpoint and exit PREEMPTED_EXIT; the supervisor then exits with that code and one line (the
sbatch scripts requeue). SIGINT stops the job as before. Open MPI's mpirun is started with
SIGTERM blocked: on a SIGTERM it would kill the ranks 0.25 s later, too soon to finish a step,
and SLURM's time limit (or a preemption without --signal) sends SIGTERM to every process of the
job at once, the supervisor, mpirun and the ranks; so the ranks on mpirun's host save and exit
PREEMPTED_EXIT (Open MPI's daemons on other hosts are started by srun or ssh, not by us, and
still end theirs: there the warning signal is the answer). The supervisor ends that mpirun with
SIGINT. MPICH's mpiexec forwards SIGTERM and waits for the ranks: left as it is.

Inside a SLURM allocation (SLURM_JOB_ID set) -np defaults to SLURM_NTASKS and mpirun is not
told to oversubscribe; --launcher srun uses `srun --mpi=pmix` instead. mpirun is whichever MPI
this Python uses (mpipar.launcher: Open MPI, MPICH, Intel MPI). Commands are argument
lists, never a shell. Each launch gets MPIPAR_ATTEMPT=0,1,2,... in its environment.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

from ..launcher import find, srun_command
from ..train.survive import PREEMPTED_EXIT   # a preempted job's exit code (its checkpoint is written)

HUNG_AFTER = 10.0      # s a launcher may stay up after a rank reported an error before it is ended
KILL_GRACE = 5.0       # s between SIGTERM and SIGKILL when ending a launcher

# Open MPI: "exited on signal 9 (Killed)"; srun: "task 2: Killed"; hydra (MPICH, Intel MPI):
# "EXIT STRING: Killed (signal 9)".
RANK_DEATH = re.compile(r"exited on\s+signal|task \d+: (Killed|Segmentation)"
                        r"|signal \d+ \((Killed|Segmentation fault|Bus error|Aborted)\)"
                        r"|(Killed|Segmentation fault|Bus error) \(signal \d+\)")
REPORTED = re.compile(r"MPI_ABORT was invoked|calling\s+\"abort\"|application called MPI_Abort")
# A rank's one-line report (mpipar.comm.failure): `rank R (host...): [file.py:N: ]Type: message`
RANK_REPORT = re.compile(r"^rank -?\d+ \([^)]*\): .*?\b\w*(?:Error|Exception|Interrupt)\b: ")
# The launcher lost a host, or could not start on one (Open MPI's PRTE)
HOST_LOST = re.compile(r"has lost communication with a remote daemon|A daemon failed to report back"
                       r"|unable to reliably start one or more daemons")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mpipar.supervise", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--np", type=int, default=None, help="ranks (default: SLURM_NTASKS, else 4)")
    p.add_argument("--max-restarts", type=int, default=3)
    p.add_argument("--launcher", choices=["mpirun", "srun"], default="mpirun")
    p.add_argument("--mpirun-arg", action="append", default=[], help="extra launcher argument (repeatable)")
    p.add_argument("--restart-on-error", action="store_true", help="also relaunch after a reported error")
    return p


# What the ranks must see on every host; Open MPI's mpirun passes on only what -x names.
FORWARDED = ("MPIPAR_ATTEMPT", "MPIPAR_SUPERVISED", "MPIPAR_DONE_DIR")


def launcher_command(np_: int, python_argv: list[str], launcher: str = "mpirun", extra=(), env=None) -> list[str]:
    """The job's command: the MPI's own launcher (oversubscribing outside SLURM) or srun."""
    env = os.environ if env is None else env
    if launcher == "srun":
        return srun_command(np_, python_argv, extra=extra)
    mpi = find(env)
    if mpi.kind == "openmpi":
        extra = [*(a for name in FORWARDED for a in ("-x", name)), *extra]
    return mpi.command(np_, python_argv, oversubscribe="SLURM_JOB_ID" not in env, extra=extra)


def shields_term(launcher: str, env=None) -> bool:
    """Whether the job's launcher is started with SIGTERM blocked: Open MPI's mpirun (above)."""
    return launcher == "mpirun" and find(os.environ if env is None else env).kind == "openmpi"


def launch_env(attempt: int, done_dir: str = "") -> dict:
    env = {**os.environ, "MPIPAR_ATTEMPT": str(attempt), "MPIPAR_SUPERVISED": "1", "MPIPAR_DONE_DIR": done_dir}
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


def proc_stat(pid) -> list[str] | None:
    """/proc/PID/stat after the command name: state, ppid, pgrp, session, ...; None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def job_pids(launcher_pid: int) -> list[int]:
    """The launcher and what it started on this host: its descendants and the rest of its
    session (Open MPI's ranks run in it, each in a process group of its own; hydra's ranks in
    sessions of their own, under its proxy), from /proc; [] where there is none."""
    parent, session = {}, {}
    for d in Path("/proc").glob("[0-9]*"):
        fields = proc_stat(d.name)
        if fields:
            parent[int(d.name)], session[int(d.name)] = int(fields[1]), int(fields[3])
    out = {p for p, sid in session.items() if sid == launcher_pid} | ({launcher_pid} & parent.keys())
    while more := {p for p, pp in parent.items() if pp in out} - out:
        out |= more
    return sorted(out)


def alive(pid: int) -> bool:
    """Running (not ended, not a zombie waiting to be reaped)."""
    fields = proc_stat(pid)
    return fields is not None and fields[0] != "Z"


class Launch:
    """One launch: stdout and stderr pass through (their tails are kept to classify the end:
    hydra reports a killed rank on stdout, Open MPI on stderr), and the first line that says the
    job has failed (a rank's report, the launcher's lost host) is noted with its time. `shield`:
    the launcher starts with SIGTERM blocked (shields_term) and is ended with SIGINT."""

    def __init__(self, cmd: list[str], env: dict, shield: bool = False):
        self.stop_signal = signal.SIGINT if shield else signal.SIGTERM
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM}) if shield else None
        try:   # the child inherits this thread's mask
            self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                         errors="replace", start_new_session=True)
        finally:
            if mask is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self.tail: deque[str] = deque(maxlen=400)
        self.failed: tuple[float, str] | None = None     # (monotonic time, line)
        self.ended = False                                # the supervisor ended it
        self.readers = [threading.Thread(target=self._pump, args=(src, dst), daemon=True)
                        for src, dst in ((self.proc.stdout, sys.stdout), (self.proc.stderr, sys.stderr))]
        for r in self.readers:
            r.start()

    def _pump(self, src, dst) -> None:
        for line in src:
            dst.write(line)
            dst.flush()
            self.tail.append(line)
            if self.failed is None and (RANK_REPORT.search(line) or HOST_LOST.search(line)):
                self.failed = (time.monotonic(), " ".join(line.split())[:300])

    def signal(self, sig: int) -> None:
        """To the launcher (it passes SIGUSR1 on to every rank, and ends them on SIGTERM/SIGINT)."""
        try:
            os.kill(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def end(self) -> None:
        """SIGTERM (the launcher: its stop signal), then SIGKILL, to the launcher and every
        process it started on this host."""
        self.ended = True
        pids = set(job_pids(self.proc.pid)) | {self.proc.pid}
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in sorted(pids):
                try:
                    os.kill(pid, self.stop_signal if sig == signal.SIGTERM and pid == self.proc.pid else sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + KILL_GRACE
            while time.monotonic() < deadline and not self.gone(pids):
                time.sleep(0.1)
            if self.gone(pids):
                return

    def gone(self, pids: set[int]) -> bool:
        self.proc.poll()   # reaps the launcher
        return not any(alive(p) for p in pids)

    def hung(self) -> bool:
        """A rank reported a failure (or the launcher lost a host) HUNG_AFTER seconds ago and the
        launcher is still up."""
        return self.failed is not None and not self.ended and time.monotonic() - self.failed[0] > HUNG_AFTER

    def poll(self, seconds: float) -> int | None:
        try:
            rc = self.proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            return None
        for r in self.readers:
            r.join(timeout=10)
        return rc

    def text(self) -> str:
        return "".join(self.tail)


def verdict(rc: int, launch: Launch, done: list[str] | None, np_: int) -> tuple[str, str]:
    """(kind, what happened): kind is ok, preempted, died, stalled, lost or error."""
    text, failed = launch.text(), launch.failed[1] if launch.failed else ""
    if rc == PREEMPTED_EXIT and not failed:
        return "preempted", f"the job was preempted (exit {rc}: it wrote a checkpoint and stopped)"
    if "StallError" in failed:
        return "stalled", f"a rank stalled ({failed}): a lost link or host"
    if HOST_LOST.search(failed):
        return "lost", f"the launcher lost a host ({failed}; exit code {rc})"
    if rank_died(rc, text):
        return "died", f"a rank died (exit code {rc})"
    if failed:
        return "error", f"the job failed with exit code {rc} (an error a rank reported, not a dead rank: {failed})"
    if rc != 0:
        return "error", f"the job failed with exit code {rc} (an error a rank reported, not a dead rank)"
    if done is not None and 0 < len(done) < np_ and "survived" not in done:
        return "lost", (f"the launcher exited 0 but only {len(done)} of {np_} ranks finished (a host was lost)")
    return "ok", "the job completed"


def done_markers(folder: str) -> list[str] | None:
    """What the ranks wrote in the launch's done folder (None: no folder)."""
    if not folder:
        return None
    out = []
    for f in Path(folder).glob("rank-*"):
        try:
            out.append(f.read_text().strip())
        except OSError:
            pass
    return out


def new_done_dir() -> str:
    """A fresh folder for this launch's done markers, where every host sees it: under
    $MPIPAR_DONE_DIR if set (set it empty to turn the check off), else in the working directory
    (as the checkpoints are)."""
    base = os.environ.get("MPIPAR_DONE_DIR", os.getcwd())
    if not base:
        return ""
    try:
        return tempfile.mkdtemp(prefix=".mpipar-done-", dir=base)
    except OSError:
        return ""


def exit_code(rc: int) -> int:
    """A launcher killed by signal N exits as a shell reports it: 128 + N."""
    return 128 - rc if rc < 0 else rc


def say(*words, **kw) -> None:
    print(*words, **{**kw, "flush": True})   # the supervisor's lines interleave with the job's


def supervise(python_argv: list[str], np_: int, max_restarts: int, launcher: str = "mpirun", extra=(),
              restart_on_error: bool = False, log=say) -> int:
    if "--checkpoint-dir" not in " ".join(python_argv):
        log("supervisor: note: no --checkpoint-dir given; unless the example sets one (ft-autoencoder-ecg does), "
            "a relaunch starts again from step 0")
    signals: list[int] = []   # received, in order; handled by the waiting loop (not in the handler)
    old = {s: signal.signal(s, lambda sig, _f: signals.append(sig))
           for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    failures, attempt, rc = 0, 0, 1
    try:
        while True:
            cmd = launcher_command(np_, python_argv, launcher, extra)
            log(f"supervisor: launch {attempt + 1} (restarts left {max_restarts - attempt}): {' '.join(cmd)}")
            done_dir = new_done_dir()
            launch, handled = Launch(cmd, launch_env(attempt, done_dir), shields_term(launcher)), 0
            while (rc := launch.poll(0.25)) is None:
                while handled < len(signals):
                    forward(launch, signals[:handled + 1], log)
                    handled += 1
                if launch.hung():
                    log(f"supervisor: the job is still up {HUNG_AFTER:.0f} s after '{launch.failed[1]}' (its launcher "
                        f"waits on a host it cannot reach): ending it")
                    launch.end()
            done = done_markers(done_dir)
            kind, what = verdict(rc, launch, done, np_)
            if kind == "ok" and done == []:
                log(f"supervisor: note: no rank left a done marker in {done_dir} (not an mpipar job, or a folder "
                    f"the hosts do not share: set MPIPAR_DONE_DIR to one); its exit 0 is trusted")
            rc = 0 if kind == "ok" else (exit_code(rc) or 1)   # a fault never ends as 0
            if done_dir:
                shutil.rmtree(done_dir, ignore_errors=True)
            if signals:   # stopped from outside: no relaunch
                name = signal.Signals(signals[0]).name
                log(f"supervisor: preempted ({name}): the job wrote a checkpoint and stopped; exit {rc}: launch it "
                    f"again (SLURM: requeue) to resume" if kind == "preempted" else f"supervisor: stopped ({name}): "
                    f"{what}")
                break
            if kind == "ok":
                break
            if kind == "error" and not restart_on_error:
                log(f"supervisor: {what}: not relaunching")
                break
            failures += kind != "preempted"
            if attempt >= max_restarts:
                log(f"supervisor: {what}; --max-restarts {max_restarts} used up")
                break
            log(f"supervisor: {what}; relaunching to resume from the last checkpoint")
            attempt += 1
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    recovered = failures if rc == 0 else 0   # a failure is recovered when the job then completes
    rate = f"{100 * recovered / failures:.0f}%" if failures else "n/a"
    log(f"supervisor: launches={attempt + 1} failures={failures} recovered={recovered} "
        f"recovery_rate={rate} exit={rc}")
    return rc


def forward(launch: Launch, received: list[int], log) -> None:
    """The supervisor got received[-1]. SIGINT: to the launcher, which ends the job. The first
    SIGTERM/SIGUSR1: SIGUSR1 to the launcher, which passes it on to every rank (SIGTERM would make
    Open MPI's end them): they write a checkpoint and exit PREEMPTED_EXIT. Later ones add nothing (under
    SLURM one preemption can arrive twice: SIGTERM to every process of the job, and the batch
    shell's USR1); SLURM kills what is left after its KillWait, SIGINT at once."""
    sig = received[-1]
    if sig == signal.SIGINT:
        launch.signal(sig)
    elif not any(s != signal.SIGINT for s in received[:-1]):
        log(f"supervisor: {signal.Signals(sig).name}: asking the job to write a checkpoint and stop "
            f"(SIGUSR1 to every rank)")
        launch.signal(signal.SIGUSR1)


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
