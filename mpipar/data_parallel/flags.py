"""Command-line flags of data parallelism, added to `python -m mpipar.run`'s parser."""
from __future__ import annotations

import argparse

DEFAULT_BUCKET_MB = 4.0   # tuned with python -m mpipar.bench allreduce --overlap


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bucket-mb", type=float, default=DEFAULT_BUCKET_MB,
                   help=f"data parallel: gradient bucket size in MiB (default {DEFAULT_BUCKET_MB:g}, "
                        f"see python -m mpipar.bench allreduce --overlap)")
    p.add_argument("--allreduce", default="auto", choices=["auto", "ring", "halving", "doubling", "shm", "hier"],
                   help="data parallel: all-reduce algorithm (default auto: by size and placement; "
                        "shm when the dp group shares one host, hier when it spans hosts with "
                        "several ranks on some host)")
    p.add_argument("--dp-check-every", type=int, default=0,
                   help="data parallel: every N steps check replicas are bit-identical (0: never)")
