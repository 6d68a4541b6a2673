"""Activity recognition on real WISDM v1.1 phone-accelerometer features: a data-parallel MLP, test users unseen."""
import torch
from torch import nn

from mpipar.app.datasets import load_wisdm
from mpipar.app.datasets.cache import cached
from mpipar.app.example import Example
from mpipar.model import LayerSpec


def hidden(n_in, n_out):
    return lambda: nn.Sequential(nn.Linear(n_in, n_out), nn.ReLU())


def layers(args):
    h = args.hidden
    return [LayerSpec("fc1", hidden(43, h)), LayerSpec("fc2", hidden(h, h)),
            LayerSpec("head", lambda: nn.Linear(h, 6))]


def data(args):
    return cached(("wisdm", args.data_dir), lambda: load_wisdm(args.data_dir))


def report(last, train, test, args):
    """The accuracy only means something next to the floor of always answering the train set's
    commonest class."""
    top = int(torch.bincount(train.y).argmax())
    floor = float((test.y == top).float().mean())
    return (f"test accuracy {last['test_accuracy']:.3f} vs majority-class baseline {floor:.3f} "
            f"(always {train.meta['classes'][top]})")


def add_args(p):
    p.add_argument("--hidden", type=int, default=64, help="width of the two hidden layers")


EXAMPLE = Example(
    name="wisdm-har",
    summary="MLP on WISDM v1.1 accelerometer features (43 per window, 6 activities), replicas on every rank, "
            "AdamW + cross-entropy, test accuracy on unseen users vs majority class",
    layers=layers,
    data=data,
    loss=nn.CrossEntropyLoss,
    optimizer=lambda params, args: torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2),
    task="classification",
    defaults=dict(grid="dp", balance=None, epochs=10, batch_size=64, lr=1e-3),
    add_args=add_args,
    report=report,
)
