"""CNN on CIFAR-10 split across ranks (one block per stage), SGD + cross-entropy."""
import torch
from torch import nn

from mpipar.app.datasets.cifar10 import load_cifar10
from mpipar.app.example import Example
from mpipar.model import LayerSpec


def block(c_in, c_out):
    return lambda: nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))


def layers(args):
    w = args.width
    return [
        LayerSpec("conv1", block(3, w)),            # 32 -> 16
        LayerSpec("conv2", block(w, 2 * w)),        # 16 -> 8
        LayerSpec("conv3", block(2 * w, 4 * w)),    # 8 -> 4
        LayerSpec("fc1", lambda: nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 16, 128), nn.ReLU())),
        LayerSpec("fc2", lambda: nn.Linear(128, 10)),
    ]


def add_args(p):
    p.add_argument("--width", type=int, default=16, help="channels of the first conv block")
    p.add_argument("--n-train", type=int, default=None, help="use only this many training images")


EXAMPLE = Example(
    name="split-cnn",
    summary="CNN on CIFAR-10 split across ranks (conv blocks and classifier per stage), SGD + cross-entropy",
    layers=layers,
    data=lambda args: load_cifar10(args.data_dir, n_train=args.n_train),
    loss=nn.CrossEntropyLoss,
    optimizer=lambda params, args: torch.optim.SGD(params, lr=args.lr, momentum=0.9),
    task="classification",
    defaults=dict(epochs=3, batch_size=64, lr=0.02),
    add_args=add_args,
)
