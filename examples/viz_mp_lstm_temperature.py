"""Deep LSTM split across ranks forecasting a streaming temperature sensor, with live plots."""
import torch
from torch import nn

from mpipar.data.cache import cached
from mpipar.data.temperature import load_temperature_stream, windows
from mpipar.example import Example
from mpipar.layers import LastStep, LSTMLayer
from mpipar.model import LayerSpec


def layers(args):
    h = args.hidden
    return ([LayerSpec(f"lstm{i + 1}", lambda a=(1 if i == 0 else h): LSTMLayer(a, h)) for i in range(args.depth)]
            + [LayerSpec("head", lambda: LastStep(h))])


def data(args):
    def load():
        _, values = load_temperature_stream(args.data_dir, args.series)
        return windows(values, args.window)
    return cached(("temperature-windows", args.data_dir, args.series, args.window), load)


def report(last, train, test, args):
    std = test.meta["std"]
    naive = float(((test.x[:, -1, 0] - test.y[:, 0]) * std).pow(2).mean().sqrt())
    return (f"test RMSE {last['test_rmse'] * std:.2f} (sensor units) vs last-value baseline {naive:.2f}; "
            f"plots in {args.out}")


def add_args(p):
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--depth", type=int, default=4, help="stacked LSTM layers")
    p.add_argument("--window", type=int, default=24, help="past readings per forecast")
    p.add_argument("--series", default="ambient_temperature_system_failure",
                   choices=["ambient_temperature_system_failure", "machine_temperature_system_failure"])


EXAMPLE = Example(
    name="viz-mp-lstm-temperature",
    summary="deep LSTM split across ranks on the NAB temperature stream (time order), Adam + MSE, live plots",
    layers=layers,
    data=data,
    loss=nn.MSELoss,
    optimizer=lambda params, args: torch.optim.Adam(params, lr=args.lr),
    task="regression",
    shuffle=False,   # a stream: batches replayed in time order
    defaults=dict(epochs=4, batch_size=64, lr=3e-3, balance="layers", live=True, plot=True),
    add_args=add_args,
    report=report,
)
