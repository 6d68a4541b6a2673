"""N "hosts" on one machine as Linux network namespaces joined by a bridge, so tests run mpirun
--hostfile over real TCP between hosts and can cut a host's cable.

Each host is namespace PREFIX+hI with `eth0` = 10.200.0.I/24; the bridge lives in its own namespace
(PREFIX+sw), so the root namespace is untouched and concurrent test runs (other prefixes) do not
collide.  `write_rsh_agent` writes the ssh stand-in Open MPI uses to start its daemons "on" a host.
"""
from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from mpipar import launcher

SUBNET = "10.200.0.0/24"
_instances = itertools.count()

RSH_AGENT = """#!/bin/sh
# ssh stand-in for Open MPI: AGENT [-ssh-options] HOST COMMAND... runs COMMAND "on" HOST, i.e. in
# HOST's network namespace with HOST as its hostname (a fresh UTS namespace).
while [ $# -gt 0 ]; do case "$1" in -*) shift;; *) break;; esac; done
host=${1%%.*}; shift
case "$host" in 10.200.0.*) host={prefix}h${host##*.};; esac
exec ip netns exec "$host" unshare --uts sh -c "hostname $host; $*"
"""


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()}")
    return p


def unavailable(reason: str, what: str) -> None:
    """Skip the test with `reason`, or fail it under CI=true: a CI runner that cannot build the
    hosts (or SLURM) must say so, not pass quietly, unless MPIPAR_ALLOW_SKIP=1 says it may."""
    import pytest
    print(f"{what}: cannot run: {reason}", file=sys.stderr)
    ci = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
    if ci and os.environ.get("MPIPAR_ALLOW_SKIP", "") != "1":
        pytest.fail(f"{what} cannot run under CI=true (set MPIPAR_ALLOW_SKIP=1 to allow a skip): {reason}")
    pytest.skip(reason)


def why_unavailable() -> str | None:
    """None when this process may create network namespaces; else the reason to skip."""
    if os.geteuid() != 0:
        return "creating network namespaces (ip netns add) needs root"
    try:
        probe = f"mpiparprobe{os.getpid()}"
        sh("ip", "netns", "add", probe)
        sh("ip", "netns", "del", probe)
    except (OSError, RuntimeError) as e:
        return f"cannot create network namespaces here: {e}"
    return None


class Hosts:
    """`with Hosts(3) as hosts:` -> hosts.names == ['<p>h1', '<p>h2', '<p>h3'], torn down on exit."""

    def __init__(self, n: int, prefix: str | None = None):
        self.n = n
        self.prefix = prefix or f"mpp{os.getpid()}x{next(_instances)}"
        self.names = [f"{self.prefix}h{i}" for i in range(1, n + 1)]
        self.switch = f"{self.prefix}sw"
        self.agent: Path | None = None
        self.hostfile: Path | None = None

    def __enter__(self) -> "Hosts":
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> None:
        sw = self.switch
        sh("ip", "netns", "add", sw)
        sh("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", sw, "link", "set", "br0", "up")
        for i, ns in enumerate(self.names, 1):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", sw, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "-n", sw, "link", "set", f"p{i}", "master", "br0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "addr", "add", f"10.200.0.{i}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")

    def sysctl(self, key: str, value: str) -> None:
        """Set a (network-namespaced) kernel knob on every host, e.g. net.ipv4.tcp_retries2."""
        path = "/proc/sys/" + key.replace(".", "/")
        for ns in self.names:
            sh("ip", "netns", "exec", ns, "sh", "-c", f"echo {value} > {path}")

    def address(self, name: str) -> str:
        return f"10.200.0.{self.names.index(name) + 1}"

    def cut(self, name: str) -> None:
        """Unplug the host's cable at the switch: its packets go nowhere, nobody is told."""
        sh("ip", "-n", self.switch, "link", "set", f"p{self.names.index(name) + 1}", "down")

    def pids(self, name: str | None = None) -> list[int]:
        """Processes living in one host's namespace (or in any of them)."""
        out = []
        for ns in [name] if name else [*self.names, self.switch]:
            p = sh("ip", "netns", "pids", ns, check=False)
            out += [int(x) for x in p.stdout.split()]
        return out

    def down(self, grace: float = 5) -> list[int]:
        """Kill every process left in the namespaces, delete them; returns the pids that were left."""
        left = self.pids()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.1)
        for ns in [*self.names, self.switch]:
            sh("ip", "netns", "del", ns, check=False)
        return left

    def write_rsh_agent(self, path: Path) -> Path:
        """The ssh stand-in for these hosts (Open MPI: PRTE_MCA_plm_ssh_agent=path); kept as .agent."""
        path.write_text(RSH_AGENT.replace("{prefix}", self.prefix))
        path.chmod(0o755)
        self.agent = path
        return path

    def write_hostfile(self, path: Path, slots: list[int]) -> Path:
        """A hostfile naming these hosts, in the format of this Python's MPI; kept as .hostfile."""
        path.write_text(launcher.find().hostfile(list(zip(self.names, slots))))
        self.hostfile = path
        return path

    def run_on(self, name: str) -> list[str]:
        """Command prefix that runs a program "on" host `name` (its netns and hostname)."""
        return ["ip", "netns", "exec", name, "unshare", "--uts", "sh", "-c", 'hostname "$0"; exec "$@"', name]


class HostJob:
    """`python ARGV...` under mpirun started on the first host (--hostfile, the rsh agent, TCP
    between hosts only). Output goes to files: a pipe held open by an unreachable host's
    processes would block the reader forever."""

    def __init__(self, hosts: Hosts, workdir: Path, np: int, argv: list[str], env: dict | None = None,
                 cwd: Path | None = None):
        self.out, self.err = workdir / "stdout.txt", workdir / "stderr.txt"
        mpi = launcher.find()
        full = {**os.environ, **(env or {}), **mpi.remote_env(hosts.agent, "eth0", SUBNET)}
        cmd = [*hosts.run_on(hosts.names[0]), *mpi.command(np, argv, hostfile=hosts.hostfile, oversubscribe=False)]
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=full, cwd=cwd, start_new_session=True)

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def wait_for(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.stdout():
            assert self.proc.poll() is None, f"job ended before printing {needle!r}:\n{self.report()}"
            assert time.monotonic() < deadline, f"no {needle!r} after {timeout} s:\n{self.report()}"
            time.sleep(0.2)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"mpirun still running after {timeout} s:\n{self.report()}") from None

    def kill(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=5)
                return
            except ProcessLookupError:
                return
            except subprocess.TimeoutExpired:
                continue

    def report(self) -> str:
        return f"stdout:\n{self.stdout()[-2500:]}\nstderr:\n{self.stderr()[-2500:]}"


@contextmanager
def hosts_up(workdir: Path, slots: list[int], what: str, tcp_retries2: str = "6"):
    """Hosts with `slots` ranks each, a hostfile naming them and the rsh agent; every namespace
    deleted afterwards. Unavailable: skipped, or failed under CI=true. tcp_retries2 = 6: a dead
    peer with unacknowledged data is given up after ~25 s (the default 15 takes ~15 min)."""
    reason = why_unavailable()
    if reason:
        unavailable(reason, what)
    h = Hosts(len(slots))
    try:
        h.up()
        h.sysctl("net.ipv4.tcp_retries2", tcp_retries2)
        h.write_rsh_agent(workdir / "netns-rsh")
        h.write_hostfile(workdir / "hostfile", slots)
        yield h
    finally:
        left = h.down()
        assert not any(Path(f"/run/netns/{ns}").exists() for ns in [*h.names, h.switch])
        if left:
            print(f"teardown killed leftover pids {left}", file=sys.stderr)
