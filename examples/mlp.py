"""8-layer MLP 12->256->128->64->8->64->128->256->12 over 4 ranks (two layers each), MSE + Adam.

Every layer also has a tensor-parallel twin, so the same model runs on any pp x dp x tp grid,
e.g. `mpirun -np 8 python -m mpipar.run mlp --grid pp=2,dp=2,tp=2`: odd layers split their
output neurons (column-parallel), even layers their input (row-parallel, one all-reduce), so a
pair costs one all-reduce forward and one backward, and a stage boundary between the two
hands each tp rank's shard of the hidden activation straight to its tp peer.
"""
import torch
from torch import nn

from mpipar.app.datasets.synthetic import regression
from mpipar.app.example import Example
from mpipar.model import LayerSpec
from mpipar.tensor import ColumnParallelLinear, RowParallelLinear

DIMS = [12, 256, 128, 64, 8, 64, 128, 256, 12]


def _relu_unless(last, layer):
    return layer if last else nn.Sequential(layer, nn.ReLU())


def layers(args):
    specs = []
    for i, (a, b) in enumerate(zip(DIMS, DIMS[1:])):
        last = i == len(DIMS) - 2
        split = ColumnParallelLinear if i % 2 == 0 else RowParallelLinear
        specs.append(LayerSpec(f"fc{i + 1}",
                               build=lambda a=a, b=b, last=last: _relu_unless(last, nn.Linear(a, b)),
                               tp=lambda g, a=a, b=b, last=last, split=split: _relu_unless(last, split(a, b, g))))
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
