"""8-layer MLP 12->256->128->64->8->64->128->256->12 over 4 ranks (two layers each), MSE + Adam."""
import torch
from torch import nn

from mpipar.data.synthetic import regression
from mpipar.example import Example
from mpipar.model import LayerSpec

DIMS = [12, 256, 128, 64, 8, 64, 128, 256, 12]


def layers(args):
    specs = []
    for i, (a, b) in enumerate(zip(DIMS, DIMS[1:])):
        last = i == len(DIMS) - 2
        build = (lambda a=a, b=b: nn.Linear(a, b)) if last else (lambda a=a, b=b: nn.Sequential(nn.Linear(a, b), nn.ReLU()))
        specs.append(LayerSpec(f"fc{i + 1}", build))
    return specs


EXAMPLE = Example(
    name="mlp",
    summary="8-layer MLP on a synthetic regression set (12 inputs -> 12 targets), MSE + Adam",
    layers=layers,
    data=lambda args: regression(seed=args.seed),
    loss=nn.MSELoss,
    optimizer=lambda params, args: torch.optim.Adam(params, lr=args.lr),
    task="regression",
    defaults=dict(epochs=5, batch_size=64, lr=1e-3, balance="layers"),
)
