"""mpipar.app.run end to end: parity with single-process training, per-rank allocation, and bad
inputs that must end the whole job quickly with one clear line (never hang)."""
import os
import re
import sys
import time
from pathlib import Path

import pytest
import torch

from mpipar.launcher import parse_hostfile
from mpipar.model import param_counts
from mpipar.app.run import parse
from mpirun import MPIEXEC, ROOT, mpirun, run_command
from parity import check_parity

torch.set_num_threads(1)


def table_params(stdout):
    rows = re.findall(r"^\s+(\d+)\s+\d+\s+\d+\s+\d+\s+\d+\s+(\S+)\s+([\d.]+(?: [kMG])?)\s+\S+$", stdout, re.M)
    return {int(r): (span, size) for r, span, size in rows}


def test_list_is_instant_and_names_examples():
    p = mpirun(1, "-m", "mpipar.run", "--list", timeout=60)
    assert p.returncode == 0 and "mlp" in p.stdout and "split-cnn" in p.stdout


def test_mlp_parity_on_4_ranks_with_microbatches(tmp_path):
    out = check_parity(tmp_path, 4, ["mlp", "--epochs", "2", "--steps", "12", "--microbatches", "4"])
    assert "summary: mlp on 4 ranks" in out and "epoch 2" in out
    # each rank allocated only its two layers: the banner's count is exactly theirs
    args, example = parse(["mlp"])
    counts = param_counts(example.layers(args))
    rows = table_params(out)
    for r in range(4):
        want = counts[2 * r] + counts[2 * r + 1]
        assert rows[r][0] == f"fc{2 * r + 1}..fc{2 * r + 2}"
        assert rows[r][1] == (f"{want / 1e3:.1f} k" if want >= 1e3 else str(want))
    # and saved only those layers
    for r in range(4):
        keys = torch.load(tmp_path / "params" / f"stage{r}.pt", weights_only=True).keys()
        assert {k.split(".")[0] for k in keys} == {f"fc{2 * r + 1}", f"fc{2 * r + 2}"}


# -- bad inputs: one clear line, non-zero exit, fast ------------------------------------------

BAD = [   # one of each way a job ends; the other refusals: tests/mpi/cases_bad_input.py
    ("unknown example", 2, ["nosuch"], "ConfigError: unknown example 'nosuch'; available:"),
    ("missing data dir", 2, ["split-cnn", "--data-dir", "/nonexistent/cifar"], "DataError: cifar10"),
    ("shape mismatch", 2, [str(ROOT / "tests/fixtures/bad_shapes.py"), "--balance", "layers"],
     "ShapeError: stage 1 (rank 1, layers b..b) cannot take the activation [16, 16] float32 from rank 0"),
    ("profile fails", 2, [str(ROOT / "tests/fixtures/bad_shapes.py")],
     "ConfigError: --balance time: profiling layer 'b' on the activation [16, 16] float32 failed"),
    ("one rank raises", 4, ["mlp", "--inject-error", "rank=2,step=3"], "rank 2 ("),
    ("--device cuda without a GPU", 2, ["mlp", "--device", "cuda"],     # CPU-only CI machines
     "ConfigError: --device cuda: this machine has no usable CUDA device"),
]


@pytest.mark.parametrize("name, np_, argv, needle", BAD, ids=[b[0] for b in BAD])
def test_bad_input_ends_job_with_one_line(tmp_path, name, np_, argv, needle):
    t0 = time.monotonic()
    p = mpirun(np_, "-m", "mpipar.run", *argv, "--out", str(tmp_path), timeout=60)
    elapsed = time.monotonic() - t0
    assert p.returncode != 0
    lines = [ln.lstrip("\0 ") for ln in p.stderr.splitlines() if re.match(r"[\0 ]*rank \d+ \(", ln)]
    assert lines, p.stderr[-2000:]
    assert any(needle in ln for ln in lines), "\n".join(lines) + "\n" + p.stderr[-1500:]
    print(f"{name}: exit {p.returncode} after {elapsed:.1f} s: {lines[0]}")


def test_a_config_error_every_rank_raises_is_printed_once():
    """Every rank rejects the rank map alike; rank 0 says so, the others stay quiet."""
    p = mpirun(4, "-m", "mpipar.run", "mlp", "--grid", "pp=2,dp=3", timeout=60)
    assert p.returncode != 0
    lines = [ln for ln in p.stderr.splitlines() if "RankMapError" in ln]
    assert len(lines) == 1 and lines[0].lstrip("\0 ").startswith("rank 0 ("), p.stderr[-2000:]
    assert "needs pp*dp*tp = 2*3*1 = 6 ranks, but the job has 4" in lines[0], lines[0]


if MPIEXEC.kind != "openmpi":   # hydra reads the hostfile as python -m mpipar.launcher rewrites it
    def test_hostfile_as_shipped_places_ranks(tmp_path):
        """hostfiles/cluster runs as shipped (localhost slots=8), as the README's command uses it
        (python -m mpipar.launcher --hostfile rewrites it for MPICH's hydra, as done here). Under
        Open MPI the card's line (the test beside this one) runs 8 ranks of mlp with it, as shipped."""
        hosts = tmp_path / "hosts"
        hosts.write_text(MPIEXEC.hostfile(parse_hostfile((ROOT / "hostfiles/cluster").read_text())))
        p = mpirun(8, "-c", "from mpipar.comm import World; w = World(); r = w.comm.gather(w.rank); "
                   "w.rank or print('ranks', r, 'of', w.size)", hostfile=hosts, timeout=90)   # one printer
        assert p.returncode == 0, p.stderr[-2000:]
        assert f"ranks {list(range(8))} of 8" in p.stdout, p.stdout
else:   # the design card's line is Open MPI's syntax, and runs the hostfile as shipped
    def test_the_cards_mpirun_line_runs_verbatim(tmp_path):
        """`mpirun -np 8 --hostfile hostfiles/cluster python -m mpipar.run mlp` as users copy it: no
        --oversubscribe, no --bind-to, no OMPI_MCA_/PRTE_MCA_ variables; the venv's Open MPI
        configuration from launch/setup.sh lets 8 ranks share this machine's cores (only
        root's permission is added here, as on any root shell). A short run of it."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_MCA", "PRTE_MCA", "PMIX_MCA"))}
        env.update({k: v for k, v in MPIEXEC.environment(oversubscribed=False).items() if "ROOT" in k})
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONPATH"], env["OMP_NUM_THREADS"] = str(ROOT), "1"
        cmd = ["mpirun", "-np", "8", "--hostfile", "hostfiles/cluster", "python", "-m", "mpipar.run", "mlp",
               "--epochs", "1", "--steps", "2", "--out", str(tmp_path)]
        p = run_command(cmd, env, timeout=240)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        assert "summary: mlp on 8 ranks" in p.stdout, p.stdout[-2000:]


def test_stall_watchdog_names_rank_peer_and_message(tmp_path):
    """A peer that answers after DELAY < STALL seconds goes unreported; the wait that never ends
    is reported, by name, no earlier than STALL seconds into it (tests/mpi/stall.py)."""
    stall, delay = 4, 1
    t0 = time.monotonic()
    p = mpirun(2, str(ROOT / "tests/mpi/stall.py"), str(stall), str(delay), timeout=60)
    elapsed = time.monotonic() - t0
    assert p.returncode != 0
    assert "rank 1: ACT mb=1 arrived after" in p.stdout, p.stdout + p.stderr   # the late answer was waited for
    reports = re.findall(r"rank (\d) \(.*\): StallError: waited (\d+) s for (.*) \(--stall-timeout", p.stderr)
    assert [(r, what) for r, _, what in reports] == [("1", "RECV ACT mb=7 header from rank 0")], p.stderr
    assert int(reports[0][1]) >= stall, p.stderr
    assert elapsed >= delay + stall, (elapsed, p.stderr)


# -- issue 30: a diverging run and a preempted one end as they should -------------------------------

def kept_states_finite(root: Path) -> list[int]:
    """The steps of the checkpoints in `root`, after checking every tensor of every shard is finite."""
    from mpipar.checkpoint import store
    from mpipar.checkpoint.state import deserialize

    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from tensors(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                yield from tensors(v)

    steps = []
    for step, folder in store.step_dirs(root):
        for shard in folder.glob("rank-*.pt"):
            for t in tensors(deserialize(shard.read_bytes())):
                assert not t.is_floating_point() or bool(t.isfinite().all()), f"{shard}: non-finite state"
        steps.append(step)
    return steps


def test_a_diverging_run_stops_with_one_line_and_checkpoints_nothing_non_finite(tmp_path):
    """--lr 1e6 (Adam) on dp=4, clipped, replicas checked: the first step whose loss or gradients
    are not finite stops the job, non-zero, with one line; every checkpoint kept is finite."""
    ck = tmp_path / "ck"
    p = mpirun(4, "-m", "mpipar.run", "mlp", "--grid", "dp=4", "--lr", "1e6", "--clip-grad", "1.0",
               "--dp-check-every", "1", "--checkpoint-dir", str(ck), "--checkpoint-every", "1", "--epochs", "1",
               "--steps", "8", "--out", str(tmp_path / "out"), timeout=90)
    assert p.returncode != 0
    lines = [ln.lstrip("\0 ") for ln in p.stderr.splitlines() if "NonFiniteError" in ln]
    assert len(lines) == 1 and re.match(r"rank 0 \(.*\): NonFiniteError: step \d+ \(epoch 1\): non-finite ", lines[0]), \
        p.stderr[-3000:]
    assert kept_states_finite(ck), "no checkpoint kept"


def start_job(np_, argv, tmp_path, name):
    """`python -m mpipar.run argv` on np_ ranks, not waited for (output in tmp_path/name.out, .err)."""
    import subprocess
    from mpirun import ENV
    out, err = (open(tmp_path / f"{name}.{x}", "w") for x in ("out", "err"))
    return subprocess.Popen(MPIEXEC.command(np_, ["-m", "mpipar.run", *argv]), stdout=out, stderr=err, text=True,
                            env={**os.environ, **ENV, "PYTHONPATH": str(ROOT)}, cwd=ROOT, start_new_session=True)


def family(proc) -> dict[int, str]:
    """{pid: command name} of `proc` and its descendants (Open MPI's ranks are the launcher's
    children, hydra's its proxy's, each in a session of its own)."""
    parent, comm = {}, {}
    for d in Path("/proc").iterdir():
        try:
            stat, comm[int(d.name)] = (d / "stat").read_text(), (d / "comm").read_text()
        except (OSError, ValueError):
            continue
        parent[int(d.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
    found = {proc.pid}
    while more := {p for p, pp in parent.items() if pp in found} - found:
        found |= more
    return {p: comm.get(p, "") for p in found}


def ranks_of(proc) -> list[int]:
    """The Python processes (the ranks) the launcher `proc` started."""
    return sorted(p for p, name in family(proc).items() if name.startswith("python") and p != proc.pid)


def preempt(proc, when: Path, tmp_path, name, ranks: int, sig):
    """Once `when` exists, send `sig` to every one of the job's `ranks` (as SLURM does at the time
    limit), or to the launcher (ranks=0); returns (exit code, the job's stderr)."""
    import signal
    from mpirun import kill_group
    t0 = time.monotonic()
    try:
        while not when.exists():
            assert proc.poll() is None, f"the job ended ({proc.returncode}) before {when.name}"
            assert time.monotonic() - t0 < 120, f"no {when} after 120 s"
            time.sleep(0.02)
        pids = ranks_of(proc) if ranks else [proc.pid]
        assert len(pids) == (ranks or 1), pids
        for pid in pids:
            os.kill(pid, sig)
        rc = proc.wait(timeout=60)
    finally:
        kill_group(proc)
    return rc, (tmp_path / f"{name}.err").read_text()


def test_a_signal_checkpoints_and_exits_75_and_the_next_launch_resumes_from_it(tmp_path):
    """SIGTERM to every rank (as SLURM does at the time limit), then, in the relaunch that resumes
    from its checkpoint, SIGUSR1 to mpirun (SLURM's --signal; mpirun forwards it; a SIGTERM to
    Open MPI's mpirun kills the ranks 0.25 s later, no time to save): each time every rank
    finishes its step, the checkpoint is written and the job exits PREEMPTED_EXIT with one line.
    That the resume is bit-equal to an uninterrupted run: tests/mpi/cases_checkpoint.py."""
    import signal
    from mpipar.checkpoint import store
    from mpipar.train.guard import PREEMPTED_EXIT
    ck = tmp_path / "ck"
    argv = ["mlp", "--epochs", "8", "--steps", "16", "--checkpoint-dir", str(ck), "--checkpoint-every", "8",
            "--out", str(tmp_path / "out")]
    saved = None
    for name, at, ranks, sig in (("a", 8, 4, signal.SIGTERM), ("b", 40, 0, signal.SIGUSR1)):
        proc = start_job(4, argv, tmp_path, name)
        rc, err = preempt(proc, store.step_dir(ck, at) / "manifest.json", tmp_path, name, ranks, sig)
        lines = [ln.lstrip("\0 ") for ln in err.splitlines() if "preempted" in ln]
        assert rc == PREEMPTED_EXIT and len(lines) == 1, err[-3000:]
        m = re.match(rf"rank 0 \(.*\): preempted by {sig.name} \(first on rank \d\) after step (\d+) .*: "
                     rf"checkpoint (\S+) written; .*; exit {PREEMPTED_EXIT}$", lines[0])
        assert m and int(m.group(1)) > at and Path(m.group(2)) == store.step_dir(ck, int(m.group(1))), lines[0]
        if saved is not None:   # the relaunch went on from the first one's checkpoint
            assert f"resumed from {saved.name} " in (tmp_path / f"{name}.out").read_text()
        saved = Path(m.group(2))


# -- issue 30: SIGTERM to every process of the job at once, as SLURM's time limit sends it ---------------

def readme_checkpoint_job(folder: Path, steps: int, supervised: bool = False):
    """The README's checkpoint_resume.py, as written, on 2 ranks in `folder` (its checkpoints in
    folder/ckpt), plain or under the supervisor; not waited for (output in folder/job.out, .err)."""
    import subprocess
    from mpirun import ENV
    from test_readme_api import SNIPPETS
    folder.mkdir(exist_ok=True)
    script = folder / "checkpoint_resume.py"
    script.write_text(SNIPPETS["checkpoint_resume.py"])
    cmd = ([sys.executable, "-m", "mpipar.supervise", "--np", "2", "--", str(script), str(steps)] if supervised
           else MPIEXEC.command(2, [str(script), str(steps)]))
    with open(folder / "job.out", "w") as out, open(folder / "job.err", "w") as err:
        return subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=folder, start_new_session=True,
                                env={**os.environ, **ENV, "PYTHONPATH": str(ROOT)})


def term_everything(proc, folder: Path) -> int:
    """Once the job's step-5 checkpoint is written, SIGTERM to `proc` and every process under it
    at once (as SLURM signals a job); checks the exit code 75, the one line that says the job
    was preempted and the checkpoint it names; returns that checkpoint's step."""
    import signal
    from mpipar.checkpoint import store
    from mpipar.train.guard import PREEMPTED_EXIT
    from mpirun import kill_group
    t0 = time.monotonic()
    try:
        while not (store.step_dir(folder / "ckpt", 5) / "manifest.json").exists():
            assert proc.poll() is None, f"the job ended ({proc.returncode}): {(folder / 'job.err').read_text()[-2000:]}"
            assert time.monotonic() - t0 < 120, "no step-5 checkpoint after 120 s"
            time.sleep(0.02)
        everyone = family(proc)
        assert len([n for n in everyone.values() if n.startswith("python")]) >= 2, everyone
        for pid in everyone:
            os.kill(pid, signal.SIGTERM)
        rc = proc.wait(timeout=60)
    finally:
        kill_group(proc)
    err = (folder / "job.err").read_text()
    lines = [ln.lstrip("\0 ") for ln in err.splitlines() if "preempted" in ln]
    assert rc == PREEMPTED_EXIT and len(lines) == 1, f"exit {rc}\n{err[-3000:]}"
    m = re.match(rf"rank 0 \(.*\): preempted by SIGTERM \(first on rank \d\) after step (\d+): checkpoint (\S+) "
                 rf"written; the same command resumes from it; exit {PREEMPTED_EXIT}$", lines[0])
    assert m and folder / m.group(2) == store.step_dir(folder / "ckpt", int(m.group(1))), lines[0]   # relative to the job's
    assert (folder / m.group(2) / "manifest.json").exists(), lines[0]
    return int(m.group(1))


def test_term_to_the_supervisor_its_launcher_and_every_rank_at_once_checkpoints_and_exits_75(tmp_path):
    """SLURM's time limit (or a preemption without --signal) sends SIGTERM to every process of the
    job at once. Under the supervisor the README's checkpoint script still saves a step and exits
    75 with one line, under either MPI: Open MPI's mpirun, which kills its ranks 0.25 s after a
    SIGTERM, is started with SIGTERM blocked, and a rank that has saved ignores the SIGUSR1 the
    supervisor then passes on."""
    folder = tmp_path / "job"
    proc = readme_checkpoint_job(folder, 100000, supervised=True)
    assert term_everything(proc, folder) > 5
    out = (folder / "job.out").read_text()
    assert "supervisor: preempted (SIGTERM): the job wrote a checkpoint and stopped; exit 75" in out, out[-2000:]


if MPIEXEC.kind != "openmpi":   # Open MPI's mpirun kills its ranks 0.25 s after a SIGTERM: see the supervisor's test
    def test_term_to_mpiexec_and_every_rank_checkpoints_exits_75_and_resumes_bit_equal(tmp_path):
        """MPICH's hydra (Intel MPI's mpiexec is hydra too) forwards a SIGTERM and waits for the
        ranks: SIGTERM to mpiexec, its proxy and the ranks at once (SLURM's time limit) saves a
        step and exits 75; run again, the script resumes from it and ends bit-equal to an
        uninterrupted run."""
        from mpirun import kill_group
        saved = term_everything(readme_checkpoint_job(tmp_path / "cut", 100000), tmp_path / "cut")
        jobs = {name: readme_checkpoint_job(tmp_path / name, saved + 3) for name in ("cut", "whole")}   # side by side
        for name, proc in jobs.items():
            try:
                assert proc.wait(timeout=150) == 0, (tmp_path / name / "job.err").read_text()[-3000:]
            finally:
                kill_group(proc)
        assert f"resumed from step-{saved:09d} " in (tmp_path / "cut" / "job.out").read_text()
        for stage in ("stage0.pt", "stage1.pt"):
            got, want = (torch.load(tmp_path / name / stage, weights_only=True) for name in ("cut", "whole"))
            assert sorted(got) == sorted(want)
            for k in want:
                assert torch.equal(got[k], want[k]), (stage, k)
