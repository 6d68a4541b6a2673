"""Every example's short form (examples/README.md, "Checked outputs") in ONE mpirun job per rank
count: each case parses the example's command line as `python -m mpipar.run` does and runs it on
this job's World, then rank 0 checks what it printed and wrote (tests/checked_outputs.py: the
table's metric, and single-process parity with --compare). `python -m mpipar.run` itself, as a
process of its own, is run by tests/test_examples.py (with OWN_JOB's short form, left out here)
and tests/test_run.py."""
import pytest

from checked_outputs import OWN_JOB, TABLE, argv_of, check_short_form
import job

NP = (2, 3, 4)            # the ranks column of the table
TIMEOUT = 420


@pytest.mark.parametrize("name", sorted(n for n, row in TABLE.items() if row.ranks == job.size() and n != OWN_JOB))
def test_short_form(world, name, mpi_tmp_path):
    out = mpi_tmp_path / name
    printed = job.run(world, argv_of(name, out))
    if world.rank == 0:    # the reporting rank: its output and metrics.jsonl
        check_short_form(name, printed, out)
