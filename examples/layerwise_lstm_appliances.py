"""Deep stacked LSTM forecasting UCI Appliances energy, LSTM layers split across ranks, Adam + MSE."""
import torch
from torch import nn

from mpipar.data.appliances import load_appliances, persistence_rmse
from mpipar.data.cache import cached
from mpipar.example import Example
from mpipar.layers import LastStep, LSTMLayer
from mpipar.model import LayerSpec


def layers(args):
    h, n_feat = args.hidden, 26
    specs = [LayerSpec(f"lstm{i + 1}", lambda a=(n_feat if i == 0 else h): LSTMLayer(a, h)) for i in range(args.depth)]
    return specs + [LayerSpec("head", lambda: LastStep(h))]


def data(args):
    return cached(("appliances", args.data_dir, args.window),
                  lambda: load_appliances(args.data_dir, window=args.window))


def report(last, train, test, args):
    std = test.meta["y_std"]
    return (f"test RMSE {last['test_rmse'] * std:.1f} Wh vs persistence baseline {persistence_rmse(test):.1f} Wh, "
            f"{1 / last['seconds']:.2f} epochs/s")


def add_args(p):
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--depth", type=int, default=4, help="stacked LSTM layers")
    p.add_argument("--window", type=int, default=24, help="10-minute steps of history")


EXAMPLE = Example(
    name="layerwise-lstm-appliances",
    summary="stacked LSTM on UCI Appliances energy, one or more LSTM layers per rank, Adam + MSE, RMSE in Wh",
    layers=layers,
    data=data,
    loss=nn.MSELoss,
    optimizer=lambda params, args: torch.optim.Adam(params, lr=args.lr),
    task="regression",
    defaults=dict(epochs=3, batch_size=128, lr=2e-3, balance="layers", microbatches=2),
    add_args=add_args,
    report=report,
)
