"""Rank 1 waits for a message rank 0 never sends: the watchdog must end the job."""
import time

from mpipar.comm import Kind, World, failure, tag

world = World()
failure.install(world.host)
failure.start_watchdog(2.0, world.host)
if world.rank == 1:
    world.recv(0, tag(Kind.ACT, 7))
else:
    time.sleep(60)
