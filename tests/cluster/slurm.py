"""A real single-node SLURM (slurmctld + slurmd, Debian slurm-wlm) in a temp dir, so tests submit
real batch jobs: no systemd, no munge (auth/none), free ports, one oversubscribed node."""
from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

# libpmix-dev: SLURM's mpi/pmix plugin dlopens the unversioned libpmix.so, which only the -dev
# package ships; without it `srun --mpi=pmix` fails with "can not load PMIx library".
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "libpmix-dev"]
DAEMONS = ("slurmctld", "slurmd")

CONF = """\
ClusterName=mpipar
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation={base}/state/ctld
SlurmdSpoolDir={base}/state/d
SlurmctldPidFile={base}/run/slurmctld.pid
SlurmdPidFile={base}/run/slurmd.pid
SlurmctldLogFile={base}/log/slurmctld.log
SlurmdLogFile={base}/log/slurmd.log
TmpFS={base}/tmp
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=600
NodeName={node} NodeAddr=127.0.0.1 Port={d_port} CPUs={cpus} Boards=1 SocketsPerBoard=1 CoresPerSocket={cpus} ThreadsPerCore=1 RealMemory=4000
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
"""


def why_unavailable() -> str | None:
    """None when SLURM is (or can be) installed and run here; else the reason the tests must skip."""
    if os.geteuid() != 0:
        return "not root: installing slurm-wlm (apt-get) and running slurmctld/slurmd as SlurmUser=root need root"
    if not installed() and not shutil.which("apt-get"):
        return "SLURM is not installed and there is no apt-get to install Debian's slurm-wlm"
    return None


def installed() -> bool:
    return all(shutil.which(d) for d in (*DAEMONS, "sbatch")) and bool(glob.glob("/usr/lib/*/pmix2/lib/libpmix.so"))


def install(timeout: float = 300) -> None:
    """apt-get install the SLURM daemons, client and PMIx (~30 s); raises with apt's output on failure."""
    if installed():
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=120"]
    subprocess.run(["apt-get", *lock, "update", "-q"], env=env, capture_output=True, timeout=timeout)  # best effort
    cmd = ["apt-get", *lock, "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0 or not installed():
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Slurm:
    """One controller and one compute node named after this host, all state under `base`."""

    def __init__(self, base: Path, cpus: int = 8):
        self.base, self.cpus = Path(base), cpus
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.base / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # -- daemons ---------------------------------------------------------------------------------
    def up(self, timeout: float = 30) -> None:
        for d in ("state/ctld", "state/d", "log", "run", "tmp"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        ports = {"ctld_port": free_port(), "d_port": free_port()}
        self.conf.write_text(CONF.format(base=self.base, node=self.node, cpus=self.cpus, **ports))
        subprocess.run(["slurmctld", "-i"], env=self.env, check=True, timeout=30)
        subprocess.run(["slurmd", "-N", self.node], env=self.env, check=True, timeout=30)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            p = self.run("sinfo", "-h", "-o", "%T", check=False)
            if p.stdout.strip() == "idle":
                return
            time.sleep(0.2)
        raise RuntimeError(f"SLURM node not idle after {timeout} s (sinfo: {p.stdout.strip()!r} {p.stderr.strip()!r})\n"
                           + self.logs())

    def pids(self) -> list[int]:
        """The daemons and every process still carrying this cluster's SLURM_CONF (jobs, steps)."""
        mark = f"SLURM_CONF={self.conf}".encode()
        found = []
        for d in DAEMONS:
            try:   # a daemon deletes its pid file as it exits; a stale pid may be someone else's now
                pid = int((self.base / "run" / f"{d}.pid").read_text())
                if Path(f"/proc/{pid}/comm").read_text().startswith(d):
                    found.append(pid)
            except (OSError, ValueError):
                pass
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit() and int(proc.name) != os.getpid():
                try:
                    if mark in (proc / "environ").read_bytes().split(b"\0"):
                        found.append(int(proc.name))
                except OSError:
                    continue
        return sorted(set(p for p in found if alive(p)))

    def down(self) -> list[int]:
        """Cancel jobs, stop the daemons, kill what is left; returns the pids that needed SIGKILL."""
        if self.conf.is_file():
            self.run("scancel", "--full", "-p", "debug", check=False)
            self.wait_empty(10)
        for pid in self.pids():
            signal_pid(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.2)
        stubborn = self.pids()
        for pid in stubborn:
            signal_pid(pid, signal.SIGKILL)
        return stubborn

    def logs(self) -> str:
        out = []
        for f in sorted((self.base / "log").glob("*.log")):
            out.append(f"--- {f.name} (tail)\n" + "\n".join(f.read_text(errors="replace").splitlines()[-25:]))
        return "\n".join(out)

    # -- jobs ------------------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
        """A SLURM client command against this cluster, in `env` (default: ours) plus SLURM_CONF."""
        env = {**(self.env if env is None else env), "SLURM_CONF": str(self.conf)}
        p = subprocess.run(cmd, env=env, capture_output=True, text=True,
                           timeout=kw.pop("timeout", 30), **kw)
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()}")
        return p

    def submit(self, *argv: str, env: dict | None = None, cwd: Path | None = None) -> int:
        """sbatch --parsable ARGV...; returns the job id."""
        p = self.run("sbatch", "--parsable", *argv, env=env, cwd=cwd)
        return int(p.stdout.strip().split(";")[0])

    def wait(self, job: int, timeout: float) -> dict:
        """Poll squeue until the job leaves the queue; returns scontrol's fields (JobState, ExitCode...)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.run("squeue", "-h", "-j", str(job), check=False).stdout.strip():
                return self.job(job)
            time.sleep(0.2)
        info = self.job(job)
        self.run("scancel", str(job), check=False)
        raise AssertionError(f"job {job} still {info.get('JobState')} after {timeout} s "
                             f"(reason {info.get('Reason')})\n{self.logs()}")

    def job(self, job: int) -> dict:
        out = self.run("scontrol", "show", "job", "-o", str(job), check=False).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def wait_empty(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.run("squeue", "-h", check=False).stdout.strip():
                return
            time.sleep(0.2)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
