"""What a case file needs at collection, before any case runs: the size of the job it runs in, so
that cases parametrized by rank count collect only their own parameters (none is skipped)."""
import os


def size() -> int:
    """COMM_WORLD's size, from the launcher's environment (Open MPI, hydra) or else from MPI."""
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if var in os.environ:
            return int(os.environ[var])
    from mpi4py import MPI
    return MPI.COMM_WORLD.Get_size()
