"""The parity check every parallel mode shares: run an example under mpirun with --save-params,
train the same model single-process, and require equal parameters on EVERY rank (each replica
and each tensor-parallel shard, gathered) and equal reported losses (assert_close)."""
import json

import torch

from mpipar.app.run import parse
from mpipar.app.session import reference_model
from mpipar.train.metrics import error_metric, summarize
from mpipar.train.reference import evaluate
from mpirun import mpirun


def check_parity(tmp_path, np_, argv, timeout=240):
    """Run argv on np_ ranks; compare every rank's saved parameters and the run's reported train
    and test losses with single-process training. Returns the run's stdout."""
    p = mpirun(np_, "-m", "mpipar.run", *saving(tmp_path, argv), timeout=timeout)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    check_saved(tmp_path, np_, argv)
    return p.stdout


def saving(tmp_path, argv) -> list[str]:
    """argv with every rank's parameters saved and the metrics written under tmp_path."""
    return [*argv, "--save-params", str(tmp_path / "params"), "--out", str(tmp_path / "out")]


def check_saved(tmp_path, np_, argv, ranks=None):
    """What a run of `saving(tmp_path, argv)` on np_ ranks left, against single-process training:
    the saved parameters of `ranks` (default: every rank, each replica and tensor-parallel shard)
    and, when rank 0 is among them, the stages' parameters and the reported losses."""
    save = tmp_path / "params"
    ranks = range(np_) if ranks is None else ranks
    args, example = parse(argv)
    train, test = example.data(args)
    rows, error = [], error_metric(example.loss())

    def record(model, epoch, tally):   # what the run reports, computed single-process
        rows.append({**summarize(tally.vector(), example.task, "train", error),
                     **summarize(evaluate(model, example.loss(), example.task, test, args.batch_size),
                                 example.task, "test", error)})

    ref = reference_model(example, example.layers(args), train, args, on_epoch=record).state_dict()
    assert len(sorted(save.glob("rank*.pt"))) == np_, sorted(save.glob("rank*.pt"))
    for r in ranks:   # every replica and shard, not only the first of each stage
        f = save / f"rank{r}.pt"
        for k, v in torch.load(f, weights_only=True).items():
            torch.testing.assert_close(v, ref[k], msg=lambda m: f"{f.name}: {k}: {m}")
    if 0 not in ranks:
        return
    got = {}
    for f in sorted(save.glob("stage*.pt")):
        got.update(torch.load(f, weights_only=True))
    assert sorted(got) == sorted(ref)
    reported = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(reported) == len(rows) == args.epochs
    for got_row, want_row in zip(reported, rows):   # losses (and rmse), accuracies to within a sample or two
        for key, want in want_row.items():
            tol = dict(rtol=0.0, atol=0.005) if key.endswith("accuracy") else dict(rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(got_row[key], want, **tol, msg=lambda m: f"reported {key}: {m}")
