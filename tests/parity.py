"""The parity check every parallel mode shares: run an example under mpirun with --save-params,
train the same model single-process, and require equal parameters (assert_close)."""
import torch

from mpipar.run import parse
from mpipar.session import reference_model
from mpirun import mpirun


def check_parity(tmp_path, np_, argv, timeout=240):
    """Run argv on np_ ranks; compare every saved stage's parameters with single-process training.
    Returns the run's stdout."""
    save = tmp_path / "params"
    p = mpirun(np_, "-m", "mpipar.run", *argv, "--save-params", str(save), "--out", str(tmp_path / "out"),
               timeout=timeout)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    args, example = parse(argv)
    train, _ = example.data(args)
    ref = reference_model(example, example.layers(args), train, args).state_dict()
    got = {}
    for f in sorted(save.glob("stage*.pt")):
        got.update(torch.load(f, weights_only=True))
    assert sorted(got) == sorted(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], msg=lambda m: f"{k}: {m}")
    return p.stdout
