"""Multi-rank test cases: one pytest test per (case file, rank count, case), e.g.
`test_case[ring[8]::test_bf16_sum_accumulates_in_float32]`, each run on every rank of an mpirun.

How to add cases
----------------
Write `tests/mpi/cases_<topic>.py` (the `cases_` prefix is what this file looks for; not
`test_*.py`, so a plain pytest run never collects it by itself and nothing shows up as skipped):

    import pytest

    NP = (1, 2, 4, 8)        # rank counts: one mpirun of the file per count (required)
    TIMEOUT = 240            # optional: this file's share, in seconds, of its job's hard limit (default 240)
    STALL_TIMEOUT = 60       # optional: a rank waiting this long for a message ends the job (default 60)
    QUICK = {2: ("test_something",)}   # optional: (rank count: cases) in `pytest -m quick`

    def test_something(world):           # `world`: mpipar World of COMM_WORLD (tests/mpi/conftest.py)
        ...                              # plain asserts: pytest rewrites this file's, even under -O

    @pytest.mark.mpi(min_size=4)         # pytest-mpi's mark: generated only for the NP entries >= 4
    def test_needs_four_ranks(world): ...

Cases are plain top-level `def test_*` functions, found here by reading the file's syntax tree
(this process imports neither the file nor torch nor mpi4py); NP, TIMEOUT and min_size must be
literals. `@pytest.mark.parametrize` works: the outer test then covers all of the parameters and
names the failing ones. Fixtures work as usual (module-scoped ones are made once per job, on
every rank, in the same order). Every rank runs every case, in file order; a case may do
different things per rank (return early on ranks with nothing to do) but must end on every rank,
within STALL_TIMEOUT (+15 s) of the others: each case is followed by a barrier. Keep cases
independent of each other: after an abort the remaining cases run in a fresh job. For a folder
all ranks share, use pytest-mpi's `mpi_tmp_path` fixture (new for every run); `tmp_path` is per
rank.

What happens
------------
For each rank count N the first of its tests runs ONE job for every case file that has N in its
NP (a job's start costs N imports of torch and pytest: on 2 cores ~5 s at N=4),
    mpirun -np N python -m mpi4py -m pytest --with-mpi tests/mpi/cases_<a>.py tests/mpi/cases_<b>.py ...
(only the selected cases when -k, -m or node ids picked some), under a hard timeout (the sum of
those files' TIMEOUTs; then the job's whole process group is killed); the other tests read its
results. On every rank tests/mpi/conftest.py records each case's outcome and traceback in a
JSON-lines file. A test here passes only if its case passed on every rank; otherwise it shows
the failing ranks' tracebacks (and which ranks passed). An uncaught error aborts all ranks
(python -m mpi4py); a rank left waiting for a failed peer is ended by mpipar's stall watchdog (the
largest STALL_TIMEOUT of the job's files; or, if it waits where the watchdog does not look, by
the barrier after the case); the case that was running then fails with the job's output tail,
and the cases after it run in a fresh job (up to MAX_RELAUNCHES times, within 2 x the timeout in
all). Cases of different files share a process: a case that changes process-wide state (torch's
default dtype, thread count) restores it. The first test of each job prints the job's timing (-rP).

By hand, from the repository root (one-machine settings: tests/mpirun.py ENV):
    . .venv/bin/activate
    mpirun -np 4 --oversubscribe python -m mpi4py -m pytest --with-mpi -q -p no:cacheprovider tests/mpi/cases_dp.py
"""
from __future__ import annotations

import ast
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mpirun import MPI_DIR, ROOT, mpirun

DEFAULT_TIMEOUT = 240.0
TAIL = 4000
# inner pytest: no shared cache, no pytest-timeout (the job has its own), output that also reaches
# mpirun's (so a rank's last words before an abort are in the job's output tail)
INNER_OPTIONS = ("-q", "-p", "no:cacheprovider", "-o", "addopts=", "-o", "timeout=0", "-o",
                 "console_output_style=classic", "--color=no", "--capture=tee-sys", "--rootdir", str(ROOT))


# -- discovery (static: the outer process never imports a case file, torch or mpi4py) ------------

@dataclass(frozen=True)
class Case:
    path: Path
    topic: str
    np: int
    name: str
    timeout: float
    error: str = ""     # the file could not be read: this pseudo-case reports why
    quick: bool = False  # named in the file's QUICK: part of `pytest -m quick`

    @property
    def id(self) -> str:
        return f"{self.topic}[{self.np}]::{self.name}" if self.np else f"{self.topic}::{self.name}"


def _literal(tree: ast.Module, name: str):
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
            return ast.literal_eval(node.value)
    return None


def _min_size(fn: ast.FunctionDef) -> int:
    """`@pytest.mark.mpi(min_size=K)` (or `@mark.mpi(...)`) -> K, else 1."""
    for dec in fn.decorator_list:
        if isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute) and dec.func.attr == "mpi":
            for kw in dec.keywords:
                if kw.arg == "min_size":
                    return int(ast.literal_eval(kw.value))
    return 1


def discover(folder: Path = MPI_DIR) -> list[Case]:
    cases = []
    for path in sorted(folder.glob("cases_*.py")):
        topic = path.stem[len("cases_"):]
        try:
            tree = ast.parse(path.read_text(), str(path))
            nps = _literal(tree, "NP")
            if isinstance(nps, int):
                nps = (nps,)
            if not nps or not all(isinstance(n, int) and n >= 1 for n in nps):
                raise ValueError(f"{path.name} needs a module constant NP = (ranks, ...), got {nps!r}")
            timeout = float(_literal(tree, "TIMEOUT") or DEFAULT_TIMEOUT)
            quick = _literal(tree, "QUICK") or {}
            fns = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                   and n.name.startswith("test")]
            if not fns:
                raise ValueError(f"{path.name} has no top-level test_* function")
        except (SyntaxError, ValueError, TypeError) as e:
            cases.append(Case(path, topic, 0, "discovery", DEFAULT_TIMEOUT, f"{type(e).__name__}: {e}"))
            continue
        for n in nps:
            cases.extend(Case(path, topic, n, fn.name, timeout, quick=fn.name in quick.get(n, ()))
                         for fn in fns if _min_size(fn) <= n)
        unknown = {(n, name) for n, names in quick.items() for name in names} - {(c.np, c.name) for c in cases}
        if unknown:
            cases.append(Case(path, topic, 0, "discovery", DEFAULT_TIMEOUT,
                              f"QUICK names cases that do not exist: {sorted(unknown)}"))
    return cases


CASES = discover()


# -- one job per rank count ----------------------------------------------------------------------

MAX_RELAUNCHES = 3 + len({c.path for c in CASES})   # a job may hold every file's cases

@dataclass
class Verdict:
    outcome: str          # passed | failed | skipped
    message: str


def _key(case: Case) -> str:
    """A case as pytest names it without parameters: `tests/mpi/cases_dp.py::test_x`."""
    return f"{case.path.relative_to(ROOT).as_posix()}::{case.name}"


def _timeout(cases) -> float:
    return sum({c.path: c.timeout for c in cases}.values())


@dataclass
class Job:
    np: int
    cases: list[Case]     # the selected cases of this rank count, in file order
    root: Path
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)

    def run(self) -> None:
        timeout = _timeout(self.cases)
        todo, launch, deadline = [_key(c) for c in self.cases], 0, time.monotonic() + 2 * timeout
        everything = set(todo) == {_key(c) for c in CASES if c.np == self.np and not c.error}
        files = list(dict.fromkeys(k.split("::")[0] for k in todo))
        while todo:
            out = self.root / f"launch{launch}"
            limit = min(timeout, deadline - time.monotonic())
            args = files if (launch == 0 and everything) else todo
            t0 = time.monotonic()
            try:
                p = mpirun(self.np, "-m", "mpi4py", "-m", "pytest", "--with-mpi", *INNER_OPTIONS, *args,
                           timeout=limit, env={"MPIPAR_CASES_OUT": str(out)})
                rc = p.returncode
                tail = f"exit {rc}\nstdout:\n{p.stdout[-TAIL:]}\nstderr:\n{p.stderr[-TAIL:]}"
            except AssertionError as e:    # tests/mpirun.py: hung past the limit, group killed
                rc, tail = None, str(e)[-2 * TAIL:]
            ranks = read_records(out, self.np)
            self.log.append(f"launch {launch}: {'all' if args is files else len(args)} case(s), "
                            f"{'hung, killed' if rc is None else f'exit {rc}'} after {time.monotonic() - t0:.1f} s")
            finished = all(any(r["event"] == "end" for r in recs) for recs in ranks)
            started = set()
            for key in todo:
                v = judge(key, ranks, tail)
                if v is not None:
                    self.verdicts[key] = v
                    started.add(key)
            todo = [k for k in todo if k not in started]
            collect_error = next((r for recs in ranks for r in recs if r["event"] == "collect-error"), None)
            if collect_error or finished or not started or launch >= MAX_RELAUNCHES \
                    or deadline - time.monotonic() < 30:
                why = (f"collection failed on rank {collect_error['rank']}:\n{collect_error['longrepr']}"
                       if collect_error else "the job ended without starting this case")
                for key in todo:
                    self.verdicts[key] = Verdict("failed", f"not run: {why}\n{tail}")
                return
            launch += 1    # the job died inside a case: run the cases after it in a fresh job


def read_records(out: Path, np_: int) -> list[list[dict]]:
    ranks = []
    for r in range(np_):
        f = out / f"rank{r}.jsonl"
        recs = []
        if f.exists():
            for line in f.read_text().splitlines():
                try:
                    recs.append(json.loads(line))
                except json.JSONDecodeError:   # a line cut short by the abort
                    pass
        ranks.append(recs)
    return ranks


def _function(nodeid: str) -> str:
    """`tests/mpi/cases_x.py::test_y[p]` -> `tests/mpi/cases_x.py::test_y` (a case's _key)."""
    return nodeid.split("[", 1)[0]


def judge(key: str, ranks: list[list[dict]], tail: str) -> Verdict | None:
    """The case's verdict from every rank's records; None if no rank started it."""
    name = key.split("::", 1)[1]
    starts = [{r["nodeid"] for r in recs if r["event"] == "start" and _function(r["nodeid"]) == key} for recs in ranks]
    dones = [{r["nodeid"]: r for r in recs if r["event"] == "done" and _function(r["nodeid"]) == key}
             for recs in ranks]
    if not any(starts):
        return None
    ids = sorted(set().union(*starts))
    n = len(ranks)
    failures, unfinished, seconds, cut_short = [], [], 0.0, False
    for nodeid in ids:
        failed = [(q, d[nodeid]) for q, d in enumerate(dones) if nodeid in d and d[nodeid]["outcome"] == "failed"]
        missing = [q for q, d in enumerate(dones) if nodeid not in d]
        seconds = max([seconds] + [d[nodeid]["seconds"] for d in dones if nodeid in d])
        label = nodeid.split("::", 1)[-1]
        cut_short = cut_short or bool(missing)
        if failed:
            passed_on = [q for q, d in enumerate(dones) if nodeid in d and d[nodeid]["outcome"] != "failed"]
            head = f"{label} FAILED on rank(s) {_ranks([q for q, _ in failed])} of {n}"
            if passed_on:
                head += f" (passed on {_ranks(passed_on)})"
            if missing:
                head += f" (rank(s) {_ranks(missing)} never finished it)"
            shown, texts = [], {}
            for q, d in failed:   # one traceback per distinct text, with the ranks that gave it
                key = re.sub(r"\brank \d+\b|0x[0-9a-f]+", "", d["text"])
                texts.setdefault(key, (d["text"], []))[1].append(q)
            for text, qs in list(texts.values())[:3]:
                shown.append(f"--- rank {_ranks(qs)} ---\n{text}")
            failures.append(head + "\n" + "\n".join(shown))
        elif missing:
            how = "the job was killed after its time limit" if "hung for" in tail else "the job aborted"
            unfinished.append(f"{label}: rank(s) {_ranks(missing)} of {n} never finished it ({how})")
    if failures or unfinished:
        msg = "\n\n".join(failures + unfinished)
        if cut_short:   # the job ended inside this case: its output says how
            msg += f"\n\n--- job output ---\n{tail}"
        return Verdict("failed", msg)
    outcomes = {d[i]["outcome"] for d in dones for i in ids}
    if outcomes == {"skipped"}:
        return Verdict("skipped", next(iter(dones[0].values()))["text"] or "skipped on every rank")
    return Verdict("passed", f"{name}: passed on {n} ranks ({len(ids)} item(s)), slowest rank {seconds:.2f} s")


def _ranks(qs) -> str:
    return ", ".join(map(str, qs))


_JOBS: dict[int, Job] = {}


def job_for(case: Case, session, tmp_path_factory) -> Job:
    if case.np not in _JOBS:
        selected = [it.callspec.params["case"] for it in session.items
                    if getattr(it, "callspec", None) and isinstance(it.callspec.params.get("case"), Case)]
        cases = [c for c in selected if c.np == case.np and not c.error]
        job = Job(case.np, cases, tmp_path_factory.mktemp(f"np{case.np}"))
        _JOBS[case.np] = job
        t0 = time.monotonic()
        job.run()
        topics = ", ".join(dict.fromkeys(c.topic for c in cases))
        print(f"[{case.np}] ranks: {len(cases)} case(s) of {topics} in {time.monotonic() - t0:.1f} s; "
              + "; ".join(job.log))
    return _JOBS[case.np]


GROUP_TIMEOUT = {n: _timeout([c for c in CASES if c.np == n]) for n in {c.np for c in CASES}}


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.timeout(2 * GROUP_TIMEOUT[c.np] + 90)]
                                               + ([pytest.mark.quick] if c.quick else []))
                                  for c in CASES])
def test_case(case: Case, request, tmp_path_factory):
    if case.error:
        pytest.fail(f"{case.path.relative_to(ROOT)}: {case.error}", pytrace=False)
    v = job_for(case, request.session, tmp_path_factory).verdicts.get(_key(case))
    if v is None:
        pytest.fail(f"{case.id}: the harness has no result for this case", pytrace=False)
    if v.outcome == "passed":
        print(v.message)
    if v.outcome == "skipped":
        pytest.skip(v.message)
    if v.outcome != "passed":
        job = _JOBS[case.np]
        pytest.fail(f"{case.id}:\n{v.message}\n\n(the job: {'; '.join(job.log)})", pytrace=False)
