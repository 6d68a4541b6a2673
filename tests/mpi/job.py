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


def run(world, argv: list[str]) -> str:
    """A command line run as `python -m mpipar.run` runs it, on this job's `world`, after which
    every rank has finished (its files are on disk); returns what this rank printed (rank 0's
    output is the run's banner, rows and summary)."""
    import contextlib
    import io

    from mpipar.app.run import parse
    from mpipar.app.session import run_example
    args, example = parse(argv)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        run_example(world, example, args)
    world.barrier()
    return printed.getvalue()
