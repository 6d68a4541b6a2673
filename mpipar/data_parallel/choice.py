"""Which all-reduce algorithm a vector's size, the rank count and the hosts' layout call for
(`auto`). Pure arithmetic, below both reduce.py (which runs the choice) and hier.py (which
chooses again for each slice that crosses hosts)."""
from __future__ import annotations

DOUBLING_MAX = 64 * 1024       # up to this: recursive doubling (log2 n messages, latency-bound)
RING_MIN = 64 * 2 ** 20        # power-of-two n > 2: halving-doubling below this, the ring from here


def choose_algorithm(nbytes: int, n: int, shared: bool = False, grouped: bool = False,
                     across: bool = False) -> str:
    """By size S and ranks n (measured with `python -m mpipar.bench allreduce` on 2-8 ranks):
    'doubling' up to DOUBLING_MAX: log2 n whole-vector swaps, the fewest hand-offs;
    'halving' (Rabenseifner) for power-of-two n > 2 below RING_MIN: the ring's 2(n-1)/n·S bytes
    in 2·log2 n hand-offs instead of 2(n-1), which wins wherever ranks share cores and every
    hand-off may wait for the peer to be scheduled (4 ranks, 16 MiB: ~1.1x the ring's speed);
    'ring' otherwise: on 2 ranks halving is the ring without pieces; for other n halving
    would first fold whole vectors; from RING_MIN pieces keep the adds cache-hot past the L3.
    'shm' when every rank shares one host (`shared`), at any size on 3+ ranks and past
    DOUBLING_MAX on 2 (where one swap is as cheap as two barriers): reduce straight out of the
    peers' memory (shm.py), fewer copies and one barrier per piece instead of 2(n-1) hand-offs
    (4 ranks: 1.4x native MPI_Allreduce at 64 KiB, 1.8x at 4 MiB).
    'hier' when the ranks span hosts and some host holds several (`grouped`), at any size:
    one vector per host crosses the links instead of one per rank (hier.py), which wins
    wherever a link is slower than a host's memory (see python -m mpipar.bench allreduce-hosts).
    `across` (the ranks span hosts): no 'halving' -- its unpipelined rounds leave a capped link
    idle between rounds (4 hosts x 1 rank at 1 Gbit/s, 16 MiB: the ring reached 0.87 of the link
    limit, halving 0.46-0.55); the ring streams pieces without pause."""
    if n == 1:
        return "none"
    if grouped and not shared:
        return "hier"
    if shared and (n > 2 or nbytes > DOUBLING_MAX):
        return "shm"
    if nbytes <= DOUBLING_MAX:
        return "doubling"
    if n > 2 and n & (n - 1) == 0 and nbytes < RING_MIN and not across:
        return "halving"
    return "ring"
