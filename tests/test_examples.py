"""Every example runs under mpirun for a few steps, prints its summary, writes metrics, and (with
--compare) trains the same steps single-process: the largest train-loss gap it reports must be
float rounding. pipeline-gcn-cora is the exception (its dropout draws differ per rank); its
accuracy is checked in tests/test_graph_examples.py."""
import json
import re

import pytest

from mpipar import registry
from mpirun import mpirun

# Small settings per example so the whole sweep stays short; others get the default.
SMOKE = {
    "mlp": (4, ["--epochs", "1", "--steps", "5"]),
    "split-cnn": (4, ["--epochs", "1", "--steps", "3", "--n-train", "256"]),
    "pipeline-cifar": (4, ["--epochs", "1", "--steps", "3", "--n-train", "256", "--width", "8"]),
    "pipeline-gcn-cora": (2, ["--epochs", "3"]),
    "layerwise-lstm-appliances": (4, ["--epochs", "1", "--steps", "3"]),
    "realtime-mp-accel": (4, ["--epochs", "1", "--steps", "3"]),
    "transformer-split": (2, ["--epochs", "1", "--steps", "3", "--max-number", "999"]),
}
DEFAULT = (2, ["--epochs", "1", "--steps", "3"])
# Examples run by their own test modules already (test_run, test_tensor, test_transformer_split,
# test_graph_examples, test_async_ps): not launched twice.
CUSTOM = {"async-gcn-cora", "hybrid-dp-gnn-qm9", "mlp", "split-cnn", "tp-mlp", "tp-transformer",
          "transformer-split", "hybrid-gnn-qm9", "graphsage-ppi", "dp-graphsage-ppi"}


NOT_BITWISE = {"pipeline-gcn-cora"}   # dropout: each rank draws its own masks
GAP = 1e-5                           # measured: 0 to 3.2e-7 over these runs


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.smoke) if n == "dp-cifar" else n
                                  for n in registry.available() if n not in CUSTOM])
def test_example_runs_and_equals_single_process(tmp_path, name):
    np_, argv = SMOKE.get(name, DEFAULT)
    p = mpirun(np_, "-m", "mpipar.run", name, *argv, "--compare", "--out", str(tmp_path), timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "summary:" in p.stdout, p.stdout[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(r["samples_per_s"] > 0 for r in rows)
    gap = re.search(r"largest train-loss gap to single process: (\S+)\)", p.stdout)
    assert gap and (tmp_path / "learning_curves.png").is_file(), p.stdout[-2000:]
    if name not in NOT_BITWISE:
        assert float(gap.group(1)) < GAP, gap.group(0)
