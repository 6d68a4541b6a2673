"""allreduce-hosts: the all-reduce across emulated hosts with capped links -- ours (auto: the
hierarchical all-reduce where a host holds several ranks), ours without host awareness (flat),
ours with bf16 on the wire (--grad-compress bf16), native MPI_Allreduce and torch gloo, measured
side by side in each job, against the link limit; with --step, dp-cifar's training step instead
(ours, ours+bf16, torch DDP on gloo: python -m mpipar.bench dp-step).

    sudo python -m mpipar.bench allreduce-hosts [--configs 2x2,3x2,4x1] [--rate 1gbit]
                                                [--sizes 64K,1M,4M,16M,64M] [--rounds 5]
    sudo python -m mpipar.bench allreduce-hosts --step --configs 2x2 [--width 16] [--batch 32]
    sudo python -m mpipar.bench allreduce-hosts --configs 2x2 --job "-m mpipar.run dp-cifar --grad-compress bf16"

Not run under mpirun: it is the launcher. For each config HxL it builds H hosts (Linux network
namespaces on a bridge; needs root), caps each host's link at --rate both ways with `tc tbf`, and
starts `python -m mpipar.bench allreduce` on H·L ranks (mpirun --hostfile from the first host,
TCP between hosts, shared memory within one), which alternates the implementations round by
round. Link limit: with H hosts any all-reduce moves at least 2(H-1)/H·S bytes over each host's
link each way, so no run can beat 2(H-1)/H·S/rate; "of limit" is that time over the measured
one, and link GB/s = 2(H-1)/H·S / time (bytes per second on each link, each way).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import dp_step
from ..launcher import find
from .allreduce import human_bytes

SUBNET = "10.200.0.0/24"
CONFIGS = "2x2,3x2,4x1"
SIZES = "64K,256K,1M,4M,16M,64M"
RATE_UNITS = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bit": 1.0}
AGENT = """#!/bin/sh
# ssh stand-in for Open MPI: AGENT [-options] HOST COMMAND... runs COMMAND in HOST's namespace
while [ $# -gt 0 ]; do case "$1" in -*) shift;; *) break;; esac; done
host=${1%%.*}; shift
case "$host" in 10.200.0.*) host=PREFIXh${host##*.};; esac
exec ip netns exec "$host" unshare --uts sh -c "hostname $host; $*"
"""


def rate_bits(rate: str) -> float:
    """tc's rate syntax ('1gbit', '500mbit') in bits per second."""
    r = rate.strip().lower()
    for unit, scale in sorted(RATE_UNITS.items(), key=lambda kv: -len(kv[0])):
        if r.endswith(unit):
            return float(r[:-len(unit)]) * scale
    raise ValueError(f"rate {rate!r}: use tc's syntax, e.g. 1gbit or 500mbit")


def sh(*cmd: str) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {p.stderr.strip()}")


class Hosts:
    """H namespaces h1..hH (10.200.0.i) on a bridge in its own namespace, links capped by tbf."""

    def __init__(self, n: int, rate: str, burst: str, tag: str):
        self.prefix = f"mpb{os.getpid()}{tag}"
        self.names = [f"{self.prefix}h{i}" for i in range(1, n + 1)]
        self.switch = f"{self.prefix}sw"
        self.rate, self.burst = rate, burst

    def __enter__(self):
        try:
            sh("ip", "netns", "add", self.switch)
            sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
            sh("ip", "-n", self.switch, "link", "set", "br0", "up")
            for i, ns in enumerate(self.names, 1):
                sh("ip", "netns", "add", ns)
                sh("ip", "-n", self.switch, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
                sh("ip", "-n", self.switch, "link", "set", f"p{i}", "master", "br0", "up")
                sh("ip", "-n", ns, "link", "set", "lo", "up")
                sh("ip", "-n", ns, "addr", "add", f"10.200.0.{i}/24", "dev", "eth0")
                sh("ip", "-n", ns, "link", "set", "eth0", "up")
                for where, dev in ((ns, "eth0"), (self.switch, f"p{i}")):   # out of and into the host
                    sh("ip", "netns", "exec", where, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
                       "rate", self.rate, "burst", self.burst, "latency", "50ms")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for ns in [*self.names, self.switch]:
                p = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
                for pid in p.stdout.split():
                    try:
                        os.kill(int(pid), sig)
                    except ProcessLookupError:
                        pass
            time.sleep(0.5)
        for ns in [*self.names, self.switch]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def run_config(hosts: int, per_host: int, args, workdir: Path, tag: str) -> dict:
    """One mpirun of the allreduce benchmark over `hosts` x `per_host` ranks; its JSON rows."""
    out = workdir / f"{hosts}x{per_host}.json"
    with Hosts(hosts, args.rate, args.burst, tag) as h:
        agent = workdir / "rsh"
        agent.write_text(AGENT.replace("PREFIX", h.prefix))
        agent.chmod(0o755)
        mpi = find()
        hostfile = workdir / "hostfile"
        hostfile.write_text(mpi.hostfile([(n, per_host) for n in h.names]))
        env = {**os.environ, **mpi.environment(oversubscribed=True),
               **mpi.remote_env(agent, "eth0", SUBNET, tcp_only=False),
               "OMP_NUM_THREADS": "1", "MASTER_ADDR": "10.200.0.1", "GLOO_SOCKET_IFNAME": "eth0",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                           os.environ.get("PYTHONPATH")]))}
        if mpi.kind == "openmpi":
            env["OMPI_MCA_btl"] = args.btl
        if args.job:
            argv = shlex.split(args.job)
        elif args.step:
            argv = ["-m", "mpipar.bench", "dp-step"]
            for name in dp_step.FLAGS:
                value, flag = getattr(args, name), f"--{name.replace('_', '-')}"
                argv += ([flag] if value else []) if isinstance(value, bool) else [flag, str(value)]
        else:
            argv = ["-m", "mpipar.bench", "allreduce", "--sizes", args.sizes, "--rounds", str(args.rounds),
                    "--out", str(out), "--extra", ",".join(extras(per_host, args))]
            if args.no_gloo:
                argv.append("--no-gloo")
        cmd = ["ip", "netns", "exec", h.names[0], "unshare", "--uts", "sh", "-c", 'hostname "$0"; exec "$@"',
               h.names[0], *mpi.command(hosts * per_host, argv, hostfile=hostfile, oversubscribe=False)]
        t0 = time.monotonic()
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
        if p.returncode:
            raise RuntimeError(f"{hosts}x{per_host}: mpirun exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
        if args.step or args.job:
            return {"wall": time.monotonic() - t0, "text": p.stdout.strip()}
        data = json.loads(out.read_text())
        data["wall"] = time.monotonic() - t0
        return data


def extras(per_host: int, args) -> list[str]:
    """Our other algorithms timed beside auto: flat (blind to hosts) where a host has several
    ranks, auto with bf16 on the wire (--grad-compress; unless --no-compress), plus --extra."""
    more = [a for a in args.extra.split(",") if a]
    mine = (["flat"] if per_host > 1 else []) + ([] if args.no_compress else ["bf16"])
    return mine + [a for a in more if a not in mine]


def table(hosts: int, per_host: int, data: dict, bits_per_s: float, rate: str) -> str:
    others = [k.split(":", 1)[1] for k in data["rows"][0]["seconds"] if k.startswith("ours:")]
    wires = [a for a in others if a in ("bf16", "fp16")]
    gloo = "gloo" in data["rows"][0]["seconds"]
    head = (f"{'size':>8} {'algo':>8} {'ours ms':>9}" + "".join(f" {a + ' ms':>9}" for a in others)
            + f" {'native ms':>9}" + (f" {'gloo ms':>9}" if gloo else "") + f" {'limit ms':>9}"
            + f" {'ours/nat':>8}" + (f" {'ours/gloo':>9}" if gloo else "") + "".join(f" {'ours/' + a:>9}" for a in others)
            + "".join(f" {w + '/nat':>8}" for w in wires)
            + f" {'ours/lim':>8} {'nat/lim':>7} {'link GB/s':>9}")
    lines = [f"{hosts} hosts x {per_host} ranks, links capped at {rate} each way "
             f"({data['wall']:.0f} s); speed ratios A/B = time of B / time of A (>1: A faster; bf16: ours with --grad-compress bf16), of-limit = limit time / time", head]
    share = 2 * (hosts - 1) / hosts
    for row in data["rows"]:
        b, t = row["bytes"], row["seconds"]
        native = min(t["mpi"], t["mpi_nb"])
        limit = share * b * 8 / bits_per_s
        line = f"{human_bytes(b):>8} {row['algorithm']:>8} {t['ours'] * 1e3:>9.2f}"
        line += "".join(f" {t['ours:' + a] * 1e3:>9.2f}" for a in others)
        line += f" {native * 1e3:>9.2f}"
        if gloo:
            line += f" {t['gloo'] * 1e3:>9.2f}"
        line += f" {limit * 1e3:>9.2f} {native / t['ours']:>8.2f}"
        if gloo:
            line += f" {t['gloo'] / t['ours']:>9.2f}"
        line += "".join(f" {t['ours:' + a] / t['ours']:>9.2f}" for a in others)
        line += "".join(f" {native / t['ours:' + w]:>8.2f}" for w in wires)
        line += f" {limit / t['ours']:>8.2f} {limit / native:>7.2f} {share * b / t['ours'] / 1e9:>9.3f}"
        lines.append(line)
    return "\n".join(lines)


def main(argv) -> int:
    p = argparse.ArgumentParser(prog="python -m mpipar.bench allreduce-hosts", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=CONFIGS, help=f"HOSTSxRANKS, comma-separated (default {CONFIGS})")
    p.add_argument("--sizes", default=SIZES, help=f"float32 byte sizes (default {SIZES})")
    p.add_argument("--rounds", type=int, default=5, help="rounds per size (best is reported)")
    p.add_argument("--rate", default="1gbit", help="each host's link, tc syntax (default 1gbit)")
    p.add_argument("--burst", default="512kb", help="tbf bucket (default 512kb)")
    p.add_argument("--btl", default="sm,tcp,self", help="OMPI_MCA_btl (default sm,tcp,self: native MPI "
                   "uses shared memory within a host, as on a cluster)")
    p.add_argument("--extra", default="", help="also time these algorithms of ours, e.g. ring,halving")
    p.add_argument("--no-gloo", action="store_true", help="skip the torch gloo peer")
    p.add_argument("--no-compress", action="store_true", help="skip ours with bf16 on the wire")
    p.add_argument("--step", action="store_true", help="instead of the all-reduce table: dp-cifar's training "
                   "step, ours vs ours+bf16 vs torch DDP on gloo (python -m mpipar.bench dp-step)")
    p.add_argument("--job", default=None, help="instead: run `python JOB` on the ranks and print what it "
                   "printed, e.g. --job '-m mpipar.run dp-cifar --grad-compress bf16' (split as a shell would "
                   "split it; no shell runs it)")
    dp_step.add_args(p.add_argument_group("--step (python -m mpipar.bench dp-step's flags)"), wait="poll")
    p.add_argument("--timeout", type=float, default=900, help="seconds per config before giving up")
    p.add_argument("--out", default=None, help="also write every config's rows as JSON here")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("allreduce-hosts builds network namespaces: run it as root", file=sys.stderr)
        return 2
    if any(k in os.environ for k in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK")):
        print("allreduce-hosts is the launcher: run it without mpirun", file=sys.stderr)
        return 2
    bits = rate_bits(args.rate)
    configs = [tuple(int(v) for v in c.lower().split("x")) for c in args.configs.split(",")]
    results = {}
    with tempfile.TemporaryDirectory(prefix="mpipar-hosts-") as tmp:
        for i, (h, l) in enumerate(configs):
            work = Path(tmp) / f"c{i}"
            work.mkdir()
            print(f"running {h} hosts x {l} ranks ...", flush=True)
            data = run_config(h, l, args, work, f"x{i}")
            results[f"{h}x{l}"] = data
            if args.step or args.job:
                print(f"{h} hosts x {l} ranks, links capped at {args.rate} each way ({data['wall']:.0f} s)\n"
                      f"{data['text']}", flush=True)
            else:
                print(table(h, l, data, bits, args.rate), flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (on {os.cpu_count()} cores)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rate": args.rate, "configs": results}, f, indent=1)
    return 0
