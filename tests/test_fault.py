"""Killed ranks, end to end: the supervisor relaunches the job after a rank SIGKILLs itself at
a random (seeded) step (under ZeRO stage 3), or in the middle of an async checkpoint write, and
the final parameters are bit-equal to the fault-free run's; an error a rank reports is not
retried; with ULFM, a dead rank is survived without any relaunch. Then, in one process: the fault
flags and the supervisor's decisions and commands."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from mpipar.checkpoint import fault
from mpipar.app.supervise import RANK_DEATH, launcher_command, rank_died, split_argv
from mpipar.errors import ConfigError
from mpirun import ENV, KIND, MPI_DIR, MPIEXEC, ROOT, kill_group, mpirun

torch.set_num_threads(1)
ARGV = ["mlp", "--epochs", "2", "--steps", "12", "--checkpoint-every", "5", "--log-level", "info"]


def params(folder):
    out = {}
    for f in sorted(folder.glob("stage*.pt")):
        out.update(torch.load(f, weights_only=True))
    return out


def run(cmd, timeout, env=None):
    env = {**os.environ, **ENV, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(cmd)} hung for {timeout} s\n{out[-3000:]}\n{err[-3000:]}") from None
    return proc.returncode, out, err


def supervised(tmp, *flags, np=4, timeout=300):
    """launch/supervise, as a user runs it, with this Python's venv (and so its MPI)."""
    return run(["bash", "launch/supervise", "--np", str(np), "--max-restarts", "2", "--",
                "-m", "mpipar.run", *ARGV, "--checkpoint-dir", str(tmp / "ckpt"), "--out", str(tmp / "out"),
                "--save-params", str(tmp / "params"), *flags], timeout, env={"MPIPAR_VENV": sys.prefix})


# ZeRO stage 3: parameters, gradients and Adam's state sharded over the replicas (pp=2 x dp=2);
# its checkpoint gathers the parameters on save, each replica keeps its segments on load
ZERO3 = ["--zero", "3", "--grid", "pp=2,dp=2", "--balance", "4,4", "--microbatches", "2"]
FAULTS = {   # id: (the job's flags, the fault; whether it must resume from a checkpoint, not step 0)
    "killed-at-a-step-zero3": (ZERO3, ["--inject-fault", "random=13"], True),
    "killed-mid-write-async": ([], ["--inject-fault", "random=12,phase=write", "--async-checkpoint"], False),
}


@pytest.fixture(scope="module")
def fault_free(tmp_path_factory):
    """Each job of FAULTS without its fault: {id: final parameters}, all run in turn in ONE job."""
    d = tmp_path_factory.mktemp("fault_free")
    lines = [json.dumps([*ARGV, *flags, "--checkpoint-dir", str(d / name / "ckpt"), "--out", str(d / name / "out"),
                         "--save-params", str(d / name / "params")]) for name, (flags, _, _) in FAULTS.items()]
    p = mpirun(4, str(MPI_DIR / "runs_in_turn.py"), *lines, timeout=240)
    assert p.returncode == 0 and "ZeRO stage 3 over 2 replicas" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
    return {name: params(d / name / "params") for name in FAULTS}


@pytest.mark.parametrize("name", list(FAULTS))
def test_killed_rank_relaunch_is_bit_equal(tmp_path, fault_free, name):
    """A rank SIGKILLs itself at a random step (under ZeRO stage 3), or half-way through writing
    an async checkpoint; the supervisor relaunches the job, which resumes from its newest good
    checkpoint to the fault-free run's parameters, bit for bit."""
    flags, fault_flags, resumes = FAULTS[name]
    rc, out, err = supervised(tmp_path, *flags, *fault_flags)
    assert rc == 0, out[-3000:] + err[-3000:]
    assert "injected fault 0: SIGKILL" in err and RANK_DEATH.search(out + err)   # the launcher saw it die
    relaunched = out.split("launch 2")[1]
    assert "checkpoint: resumed from step-" in relaunched or (not resumes and "starting from step 0" in relaunched), \
        out[-3000:] + err[-2000:]
    assert "supervisor: launches=2 failures=1 recovered=1 recovery_rate=100% exit=0" in out
    assert "no rank left a done marker" not in out   # every rank marked its clean end
    got, want = params(tmp_path / "params"), fault_free[name]
    assert sorted(got) == sorted(want)
    for k in got:
        assert torch.equal(got[k], want[k]), k


def test_a_reported_error_is_not_relaunched(tmp_path):
    rc, out, err = supervised(tmp_path, "--inject-error", "rank=1,step=3", np=2, timeout=180)
    assert rc != 0 and "RuntimeError: injected error at step 3" in err
    assert "not relaunching" in out and "launches=1 failures=0" in out


def test_ulfm_survives_a_killed_rank_without_relaunch(tmp_path):
    if KIND != "openmpi":   # what the user gets elsewhere: one line, and the relaunch path
        p = mpirun(1, "-c", "from mpipar.comm import ulfm; print(ulfm.status(), ulfm.enabled())")
        assert p.returncode == 0 and "ULFM: off" in p.stdout and "supervisor relaunches" in p.stdout
        assert p.stdout.strip().endswith("False") and len(p.stdout.strip().splitlines()) == 1
        return
    cmd = MPIEXEC.command(4, [str(MPI_DIR / "ulfm_checks.py"), str(tmp_path)], extra=MPIEXEC.with_fault_tolerance())
    rc, out, err = run(cmd, 180)
    assert rc == 0, out[-3000:] + err[-3000:]
    assert "injected fault 0: SIGKILL at step 5" in err
    assert "ulfm checks: passed on 3 survivors (lost rank [2])" in out


# -- fault flags and the supervisor ---------------------------------------------------------------

def test_fault_flags():
    assert fault.resolve(fault.parse("rank=2,step=5"), 4, 100) == [fault.Fault(2, 5, "step")]
    a = fault.resolve(fault.parse("random=7,count=3,phase=write"), 4, 50)
    assert a == fault.resolve(fault.parse("random=7,count=3,phase=write"), 4, 50)   # seeded
    assert len(a) == 3 and all(1 <= f.step < 50 and f.phase == "write" for f in a)
    assert [f.step for f in a] == sorted(f.step for f in a)
    assert len({f.rank for f in fault.resolve(fault.parse("random=1,count=3"), 4, 50, distinct=True)}) == 3
    for bad in ("rank=1", "random=x", "rank=1,step=2,random=3", "rank=1,step=2,phase=later"):
        with pytest.raises(ConfigError, match="--inject-fault"):
            fault.parse(bad)
    with pytest.raises(ConfigError, match="rank must be in 0..3"):
        fault.resolve(fault.parse("rank=4,step=2"), 4, 10)


def test_supervisor_relaunches_only_after_a_dead_rank():
    killed = "prterun noticed that process rank 2 with PID 1 on node vm exited on\nsignal 9 (Killed)."
    hydra_killed = "=   EXIT CODE: 9\nYOUR APPLICATION TERMINATED WITH THE EXIT STRING: Killed (signal 9)"
    hydra_aborted = "Abort(3) on node 1 (rank 1 in comm 0): application called MPI_Abort(MPI_COMM_WORLD, 3) - process 1"
    assert rank_died(9, hydra_killed) and not rank_died(3, hydra_aborted)
    aborted = ('rank 0 (vm): ConfigError: bad\nMPI_ABORT was invoked on rank 0\nprterun has exited due to process '
               'rank 0 calling "abort". This may have caused other processes to be terminated by signals')
    assert rank_died(137, killed) and rank_died(1, killed)
    assert not rank_died(1, aborted) and not rank_died(0, "")
    assert rank_died(-9, "")   # the launcher itself was killed by a signal


def test_supervisor_commands_are_argument_lists():
    cmd = launcher_command(4, ["-m", "mpipar.run", "mlp"], env={"PATH": ""})
    exports = ["-x", "MPIPAR_ATTEMPT", "-x", "MPIPAR_SUPERVISED", "-x", "MPIPAR_DONE_DIR"] if KIND == "openmpi" else []
    assert cmd == MPIEXEC.command(4, ["-m", "mpipar.run", "mlp"], extra=exports) and cmd[0] == MPIEXEC.path
    slurm = launcher_command(8, ["x.py"], env={"PATH": "", "SLURM_JOB_ID": "7"})
    assert slurm == MPIEXEC.command(8, ["x.py"], oversubscribe=False, extra=exports)
    assert launcher_command(8, ["x.py"], "srun", env={})[:3] == ["srun", "--mpi=pmix", "-n"]
    opts, job = split_argv(["--np", "2", "--max-restarts", "5", "mlp", "--epochs", "1"])
    assert (opts.np, opts.max_restarts, job) == (2, 5, ["-m", "mpipar.run", "mlp", "--epochs", "1"])
    opts, job = split_argv(["--np", "3", "--", "tests/mpi/x.py", "--np", "9"])
    assert opts.np == 3 and job == ["tests/mpi/x.py", "--np", "9"]


# -- the supervisor's decisions, on stand-in jobs (one process, no MPI) ---------------------------

FAKE_JOB = r"""
import os, signal, subprocess, sys, time
from pathlib import Path
step = sys.argv[1].split(",")[int(os.environ["MPIPAR_ATTEMPT"])]
done = Path(os.environ["MPIPAR_DONE_DIR"])
def finish(ranks):
    for r in range(ranks):
        (done / f"rank-{r}").write_text("done")
if step == "hang":   # a rank's stall report, then the launcher waits on a host it cannot reach
    rank = subprocess.Popen([sys.executable, "-c", "import os, time; os.setpgid(0, 0); time.sleep(600)"])
    Path(sys.argv[2]).write_text(str(rank.pid))   # like Open MPI's ranks: a process group of its own
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("rank 1 (h2): StallError: waited 10 s for RECV ACT mb=0 from rank 2 (--stall-timeout 10); aborting the job",
          file=sys.stderr, flush=True)
    time.sleep(600)
if step == "lost":   # Open MPI after TCP gave up on the host: exit 0
    print("PRTE has lost communication with a remote daemon.", file=sys.stderr, flush=True)
elif step == "partial":   # exit 0 with 2 of the 4 ranks done
    finish(2)
elif step == "preempted":
    finish(4)
    sys.exit(75)
elif step == "wait-usr1":   # a job that checkpoints and stops on SIGUSR1 (exit 75); SIGTERM kills it
    signal.signal(signal.SIGUSR1, lambda *a: (Path(sys.argv[2]).write_text("checkpoint"), sys.exit(75)))
    Path(sys.argv[2] + ".ready").write_text("")
    time.sleep(600)
    sys.exit(1)
elif step == "ok":
    finish(4)
"""


@pytest.fixture
def fake_jobs(tmp_path, monkeypatch):
    """supervise() on a stand-in for the launcher: ATTEMPT i does plan[i]; returns run(plan, ...)
    -> (exit code, the supervisor's lines)."""
    import mpipar.app.supervise as sup
    script = tmp_path / "fake_job.py"
    script.write_text(FAKE_JOB)
    monkeypatch.setattr(sup, "HUNG_AFTER", 1.0, raising=False)
    monkeypatch.setattr(sup, "KILL_GRACE", 1.0, raising=False)
    monkeypatch.chdir(tmp_path)   # the done markers' folder

    def run(plan, max_restarts=5, note=tmp_path / "note"):
        monkeypatch.setattr(sup, "launcher_command", lambda *a, **k: [sys.executable, str(script), plan, str(note)])
        lines = []
        rc = sup.supervise(["-m", "x", "--checkpoint-dir", "c"], 4, max_restarts,
                           log=lambda *a, **k: lines.append(" ".join(map(str, a))))
        assert not list(tmp_path.glob(".mpipar-done-*")), "done folders left behind"
        return rc, lines
    yield run
    for pid in [int(p.name) for p in Path("/proc").glob("[0-9]*")]:   # a failed test's stand-ins
        try:
            if str(tmp_path).encode() in Path(f"/proc/{pid}/cmdline").read_bytes() or \
                    (tmp_path / "note").exists() and (tmp_path / "note").read_text() == str(pid):
                os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass


def test_supervisor_relaunches_a_stalled_lost_or_preempted_job_and_never_passes_one_off_as_done(fake_jobs, tmp_path):
    """A launcher still up after a rank's StallError is ended (its ranks too) and the job
    relaunched; exit 0 after a lost host, or without every rank's done marker, is a failure
    (relaunched); a preempted job (exit 75) is relaunched; then the job completes."""
    t0 = time.monotonic()
    rc, lines = fake_jobs("hang,lost,partial,preempted,ok")
    text = "\n".join(lines)
    assert rc == 0, text
    assert time.monotonic() - t0 < 30, text
    assert "still up 1 s after 'rank 1 (h2): StallError: waited 10 s" in text and "ending it" in text, text
    assert "a rank stalled (rank 1 (h2): StallError" in text, text
    assert "the launcher lost a host (PRTE has lost communication" in text, text
    assert "only 2 of 4 ranks finished" in text and "the job was preempted (exit 75" in text, text
    assert lines[-1] == "supervisor: launches=5 failures=3 recovered=3 recovery_rate=100% exit=0", text
    rank = int((tmp_path / "note").read_text())   # the stand-in's "rank" in a process group of its own
    assert not Path(f"/proc/{rank}").exists() or "Z" in Path(f"/proc/{rank}/stat").read_text().split(")")[1][:3]
    for plan in ("lost", "partial"):   # out of restarts: the job's exit 0 is not the supervisor's
        rc, lines = fake_jobs(plan, max_restarts=0)
        assert rc == 1 and lines[-1].endswith("exit=1") and "--max-restarts 0 used up" in lines[-2], lines


def test_sigterm_to_the_supervisor_has_the_job_checkpoint_and_exits_preempted(fake_jobs, tmp_path):
    """SIGTERM to the supervisor (SLURM's preemption) reaches the job as SIGUSR1 (its launcher
    passes that on to every rank, where SIGTERM would end them); the job's exit 75 becomes the
    supervisor's, with one line, and no relaunch."""
    note = tmp_path / "note"

    def preempt():
        deadline = time.monotonic() + 20
        while not Path(str(note) + ".ready").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=preempt, daemon=True).start()
    rc, lines = fake_jobs("wait-usr1,ok", note=note)
    assert rc == 75 and note.read_text() == "checkpoint", lines
    assert any(line.startswith("supervisor: preempted (SIGTERM): the job wrote a checkpoint and stopped; exit 75")
               for line in lines), lines
    assert lines[-1] == "supervisor: launches=1 failures=0 recovered=0 recovery_rate=n/a exit=75", lines
