"""The command line's parallel modes against single-process training of the same model, seed and
batches (tests/parity.py: every rank's saved parameters, each replica and tensor-parallel shard,
and the reported losses), in one mpirun job per rank count: each case parses a command line as
`python -m mpipar.run` does and runs it on this job's World. Data parallelism composed with pipeline
stages, pp x dp x tp with the stage boundary between a column- and a row-parallel layer, ZeRO
stages 1-3 through the Trainer, the GCN on Cora cut into sub-graphs, the QM9 GNN on pp x dp.
`python -m mpipar.run` as a process of its own is checked for parity by test_run, test_dp and
test_pipeline."""
import pytest
import torch
from torch import nn

import mpipar
from api_case import CASES as API_CASES, check as check_api
from parity import check_saved, saving
import job

NP = (3, 4, 8)
TIMEOUT = 420


PP2 = ["--balance", "4,4", "--microbatches", "2", "--schedule", "1f1b"]
ZERO = ["--steps", "30", "--epochs", "1", "--clip-grad", "0.05"]
# Cora: dropout off (each rank draws its own masks, so only dropout-free runs can equal one
# process); lr 1e-3: RMSprop divides by the root mean square, which turns the float rounding of
# summing micro-batches (not of MPI: two micro-batches in one process do the same) on a near-zero
# gradient element into an lr-sized step; at the default lr 0.01 one weight of 45856 drifts 1.1e-5
# in 5 steps, measured, at 1e-3 all stay within 2e-7.
CORA = ["--epochs", "6", "--dropout", "0", "--lr", "0.001"]
QM9 = ["--max-molecules", "800", "--hidden", "16", "--depth", "2", "--batch-size", "32"]

CONFIGS = {   # name: (ranks, argv, what the run must also print)
    "pp2xdp2": (4, ["mlp", "--grid", "pp=2,dp=2", "--balance", "4,4", "--microbatches", "2", "--steps", "20",
                    "--epochs", "1", "--bucket-mb", "0.05"], ["pp=2 dp=2"]),
    # pp=2 x dp=2 x tp=2: sharded activations cross the pipeline (--balance 3,5), 1F1B, clipping
    # by the global norm (shards summed over tp, replicated gradients counted once)
    "pp2xdp2xtp2": (8, ["mlp", "--grid", "pp=2,dp=2,tp=2", "--balance", "3,5", "--microbatches", "2",
                        "--schedule", "1f1b", "--steps", "20", "--epochs", "1", "--clip-grad", "0.05"],
                    ["pp=2 dp=2 tp=2"]),
    # --zero 1|2|3: Adam's state (2: and the gradients, reduced per bucket once both micro-batches
    # have accumulated; 3: and the parameters, gathered per layer) sharded over the replicas, an
    # uneven last batch on 3 replicas, clipping by the global norm over stages and shards
    "zero1-dp3": (3, ["mlp", "--grid", "dp=3", "--zero", "1", *ZERO], ["ZeRO stage 1 over", "pp=1 dp=3"]),
    "zero1-pp2xdp2": (4, ["mlp", "--grid", "pp=2,dp=2", "--zero", "1", *ZERO, *PP2], ["ZeRO stage 1 over", "pp=2 dp=2"]),
    "zero2-pp2xdp2": (4, ["mlp", "--grid", "pp=2,dp=2", "--zero", "2", *ZERO, *PP2], ["ZeRO stage 2 over", "pp=2 dp=2"]),
    "zero3-pp2xdp2": (4, ["mlp", "--grid", "pp=2,dp=2", "--zero", "3", *ZERO, *PP2], ["ZeRO stage 3 over", "pp=2 dp=2"]),
    "cora-pp4-1f1b": (4, ["pipeline-gcn-cora", "--schedule", "1f1b", "--microbatches", "2", *CORA],
                      ["(pp=4 dp=1 tp=1)", "2 micro-batch(es) per batch", "test accuracy"]),
    # replicas take 2 sub-graphs each, cut into 2 micro-batches of one
    "cora-pp2xdp2": (4, ["pipeline-gcn-cora", "--grid", "pp=2,dp=2", "--microbatches", "2", *CORA],
                     ["(pp=2 dp=2 tp=1)"]),
    "qm9-pp2xdp2": (4, ["hybrid-dp-gnn-qm9", "--epochs", "1", "--steps", "20", *QM9],
                    ["(pp=2 dp=2 tp=1)", "mean-predictor baseline", " D (train MAE"]),
    # the CNN cut over 4 stages, CIFAR-10's shipped subset (moved from test_run: its own job)
    "split-cnn-pp4": (4, ["split-cnn", "--epochs", "1", "--steps", "20", "--batch-size", "32", "--width", "8",
                          "--n-train", "640"], ["test accuracy", "samples/s"]),
}


@pytest.mark.parametrize("name", [k for k, (n, _, _) in CONFIGS.items() if n == job.size()])
def test_equals_single_process(world, name, mpi_tmp_path):
    _, argv, needles = CONFIGS[name]
    out = mpi_tmp_path / name
    printed = job.run(world, saving(out, argv))   # every rank's parameters are on disk after it
    check_saved(out, world.size, argv, ranks=[world.rank])
    if world.rank == 0:
        missing = [n for n in needles if n not in printed]
        assert not missing, f"{name}: the run did not print {missing}\n{printed[-2000:]}"


@pytest.mark.mpi(min_size=8)
@pytest.mark.parametrize("case", [c for c, spec in API_CASES.items() if spec[0] == job.size() == 8])
def test_public_api_on_8_ranks_equals_single_process(world, case):
    """tests/mpi/cases_api.py's pp=2 x dp=2 x tp=2 case (a user's own TP module), in this file's
    8-rank job rather than one of its own."""
    check_api(case, world)


@pytest.mark.mpi(min_size=3)
def test_zero3_with_shards_shorter_than_the_microbatches_equals_single_process(world):
    """Pipeline(data_parallel=zero 3) on dp=N (3, 4, 8), microbatches=4, 101 samples in batches of 24:
    the last batch's shards (3 ranks: 2/2/1) hold fewer samples than micro-batches, unevenly. Each micro-batch
    gathers the weights (a collective over the replicas), so every replica runs the same number:
    before, the replicas ran 2/2/1 and hung. RMSprop with momentum, float64."""
    topo = mpipar.init(grid="dp", stall_timeout=20, world=world)     # a regression: a StallError, not a hang
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 24), nn.SiLU(), nn.Linear(24, 1))
        ref = nn.Sequential(nn.Linear(5, 24), nn.SiLU(), nn.Linear(24, 1))
        ref.load_state_dict(model.state_dict())
        g = torch.Generator().manual_seed(1)
        x_all, y_all = torch.randn(101, 5, generator=g), torch.randn(101, 1, generator=g)
        pipe = mpipar.Pipeline(model, topo, microbatches=4, loss_fn=nn.L1Loss(),
                               data_parallel=mpipar.DataParallelOptions(zero=3))
        opt = pipe.make_optimizer(torch.optim.RMSprop, lr=1e-3, momentum=0.5, alpha=0.9)
        ropt = torch.optim.RMSprop(ref.parameters(), lr=1e-3, momentum=0.5, alpha=0.9)
        mine, theirs = [], []
        for (x, y), (fx, fy) in zip(mpipar.batches((x_all, y_all), 24, topo), mpipar.batches((x_all, y_all), 24)):
            opt.zero_grad()
            pipe.step(x, y)
            opt.step()
            mine.append(pipe.global_loss())
            ropt.zero_grad()
            loss = nn.functional.l1_loss(ref(fx), fy)
            loss.backward()
            ropt.step()
            theirs.append(loss.item())
        assert len(mine) == 5 and len(x) < 4      # the last step's shard was shorter than the micro-batches
        with opt.gathered():
            got = {k: v.clone() for k, v in pipe.state_dict().items()}
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(got[k], v, msg=lambda m: f"rank {world.rank}: {k}: {m}")
        torch.testing.assert_close(mine, theirs)
    finally:
        torch.set_default_dtype(dtype)
