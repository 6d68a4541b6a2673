"""checkpoint: per-rank shards with a manifest, atomic and verified, restart from the newest good
one on any grid, fault injection, a relaunching supervisor and (with ULFM) surviving a dead rank.

Nothing here imports mpi4py at import time: the supervisor process must not start MPI.
"""
from __future__ import annotations

DEFAULT_KEEP = 3
