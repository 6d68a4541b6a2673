"""Rank 1 waits for a message rank 0 never sends: the watchdog must end the job, and not before
its time. First rank 0 answers a receive of rank 1's after DELAY seconds, less than the
watchdog's STALL: that wait must pass unreported. Then rank 1 waits for ACT mb=7, which never
comes: the report must name that wait and say it waited at least STALL seconds.
Arguments: STALL DELAY (seconds; default 4 1)."""
import sys
import time

import torch

from mpipar.comm import Kind, World, failure, tag

STALL, DELAY = (float(a) for a in (sys.argv[1:3] if len(sys.argv) > 2 else ("4", "1")))
world = World()
failure.install(world.host)
world.barrier()                    # both ranks here (imports done) before anything is timed
failure.start_watchdog(STALL, world.host)
if world.rank == 1:
    t0 = time.monotonic()
    world.recv(0, tag(Kind.ACT, 1))
    print(f"rank 1: ACT mb=1 arrived after {time.monotonic() - t0:.1f} s", flush=True)
    world.recv(0, tag(Kind.ACT, 7))
else:
    time.sleep(DELAY)
    world.send(torch.ones(3), 1, tag(Kind.ACT, 1))
    time.sleep(60)
