"""The examples' "## Checked outputs" table (examples/README.md) is complete and parses; one example
runs through `python -m mpipar.run` under the launcher as a process of its own. Every example's short
form, with its metric and single-process parity, runs in tests/mpi/cases_examples.py (one mpirun
job per rank count instead of one per example)."""
from __future__ import annotations

import re

import pytest

from checked_outputs import OWN_JOB, README, TABLE, Checked, argv_of, check_short_form, checked_outputs
from mpipar.app import registry
from mpirun import mpirun


@pytest.mark.smoke
def test_an_example_runs_as_its_own_job(tmp_path):
    """dp-cifar as users start it (python -m mpipar.run under mpirun), with --compare (its only
    short-form run: cases_examples.py leaves it out)."""
    p = mpirun(TABLE[OWN_JOB].ranks, "-m", "mpipar.run", *argv_of(OWN_JOB, tmp_path), timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    check_short_form(OWN_JOB, p.stdout, tmp_path)


def test_every_example_has_a_section_and_a_checked_row():
    text = README.read_text()
    sections = set(re.findall(r"^## `([a-z0-9-]+)`", text, re.M))
    names = set(registry.available())
    assert names - sections == set(), f"examples/README.md lacks a section for {sorted(names - sections)}"
    assert sections - names == set(), f"examples/README.md has sections for unknown {sorted(sections - names)}"
    assert names - set(TABLE) == set(), f"no checked row for {sorted(names - set(TABLE))}"
    assert set(TABLE) <= names, f"rows for unknown examples: {sorted(set(TABLE) - names)}"
    for row in TABLE.values():
        assert row.tol > 0 and row.ranks >= 1 and "--compare" not in row.argv, row


def test_checked_outputs_parser():
    text = ("# x\n## Checked outputs\n\n| example | ranks | short form | metric | expected |\n|---|---:|---|---|---|\n"
            "| `a-b` | 4 | `--epochs 1 --steps 5` | `test_rmse` | 0.5 ± 0.02 |\n"
            "| `c` | 2 | `--epochs 1` | micro-F1 | 2.0 ± 5% |\n\n## next\n| `d` | 1 | `` | m | 1 ± 1 |\n")
    rows = checked_outputs(text)
    assert sorted(rows) == ["a-b", "c"]
    assert rows["a-b"] == Checked("a-b", 4, ("--epochs", "1", "--steps", "5"), "test_rmse", 0.5, 0.02)
    assert rows["c"].tol == pytest.approx(0.1) and rows["c"].holds(2.09) and not rows["c"].holds(2.11)
