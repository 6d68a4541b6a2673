"""The "## Checked outputs" table of examples/README.md, the single source of every example's short
form (ranks, flags, a metric and its expected value with a tolerance), and the checks of one short
run's output: used by tests/mpi/cases_examples.py (every example but OWN_JOB, one mpirun job per
rank count) and tests/test_examples.py (the table itself, and OWN_JOB through `python -m mpipar.run`).

Examples not in CUSTOM also train the same steps single-process (--compare): the largest
train-loss gap it reports must be float rounding. pipeline-gcn-cora is the exception (its dropout
draws differ per rank); its accuracy is checked in tests/mpi/cases_graphs.py. Examples in
CUSTOM keep their parity checks in their own test modules, so they run without --compare."""
from __future__ import annotations

import json
import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path


README = Path(__file__).resolve().parents[1] / "examples" / "README.md"

# Examples whose parity with single-process training is checked by their own test modules (test_run,
# cases_example_runs, cases_transformer_runs, cases_graphs, cases_parity, test_ppi): here only their
# short form's output is checked, without --compare.
CUSTOM = {"async-gcn-cora", "hybrid-dp-gnn-qm9", "mlp", "split-cnn", "tp-mlp", "tp-transformer",
          "transformer-split", "hybrid-gnn-qm9", "graphsage-ppi", "dp-graphsage-ppi"}
SUMMARY = {   # what else a short form's summary line must say
    "dp-graphsage-ppi": ("(pp=1 dp=2 tp=1)", "micro-F1", "SYNTHETIC", "graph partitioned over 2 replicas",
                         "MiB per step per rank"),
    "hybrid-gnn-qm9": ("(pp=2 dp=1 tp=1)", "test MAE", "baseline"),
}
OWN_JOB = "dp-cifar"   # run by tests/test_examples.py as a process of its own, so not again in cases_examples

NOT_BITWISE = {"pipeline-gcn-cora"}   # dropout: each rank draws its own masks
GAP = 1e-5                           # measured: 0 to 3.2e-7 over these runs


@dataclass(frozen=True)
class Checked:
    """One row of the table: `example | ranks | short form | metric | expected`."""
    name: str
    ranks: int
    argv: tuple[str, ...]
    metric: str
    value: float
    tol: float

    def holds(self, got: float) -> bool:
        return math.isfinite(got) and abs(got - self.value) <= self.tol


def checked_outputs(text: str | None = None) -> dict[str, Checked]:
    """The table under "## Checked outputs" in examples/README.md. `expected` is `V ± T` (absolute)
    or `V ± P%` (relative to V)."""
    text = README.read_text() if text is None else text
    section = text.split("\n## Checked outputs", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip().strip("`").strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or cells[0] == "example" or set(cells[0]) <= set("-: "):
            continue
        name, ranks, flags, metric, expected = cells
        value, tol = (s.strip() for s in expected.split("±"))
        v = float(value)
        t = abs(v) * float(tol[:-1]) / 100 if tol.endswith("%") else float(tol)
        assert name not in rows, f"examples/README.md: two rows for {name}"
        rows[name] = Checked(name, int(ranks), tuple(shlex.split(flags)), metric, v, t)
    return rows


TABLE = checked_outputs()


def metric_of(name: str, rows: list[dict], stdout: str, metric: str) -> float:
    """A key of metrics.jsonl's last row, or else `metric NUMBER` in the summary line."""
    if metric in rows[-1]:
        return float(rows[-1][metric])
    summary = next(ln for ln in stdout.splitlines() if ln.startswith("summary:"))
    m = re.search(re.escape(metric) + r"\s*[=:]?\s*(-?[0-9][0-9.e+-]*)", summary)
    assert m, f"{name}: no {metric!r} in the last metrics row {sorted(rows[-1])} nor in {summary!r}"
    return float(m.group(1).rstrip("."))


def argv_of(name: str, out: Path) -> list[str]:
    """`python -m mpipar.run` arguments of an example's short form (with --compare unless CUSTOM)."""
    return [name, *TABLE[name].argv, *([] if name in CUSTOM else ["--compare"]), "--out", str(out)]


def check_short_form(name: str, stdout: str, out: Path) -> float:
    """The run printed its summary (with what SUMMARY lists), wrote metrics rows with a throughput,
    reached the table's metric and (with --compare) stayed within float rounding of single-process
    training."""
    row = TABLE[name]
    summary = next((ln for ln in stdout.splitlines() if ln.startswith("summary:")), None)
    assert summary, stdout[-2000:]
    missing = [needle for needle in SUMMARY.get(name, ()) if needle not in summary]
    assert not missing, f"{name}: the summary line lacks {missing}: {summary}"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(r["samples_per_s"] > 0 for r in rows)
    got = metric_of(name, rows, stdout, row.metric)
    print(f"{name}: {row.metric} {got!r} (expected {row.value} ± {row.tol:.3g})")
    assert row.holds(got), (f"{name} {' '.join(row.argv)}: {row.metric} = {got}, examples/README.md "
                            f"expects {row.value} ± {row.tol:.3g}\n" + stdout[-1500:])
    if name not in CUSTOM:
        gap = re.search(r"largest train-loss gap to single process: (\S+)\)", stdout)
        assert gap and (out / "learning_curves.png").is_file(), stdout[-2000:]
        if name not in NOT_BITWISE:
            assert float(gap.group(1)) < GAP, gap.group(0)
    return got
