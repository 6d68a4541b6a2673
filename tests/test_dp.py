"""Synchronous data parallelism from the command line, as a job of its own: `--grid dp=4` against
single-process training with the same global batch, and a model built differently on one rank
ending the job with one clear line instead of a hang. Composition with pipeline stages and tensor
parallelism, and ZeRO 1-3 through the Trainer: tests/mpi/cases_parity.py; DataParallel and its
buckets: tests/mpi/cases_dp.py (both run case by case by tests/test_mpi_cases.py)."""
import pytest
import torch

from mpirun import mpirun
from parity import check_parity

torch.set_num_threads(1)


def test_mismatched_models_end_the_job_with_the_layout_error():
    p = mpirun(2, "tests/mpi/dp_mismatch.py", timeout=90)
    assert p.returncode != 0
    line = next((l for l in p.stderr.splitlines() if "ReplicaMismatchError" in l), "")
    assert "disagree on the gradient layout" in line and "rank 1 has 10 parameters / 3,986 elements" in line, p.stderr[-2000:]


@pytest.mark.smoke
def test_dp4_equals_single_process_with_the_same_global_batch(tmp_path):
    # (uneven shards are checked with SGD in tests/mpi/cases_dp.py: Adam's first steps turn the
    # last-bit differences of a 7-vs-8-sample shard mean into ~1e-4 parameter differences)
    # (--grad-compress casts only what crosses hosts: on one host the result is the same)
    out = check_parity(tmp_path, 4, ["mlp", "--grid", "dp=4", "--steps", "20", "--epochs", "1",
                               "--dp-check-every", "5", "--grad-compress", "bf16"])
    assert "pp=1 dp=4" in out
