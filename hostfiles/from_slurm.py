"""Write a hostfile for the current SLURM allocation, for launchers that cannot read SLURM
themselves (an MPI built without SLURM support, mpirun over ssh/rsh, MPICH's hydra -f).

    python hostfiles/from_slurm.py > hostfile              # inside salloc/sbatch
    python hostfiles/from_slurm.py --slots 8 --format hydra
    python hostfiles/from_slurm.py --nodelist 'node[01-03],gpu7' --tasks-per-node '4(x3),2'

Slots per node come from $SLURM_TASKS_PER_NODE (else $SLURM_JOB_CPUS_PER_NODE, else 1);
`--slots N` sets them all.  Pure Python: no scontrol needed.
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import sys


def split_top_level(text: str) -> list[str]:
    """'a[1-2,4],b' -> ['a[1-2,4]', 'b']: commas inside brackets belong to the range."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth != 0:
        raise ValueError(f"unbalanced brackets in node list {text!r}")
    parts.append(cur)
    return [p for p in parts if p]


def expand_range(body: str) -> list[str]:
    """'01-03,7' -> ['01', '02', '03', '7'] (zero padding kept, as SLURM does)."""
    out = []
    for item in body.split(","):
        lo, _, hi = item.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"bad range {item!r} in [{body}]")
        width = len(lo) if lo.startswith("0") else 0
        for n in range(int(lo), int(hi or lo) + 1):
            out.append(str(n).zfill(width))
    return out


def expand_nodelist(text: str) -> list[str]:
    """SLURM's compressed host list -> host names in order: 'rack[1-2]-n[01-02],login' -> 5 names."""
    hosts = []
    for item in split_top_level(text.strip()):
        pieces = re.split(r"(\[[^\]]*\])", item)
        choices = [expand_range(p[1:-1]) if p.startswith("[") else [p] for p in pieces if p]
        hosts.extend("".join(c) for c in itertools.product(*choices))
    return hosts


def expand_counts(text: str) -> list[int]:
    """'2(x3),1' -> [2, 2, 2, 1]  ($SLURM_TASKS_PER_NODE / $SLURM_JOB_CPUS_PER_NODE syntax)."""
    out = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise ValueError(f"bad count {item!r} in {text!r}")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


def hostfile(hosts: list[str], slots: list[int], fmt: str = "openmpi") -> str:
    """fmt: openmpi ('host slots=N'), hydra ('host:N', MPICH and Intel MPI), or auto (the MPI
    this Python's mpiexec is, as mpipar.launcher detects it)."""
    if len(slots) != len(hosts):
        raise ValueError(f"{len(hosts)} hosts but {len(slots)} slot counts")
    from mpipar.launcher import MPIExec, find
    mpi = find() if fmt == "auto" else MPIExec("openmpi" if fmt == "openmpi" else "mpich", "mpiexec")
    return mpi.hostfile(list(zip(hosts, slots)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodelist", default=os.environ.get("SLURM_JOB_NODELIST"), help="default $SLURM_JOB_NODELIST")
    p.add_argument("--tasks-per-node", default=os.environ.get("SLURM_TASKS_PER_NODE")
                   or os.environ.get("SLURM_JOB_CPUS_PER_NODE"), help="default $SLURM_TASKS_PER_NODE")
    p.add_argument("--slots", type=int, default=None, help="the same number of slots on every node")
    p.add_argument("--format", choices=["auto", "openmpi", "hydra"], default="auto",
                   help="openmpi: 'host slots=N'; hydra (MPICH, Intel MPI): 'host:N'; auto (default): the "
                        "format of the mpiexec this Python finds")
    args = p.parse_args(argv)
    if not args.nodelist:
        p.error("no node list: run inside a SLURM allocation or pass --nodelist")
    hosts = expand_nodelist(args.nodelist)
    if args.slots is not None:
        slots = [args.slots] * len(hosts)
    elif args.tasks_per_node:
        slots = expand_counts(args.tasks_per_node)
    else:
        slots = [1] * len(hosts)
    sys.stdout.write(hostfile(hosts, slots, args.format))
    return 0


if __name__ == "__main__":
    sys.exit(main())
