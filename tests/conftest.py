"""Suite-wide: tests/ on the import path (mpirun.py, parity.py, checked_outputs.py), and the two
marked sets besides smoke:

- `per_mpi`: what differs between Open MPI, MPICH and Intel MPI (the launcher's commands,
  environments and hostfiles; how an abort, a stall, a killed rank and a relaunch surface; shared
  windows and the native collectives our own are checked against; SLURM and multi-host launches).
  CI runs the whole suite under Open MPI and this set (with smoke) under MPICH.
- `quick`: a few minutes that touch every package (README, "Contributing"): the in-process
  modules below whole, and the multi-rank cases a case file names in its QUICK.
"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

PER_MPI_MODULES = {"test_launcher", "test_run", "test_fault", "test_slurm", "test_multihost", "test_hier_hosts",
                   "test_readme_api", "test_dashboard"}
PER_MPI_CASE_FILES = {"comm", "ring"}
QUICK_MODULES = {"test_layering", "test_packaging", "test_rankmap", "test_schedules", "test_balance",
                 "test_comm_logic", "test_hier_layout", "test_buckets", "test_metrics", "test_realtime",
                 "test_data", "test_launcher", "test_tensor", "test_checkpoint", "test_async_ps", "test_ring",
                 "test_devices", "test_examples", "test_guards"}
NOT_QUICK = {   # the tests of those modules that launch jobs (the quick set's jobs: its QUICK cases)
    "test_resume_with_tensor_parallel_shards", "test_zero_stage2_resumes_bit_identical_and_on_another_dp_size",
    "test_bad_input_ends_with_one_line", "test_local_sh_runs_an_example", "test_an_example_runs_as_its_own_job",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if getattr(item, "module", None) else ""
        case = getattr(item, "callspec", None) and item.callspec.params.get("case")
        if module in PER_MPI_MODULES or (module == "test_mpi_cases" and getattr(case, "topic", None) in PER_MPI_CASE_FILES):
            item.add_marker(pytest.mark.per_mpi)
        if module in QUICK_MODULES and item.originalname not in NOT_QUICK:
            item.add_marker(pytest.mark.quick)
