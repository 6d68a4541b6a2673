"""ULFM (MPI user-level fault mitigation): keep going when a rank dies, by revoking the
communicator, agreeing on what failed and shrinking to the survivors. The only place that
touches those MPI calls. Needs Open MPI 5 started with `mpirun --with-ft ulfm`."""
from __future__ import annotations

import os

from . import mpi
from .mpi import MPI

from .world import World

FAILURE_CLASSES = {getattr(MPI, n) for n in ("ERR_PROC_FAILED", "ERR_PROC_FAILED_PENDING", "ERR_REVOKED")
                   if hasattr(MPI, n)}


class ProcessFailed(RuntimeError):
    """A peer of this communicator died (or another rank revoked the communicator after seeing it)."""


def has_api() -> bool:
    return all(hasattr(MPI.Comm, n) for n in ("Revoke", "Shrink", "Agree", "Ack_failed", "Get_failed"))


def enabled() -> bool:
    """True when this job runs with fault tolerance on (Open MPI: mpirun --with-ft ulfm)."""
    flag = os.environ.get("OMPI_MCA_mpi_ft_enable", "").strip().lower()
    return has_api() and flag in ("1", "true", "yes", "on") and "Open MPI" in MPI.Get_library_version()


def status() -> str:
    """One line for the banner: what this MPI offers."""
    lib = MPI.Get_library_version().splitlines()[0].strip()
    if "Open MPI" not in lib:
        return (f"ULFM: off ({lib[:40]}: mpipar survives a dead rank in place only under Open MPI 5 with "
                f"mpirun --with-ft ulfm; here the supervisor relaunches from the last checkpoint)")
    if not has_api():
        return (f"ULFM: unavailable ({lib} via mpi4py "
                f"{__import__('mpi4py').__version__} has no MPI_Comm_revoke/shrink/agree)")
    if not enabled():
        return "ULFM: available but off (launch with mpirun --with-ft ulfm to survive a dead rank)"
    return "ULFM: on (a dead rank is survived by revoke, agree, shrink)"


def resilient(world: World, name: str | None = None) -> World:
    """A duplicate of `world` whose errors come back as exceptions instead of aborting the job."""
    comm = world.comm.Dup()
    comm.Set_errhandler(MPI.ERRORS_RETURN)
    return World(comm, name=name or world.name, policy=world.policy)


def is_failure(exc: BaseException) -> bool:
    return isinstance(exc, MPI.Exception) and exc.Get_error_class() in FAILURE_CLASSES


class failures:
    """`with failures(): ...` turns an MPI process-failure error into ProcessFailed."""

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        if exc is not None and is_failure(exc):
            raise ProcessFailed(exc.Get_error_string()) from None
        return False


def agree(world: World, ok: bool) -> bool:
    """Uniform AND of `ok` over the live ranks: every survivor gets the same answer, even if a
    rank died during the step (failures are acknowledged, then the agreement is retried)."""
    for _ in range(3):
        try:
            return bool(world.comm.Agree(int(ok)))
        except MPI.Exception as e:
            if not is_failure(e):
                raise
            world.comm.Ack_failed()
            ok = False
    return False


def failed_world_ranks(world: World) -> list[int]:
    """COMM_WORLD ranks of the members of `world` known to have failed."""
    world.comm.Ack_failed()
    group = world.comm.Get_failed()
    ranks = list(range(group.Get_size()))
    out = MPI.Group.Translate_ranks(group, ranks, MPI.COMM_WORLD.Get_group()) if ranks else []
    group.Free()
    return sorted(int(r) for r in out)


def shrink(world: World) -> World:
    """Revoke `world` (so every survivor stops using it) and return the survivors' World."""
    try:
        world.comm.Revoke()
    except MPI.Exception:
        pass
    comm = world.comm.Shrink()
    comm.Set_errhandler(MPI.ERRORS_RETURN)
    mpi.skip_finalize()   # a finalize would wait on the dead rank
    return World(comm, name=world.name, policy=world.policy)
