"""The graph examples of issue 7 under mpirun: the GraphSAGE PPI examples (synthetic data) train
and report micro-F1, the partitioned table equals single-process training; pipeline-gcn-cora
reaches the accuracy the README states. (QM9 hybrid pp=2 x dp=2 against single-process training
after 20 steps: tests/mpi/cases_parity.py, qm9-pp2xdp2.)"""
import json
import re

import torch

from mpirun import mpirun

torch.set_num_threads(1)
QM9_SMALL = ["--max-molecules", "800", "--hidden", "16", "--depth", "2", "--batch-size", "32"]
PPI_SMALL = ["--epochs", "1", "--steps", "3", "--pairs", "2000", "--eval-nodes", "500"]


def run_ok(tmp_path, np_, *argv):
    p = mpirun(np_, "-m", "mpipar.run", *argv, "--out", str(tmp_path), timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(r["samples_per_s"] > 0 for r in rows)
    return next(ln for ln in p.stdout.splitlines() if ln.startswith("summary:"))


def test_qm9_model_parallel_reports_mae(tmp_path):
    line = run_ok(tmp_path, 2, "hybrid-gnn-qm9", "--epochs", "1", "--steps", "3", *QM9_SMALL)
    assert "(pp=2 dp=1 tp=1)" in line and "test MAE" in line and "baseline" in line, line


def test_graphsage_hybrid_grid_reports_f1_and_synthetic(tmp_path):
    """SAGE layers split over 2 stages, each replicated twice (the table gradient goes dense for the ring)."""
    line = run_ok(tmp_path, 4, "graphsage-ppi", "--grid", "pp=2,dp=2", *PPI_SMALL)
    assert "micro-F1" in line and "epochs/s" in line and "SYNTHETIC" in line, line


def test_dp_graphsage_reports_f1_and_synthetic(tmp_path):
    line = run_ok(tmp_path, 2, "dp-graphsage-ppi", *PPI_SMALL)
    assert "(pp=1 dp=2 tp=1)" in line and "micro-F1" in line and "SYNTHETIC" in line, line
    assert "graph partitioned over 2 replicas" in line and "MiB per step per rank" in line, line


def test_partitioned_graphsage_equals_single_process(tmp_path):
    """dp-graphsage-ppi with the graph partitioned over 3 replicas (each owning a third of the
    nodes' features and table rows, the rest fetched by message, table gradients returned to
    their owners): with table dropout off (its masks are drawn per rank), every parameter after
    10 steps equals single-process training -- the table reassembled from the ranks' rows -- and
    micro-F1 is within 0.01 of the single-process run's."""
    from mpipar.app.run import parse
    from mpipar.app.session import reference_model
    argv = ["dp-graphsage-ppi", *PPI_SMALL, "--steps", "10", "--table-dropout", "0", "--hidden", "64"]
    save = tmp_path / "params"
    line = run_ok(tmp_path / "dp", 3, *argv, "--save-params", str(save))
    ranks = [torch.load(save / f"rank{r}.pt", weights_only=True) for r in range(3)]
    args, example = parse(argv)
    train, _ = example.data(args)
    ref = reference_model(example, example.layers(args), train, args).state_dict()
    got = {k: (torch.cat([r[k] for r in ranks]) if k == "input.table.weight" else ranks[0][k]) for k in ref}
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], msg=lambda m: f"{k}: {m}")
    alone = run_ok(tmp_path / "one", 1, "graphsage-ppi", *argv[1:])
    f1 = [float(re.search(r"micro-F1 ([\d.]+)", s).group(1)) for s in (line, alone)]
    assert abs(f1[0] - f1[1]) <= 0.01, (line, alone)


def test_pipeline_gcn_cora_reaches_the_readme_accuracy(tmp_path):
    """The README's "test accuracy ≈ 0.81" for pipeline-gcn-cora with its defaults (100 epochs,
    4 sub-graphs, 4 micro-batches; here 2 stages, 1F1B): the mean test accuracy of the last 10
    epochs is within 0.02 of it (measured 0.803-0.817 over 8 runs; dropout draws are unseeded)."""
    summary = run_ok(tmp_path, 2, "pipeline-gcn-cora", "--schedule", "1f1b")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    mean = sum(r["test_accuracy"] for r in rows[-10:]) / 10
    assert rows[-1]["epoch"] == 100 and "4 micro-batch(es)" in summary and abs(mean - 0.81) <= 0.02, (mean, summary)
