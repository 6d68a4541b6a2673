"""How to start ranks with the MPI this Python uses: the one place that knows that Open MPI says
`mpirun -np N --oversubscribe --bind-to none` and reads OMPI_MCA_* variables, while MPICH's and
Intel MPI's hydra say `mpiexec -n N -f hosts` and read MPIR_CVAR_* / I_MPI_* instead.

The implementation is detected once from `mpiexec --version` (the one next to this Python first:
a venv's PyPI MPI, then PATH). Everything that starts a job uses it: launch/local.sh and
launch/slurm-env.sh (through `python -m mpipar.launcher`), the supervisor, the tests and the
benchmarks that launch jobs, and hostfiles/from_slurm.py.

    python -m mpipar.launcher --np 4 [--hostfile F] [--dry-run] [--] -m mpipar.run mlp ...
    python -m mpipar.launcher --which        # what was found, one line
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

KINDS = ("openmpi", "mpich", "impi")
NAMES = {"openmpi": "Open MPI", "mpich": "MPICH", "impi": "Intel MPI"}

# What an oversubscribed host needs (more ranks than cores: tests, a laptop, a small allocation).
# Ranks waiting inside MPI must give their core away, or the rank they wait for cannot run.
OVERSUBSCRIBED_ENV = {
    "openmpi": {"OMPI_MCA_mpi_yield_when_idle": "1",          # sched_yield in the progress loop
                "OMPI_MCA_rmaps_base_oversubscribe": "1",     # more ranks than slots
                "OMPI_MCA_hwloc_base_binding_policy": "none",
                "PRTE_MCA_prte_silence_shared_fs": "1"},
    # sched_yield every 1000 polls: MPICH's default, pinned (0 turns it off: 1.5x slower measured,
    # python -m mpipar.bench oversubscribed)
    "mpich": {"MPIR_CVAR_POLLS_BEFORE_YIELD": "1000"},
    "impi": {"I_MPI_WAIT_MODE": "1", "I_MPI_PIN": "0"},      # wait (not spin) for messages; no pinning
}
ROOT_ENV = {"openmpi": {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}}
# Keep MPI's TCP traffic on one interface or subnet (launch/slurm-env.sh MPIPAR_IFACE).
IFACE_ENV = {"openmpi": ("OMPI_MCA_btl_tcp_if_include", "OMPI_MCA_oob_tcp_if_include"),
             "mpich": ("FI_TCP_IFACE", "MPIR_CVAR_CH4_OFI_IFNAME"),
             "impi": ("FI_TCP_IFACE", "I_MPI_HYDRA_IFACE")}


def kind_of(version_text: str) -> str:
    """openmpi | mpich | impi from `mpiexec --version` or MPI_Get_library_version() text."""
    t = version_text.lower()
    if "open mpi" in t or "open-mpi" in t or "openrte" in t or "prrte" in t:
        return "openmpi"
    if "intel(r) mpi" in t or "intel mpi" in t:
        return "impi"
    if "hydra" in t or "mpich" in t or "mvapich" in t:
        return "mpich"
    first = version_text.strip().splitlines()[0] if version_text.strip() else "(no output)"
    raise ConfigError(f"unknown MPI launcher ({first[:80]}): mpipar knows Open MPI, MPICH (and MVAPICH) "
                      f"and Intel MPI; set MPIPAR_MPIEXEC to one of those")


def find_mpiexec(env=None, python: str | None = None) -> str:
    """$MPIPAR_MPIEXEC, else mpiexec/mpirun next to this Python (a venv's PyPI MPI), else on PATH."""
    env = os.environ if env is None else env
    if env.get("MPIPAR_MPIEXEC"):
        exe = shutil.which(env["MPIPAR_MPIEXEC"])
        if not exe:
            raise ConfigError(f"MPIPAR_MPIEXEC={env['MPIPAR_MPIEXEC']} is not an executable")
        return exe
    here = str(Path(python or sys.executable).parent)
    for path in (here, env.get("PATH", "")):
        for name in ("mpiexec", "mpirun"):
            exe = shutil.which(name, path=path)
            if exe:
                return exe
    raise ConfigError("no mpiexec or mpirun found (next to this Python or on PATH): run launch/setup.sh "
                      "(MPIPAR_MPI=openmpi|mpich|impi) or load your cluster's MPI module")


@functools.lru_cache(maxsize=None)
def _version(exe: str) -> str:
    try:
        p = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConfigError(f"{exe} --version failed: {e}") from None
    return p.stdout + p.stderr


@dataclass(frozen=True)
class MPIExec:
    """An MPI launcher: `kind` (openmpi | mpich | impi) and the executable `path`."""
    kind: str
    path: str

    @property
    def name(self) -> str:
        return NAMES[self.kind]

    def command(self, np: int, argv: list[str], *, hostfile: str | Path | None = None,
                oversubscribe: bool = True, extra=(), python: str | None = None) -> list[str]:
        """`python argv...` on `np` ranks, unbound, as an argument list (never a shell string)."""
        if np < 1:
            raise ConfigError(f"--np {np}: need at least one rank")
        cmd = [self.path]
        if self.kind == "openmpi":
            cmd += ["-np", str(np)]
            if hostfile:
                cmd += ["--hostfile", str(hostfile)]
            if oversubscribe:
                cmd += ["--oversubscribe"]
            cmd += ["--bind-to", "none"]
        else:   # hydra (MPICH, Intel MPI): places ranks round-robin over -f's slots, never refuses
            cmd += ["-n", str(np)]
            if hostfile:
                cmd += ["-f", str(hostfile)]
            if self.kind == "mpich":
                cmd += ["-bind-to", "none"]
        return [*cmd, *extra, python or sys.executable, *argv]

    def environment(self, oversubscribed: bool = True, iface: str | None = None) -> dict[str, str]:
        """Variables the ranks need: yield-when-idle on oversubscribed hosts, root permission,
        the network interface. The caller's own settings win (merge these under os.environ)."""
        out: dict[str, str] = {}
        if oversubscribed:
            out.update(OVERSUBSCRIBED_ENV[self.kind])
        if hasattr(os, "getuid") and os.getuid() == 0:
            out.update(ROOT_ENV.get(self.kind, {}))
        if iface:
            out.update({k: iface for k in IFACE_ENV[self.kind]})
        return out

    def remote_env(self, agent: str | Path, iface: str, subnet: str | None = None,
                   tcp_only: bool = True) -> dict[str, str]:
        """Start the remote hosts' daemons with `agent` instead of ssh (called as `agent [-opts]
        HOST COMMAND...`), keep MPI's traffic on the interface named `iface` (Open MPI: on `subnet`
        when given, which it also accepts) and, with tcp_only (Open MPI), TCP even between the
        processes of one host."""
        if self.kind == "openmpi":
            out = {"PRTE_MCA_plm_ssh_agent": str(agent), "OMPI_MCA_plm_rsh_agent": str(agent)}
            if tcp_only:
                out["OMPI_MCA_btl"] = "tcp,self"
        else:   # hydra: its proxies tell hosts apart; between them, libfabric's TCP provider on iface
            # (not UCX, MPICH's first netmod: it would find hosts emulated on one machine in shared memory)
            out = {"HYDRA_LAUNCHER": "ssh", "HYDRA_LAUNCHER_EXEC": str(agent), "HYDRA_IFACE": iface,
                   "FI_PROVIDER": "tcp", "MPIR_CVAR_CH4_NETMOD": "ofi", "I_MPI_FABRICS": "shm:ofi"}
        where = subnet if subnet and self.kind == "openmpi" else iface
        return {**out, **self.environment(oversubscribed=False, iface=where)}

    def hostfile(self, hosts: list[tuple[str, int]]) -> str:
        """Hostfile text: Open MPI `host slots=N`, hydra `host:N`."""
        if self.kind == "openmpi":
            return "".join(f"{h} slots={n}\n" for h, n in hosts)
        return "".join(f"{h}:{n}\n" for h, n in hosts)

    def with_fault_tolerance(self) -> list[str]:
        """Launcher arguments that keep a job running after a rank dies (ULFM), or a ConfigError."""
        if self.kind == "openmpi":
            return ["--with-ft", "ulfm"]
        raise ConfigError(f"{self.name}: no fault-tolerant launch (ULFM) here; use the supervisor's relaunch")


def parse_hostfile(text: str) -> list[tuple[str, int]]:
    """(host, slots) from either format ('h slots=N', 'h:N', or a bare 'h' = 1 slot); comments
    and blank lines skipped. A line that is neither is a ConfigError naming it."""
    out = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = (re.fullmatch(r"([\w.\-]+)(?:\s+slots\s*=\s*(\d+))?(?:\s+max_slots\s*=\s*\d+)?", line)
             or re.fullmatch(r"([\w.\-]+):(\d+)", line))
        if not m or (m.group(2) is not None and int(m.group(2)) < 1):
            raise ConfigError(f"hostfile line {n}: {raw.strip()!r} is not 'host slots=N' (Open MPI) or 'host:N' (MPICH)")
        out.append((m.group(1), int(m.group(2) or 1)))
    if not out:
        raise ConfigError("hostfile names no hosts")
    return out


def find(env=None) -> MPIExec:
    """The launcher this Python's jobs use (detected once per executable)."""
    exe = find_mpiexec(env)
    return MPIExec(kind_of(_version(exe)), exe)


def srun_command(np: int, argv: list[str], pmi: str = "pmix", extra=(), overcommit: bool = False,
                 python: str | None = None) -> list[str]:
    """SLURM's own launch: `srun --mpi=pmix|pmi2` (Open MPI wants pmix, MPICH builds pmi2 or pmix)."""
    cmd = ["srun", f"--mpi={pmi}", "-n", str(np), "--kill-on-bad-exit=1"]
    if overcommit:
        cmd.append("--overcommit")
    return [*cmd, *extra, python or sys.executable, *argv]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mpipar.launcher", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--np", type=int, default=4)
    p.add_argument("--hostfile", help="Open MPI or hydra format; rewritten for the MPI found")
    p.add_argument("--no-oversubscribe", action="store_true", help="hosts have a core per rank")
    p.add_argument("--iface", default=os.environ.get("MPIPAR_IFACE"), help="network interface or subnet for MPI")
    p.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    p.add_argument("--which", action="store_true", help="print the MPI found and exit")
    p.add_argument("python_argv", nargs=argparse.REMAINDER, help="[--] arguments for python")
    a = p.parse_args(argv)
    try:
        mpi = find()
        if a.which:
            print(f"{mpi.name} ({mpi.kind}): {mpi.path}")
            return 0
        rest = a.python_argv[1:] if a.python_argv[:1] == ["--"] else a.python_argv
        if not rest:
            raise ConfigError("nothing to run: give the python arguments, e.g. -m mpipar.run mlp")
        hostfile = None
        if a.hostfile:
            text = mpi.hostfile(parse_hostfile(Path(a.hostfile).read_text()))
            # named by its content: relaunches reuse it instead of leaving one file per launch
            digest = hashlib.sha256(text.encode()).hexdigest()[:12]
            hostfile = Path(os.environ.get("TMPDIR", "/tmp")) / f"mpipar-hosts-{mpi.kind}-{digest}"
            hostfile.write_text(text)
        cmd = mpi.command(a.np, rest, hostfile=hostfile, oversubscribe=not a.no_oversubscribe)
        env = {**mpi.environment(not a.no_oversubscribe, a.iface), **os.environ}
    except (ConfigError, OSError) as e:
        print(f"mpipar.launcher: {e}", file=sys.stderr)
        return 2
    print(f"mpipar launch via {mpi.name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    if a.dry_run:
        return 0
    os.execve(cmd[0], cmd, env)
    return 0   # not reached


if __name__ == "__main__":
    sys.exit(main())
