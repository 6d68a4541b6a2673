"""Synchronous data parallelism: the trainer's `--grid dp=D` path against train_reference with
the same global batch (uneven shards included), composition with pipeline stages, and a model
built differently on one rank ending the job with one clear line instead of a hang.
DataParallel/buckets against single-process training: tests/mpi/cases_dp.py, run case by case
by tests/test_mpi_cases.py."""
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


def test_pipeline_stages_with_data_parallel_replicas(tmp_path):
    check_parity(tmp_path, 4, ["mlp", "--grid", "pp=2,dp=2", "--balance", "4,4", "--microbatches", "2",
                         "--steps", "20", "--epochs", "1", "--bucket-mb", "0.05"])


def test_pipeline_x_data_x_tensor_parallel_on_8_ranks(tmp_path):
    """Issue 7: pp=2 x dp=2 x tp=2. Stage boundary between a column- and a row-parallel layer
    (--balance 3,5), so sharded activations cross the pipeline; 1F1B, 2 micro-batches, clipping
    by the global norm (shards summed over tp, replicated gradients counted once)."""
    out = check_parity(tmp_path, 8, ["mlp", "--grid", "pp=2,dp=2,tp=2", "--balance", "3,5", "--microbatches", "2",
                                     "--schedule", "1f1b", "--steps", "20", "--epochs", "1", "--clip-grad", "0.05"],
                       timeout=300)
    assert "pp=2 dp=2 tp=2" in out


PP2 = ["--balance", "4,4", "--microbatches", "2", "--schedule", "1f1b"]


@pytest.mark.parametrize("grid, extra, stage", [("dp=3", [], 1), ("pp=2,dp=2", PP2, 1), ("pp=2,dp=2", PP2, 2),
                                                ("pp=2,dp=2", PP2, 3)],
                         ids=["dp3", "pp2xdp2", "stage2-pp2xdp2", "stage3-pp2xdp2"])
def test_zero_equals_single_process(tmp_path, grid, extra, stage):
    """--zero 1|2|3 through the Trainer: Adam's state (stage 2: and the gradients, reduced per
    bucket in backward once both micro-batches have accumulated; stage 3: and the parameters,
    each layer gathered for each micro-batch's forward and backward) sharded over the replicas,
    parameters all-gathered, clipping by the global norm over stages and shards; 30 Adam steps
    (and an uneven last batch on 3 replicas) equal single-process training."""
    np_ = 3 if grid == "dp=3" else 4
    out = check_parity(tmp_path, np_, ["mlp", "--grid", grid, "--zero", str(stage), "--steps", "30", "--epochs", "1",
                                       "--clip-grad", "0.05", *extra])
    assert f"ZeRO stage {stage} over" in out
    assert f"pp={2 if 'pp' in grid else 1} dp={3 if grid == 'dp=3' else 2}" in out
