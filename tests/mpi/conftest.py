"""The inside of the per-case MPI harness (see tests/test_mpi_cases.py): active only under
`mpirun -np N python -m mpi4py -m pytest --with-mpi tests/mpi/cases_<topic>.py`, inert otherwise
(the suite's own pytest run may import this file while walking tests/; it touches nothing then).

On every rank it
- starts MPI the library's way (mpipar.comm.World) and installs mpipar's failure discipline;
- starts mpipar's stall watchdog (the case file's STALL_TIMEOUT, default 60 s): a rank that waits
  longer than that for a message ends the whole job with a one-line report instead of a hang;
- ends every case with a barrier on a private communicator, so no rank starts case i+1 while
  another is still in case i: a case that fails on one rank while the others wait for it in a
  collective shows up as *that* case (the barrier, too, gives up after STALL_TIMEOUT + 15 s and
  aborts, for ranks stuck where the watchdog does not look);
- writes one JSON line per event to $MPIPAR_CASES_OUT/rank<R>.jsonl when the outer harness set it
  ("start" and "done" per case with outcome and traceback, "collect-error", "end"), and gives each
  rank its own --basetemp under that folder.

Fixtures: `world` (mpipar World of COMM_WORLD, one per session). For a folder every rank sees,
use pytest-mpi's `mpi_tmp_path` (rank 0's tmp_path, broadcast).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

OUT_ENV = "MPIPAR_CASES_OUT"
STALL_DEFAULT = 60.0   # seconds; a case file may set STALL_TIMEOUT
SYNC_GRACE = 15.0      # the barrier after a case waits this much longer than the watchdog, so a
                       # rank stuck in a message wait is reported by the watchdog (what, from whom)
TAIL = 6000            # characters of a traceback / captured output kept per record


def _active(config) -> bool:
    return bool(config.getoption("--with-mpi", False) or config.getoption("--only-mpi", False))


class CaseSync:
    """Per-rank state of the harness (registered as a plugin when active)."""

    def __init__(self, config):
        from mpipar.comm import World, failure   # before mpi4py.MPI: MPI starts the library's way
        self.failure = failure
        self.world = World()
        failure.install(self.world.host)
        from mpi4py import MPI
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD.Dup()   # the harness's own barriers never meet a case's messages
        self.rank, self.size = self.world.rank, self.world.size
        self.stall = STALL_DEFAULT
        self.reports = []
        self.log = None
        out = os.environ.get(OUT_ENV)
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            self.log = open(Path(out) / f"rank{self.rank}.jsonl", "a", buffering=1)
            if not config.option.basetemp:   # concurrent ranks never share (or clean up) a tmp dir
                (Path(out) / f"rank{self.rank}").mkdir(exist_ok=True)
                config.option.basetemp = str(Path(out) / f"rank{self.rank}" / "tmp")
        self.record("begin", size=self.size, pid=os.getpid(), host=self.world.host)

    # -- records ------------------------------------------------------------------------------
    def record(self, event: str, **fields) -> None:
        if self.log is not None:
            self.log.write(json.dumps({"event": event, "rank": self.rank, "t": time.time(), **fields}) + "\n")
            self.log.flush()
            os.fsync(self.log.fileno())

    # -- the barrier after each case ----------------------------------------------------------
    def sync(self, what: str) -> None:
        """Every rank reaches this point, or the job ends: sleep-polled, so waiting ranks leave
        their core to the ones still working (this box runs more ranks than cores)."""
        req = self.comm.Ibarrier()
        start = time.monotonic()
        pause = 1e-4
        while not req.Test():
            waited = time.monotonic() - start
            if waited > self.stall + SYNC_GRACE:
                msg = (f"rank {self.rank} ({self.world.host}): CaseStall: finished {what} {waited:.0f} s ago, "
                       f"other ranks are still inside it (STALL_TIMEOUT {self.stall:g} s + {SYNC_GRACE:g} s); "
                       f"aborting the job")
                self.record("stall", nodeid=what, message=msg)
                sys.stderr.write(msg + "\n")
                sys.stderr.flush()
                self.MPI.COMM_WORLD.Abort(5)
            time.sleep(pause)
            pause = min(pause * 2, 0.005)

    # -- hooks ----------------------------------------------------------------------------------
    def pytest_collectreport(self, report):
        if report.failed:
            self.record("collect-error", nodeid=report.nodeid, longrepr=str(report.longrepr)[-TAIL:])

    def pytest_collection_finish(self, session):
        stalls = {getattr(item.module, "STALL_TIMEOUT", STALL_DEFAULT) for item in session.items
                  if getattr(item, "module", None) is not None}
        self.stall = float(max(stalls, default=STALL_DEFAULT))
        self.failure.start_watchdog(self.stall, self.world.host)
        self.record("collected", nodeids=[item.nodeid for item in session.items], stall=self.stall)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        self.reports = []
        self.record("start", nodeid=item.nodeid)
        t0 = time.perf_counter()
        yield
        seconds = time.perf_counter() - t0
        outcome, text = "passed", ""
        failed = [r for r in self.reports if r.failed]
        skipped = [r for r in self.reports if r.skipped]
        if failed:
            outcome = "failed"
            parts = []
            for r in failed:
                parts.append(f"[{r.when}] {r.longreprtext}"[-TAIL:])
                for name, content in r.sections:
                    if content.strip():
                        parts.append(f"--- {name} ---\n{content[-TAIL // 3:]}")
            text = "\n".join(parts)
        elif skipped:
            outcome = "skipped"
            r = skipped[0]
            text = (r.longrepr[2] if isinstance(r.longrepr, tuple) else str(r.longrepr))[-TAIL:]
        self.record("done", nodeid=item.nodeid, outcome=outcome, seconds=seconds, text=text)
        self.sync(item.nodeid)

    def pytest_runtest_logreport(self, report):
        self.reports.append(report)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session, exitstatus):
        self.sync("the session")   # nobody's exit (an abort when cases failed) cuts a peer short
        self.record("end", exitstatus=int(exitstatus))
        if self.log is not None:
            self.log.close()
            self.log = None


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if _active(config) and not config.pluginmanager.has_plugin("mpipar-case-sync"):
        config.pluginmanager.register(CaseSync(config), "mpipar-case-sync")


@pytest.fixture(scope="session")
def world(request):
    """The mpipar World of COMM_WORLD (the one the harness made)."""
    plugin = request.config.pluginmanager.get_plugin("mpipar-case-sync")
    if plugin is None:
        pytest.fail("tests/mpi cases run under mpirun ... python -m mpi4py -m pytest --with-mpi")
    return plugin.world
