"""checkpoint: per-rank shards with a manifest, atomic and verified, restart from the newest good
one on any grid, and fault injection (the relaunching supervisor is mpipar/supervise.py; surviving
a dead rank with ULFM is mpipar/train/survive.py).

    store.py         the directory: step folders, atomic files, the manifest, pruning
    state.py         what a rank saves: parameters, optimizer and scheduler state, RNG (no pickle)
    restart.py       choosing, verifying and loading a checkpoint, resharding, export
    checkpointer.py  the Trainer callback: when to save, background writes, the commit protocol
    fault.py         injected rank kills, remembered across relaunches

Nothing here starts MPI: the supervisor process imports it without a World.
"""
from __future__ import annotations

DEFAULT_KEEP = 3
