"""Deep LSTM split across ranks forecasting a streaming temperature sensor, with live plots.

The model forecasts the CHANGE from the last reading (residual forecasting), not the next value:
predicting zero change is exactly the last-value (persistence) baseline, so training starts near
it and only has to learn the correction. Asked for the level instead, this deep LSTM trained a few
epochs in time order ended about twice the baseline's error. Each input step carries the
standardised reading and its change from the step before, since the changes are what is forecast.
Same chronological split; the change scale comes from training windows only; the reported test
RMSE is of last reading + forecast change, in sensor units, and so is the baseline's.
"""
import torch
from torch import nn

from mpipar.data.cache import cached
from mpipar.data.common import Split
from mpipar.data.temperature import load_temperature_stream, windows
from mpipar.example import Example
from mpipar.layers import LastStep, LSTMLayer
from mpipar.model import LayerSpec

FEATURES = 2  # per step: standardised reading, its change from the previous step


def zero_head(h):
    """Head that first predicts no change (= the persistence baseline); its gradient is not zero."""
    head = LastStep(h)
    nn.init.zeros_(head.fc.weight)
    nn.init.zeros_(head.fc.bias)
    return head


def layers(args):
    h = args.hidden
    return ([LayerSpec(f"lstm{i + 1}", lambda a=(FEATURES if i == 0 else h): LSTMLayer(a, h))
             for i in range(args.depth)]
            + [LayerSpec("head", lambda: zero_head(h))])


def as_changes(train: Split, test: Split) -> tuple[Split, Split]:
    """Targets become (next - last reading) / scale and each step gains its change / scale; scale
    is the RMS one-step change over the training windows, so targets are about unit size."""
    scale = float((train.y - train.x[:, -1]).pow(2).mean().sqrt()) or 1.0

    def convert(s: Split) -> Split:
        steps = torch.diff(s.x, dim=1, prepend=s.x[:, :1]) / scale
        note = s.note + "; target = change from the last reading (residual), inputs = reading + change"
        return Split(torch.cat([s.x, steps], 2), (s.y - s.x[:, -1]) / scale, note,
                     {**s.meta, "change_scale": scale})
    return convert(train), convert(test)


def data(args):
    def load():
        _, values = load_temperature_stream(args.data_dir, args.series)
        return as_changes(*windows(values, args.window))
    return cached(("temperature-change-windows", args.data_dir, args.series, args.window), load)


def report(last, train, test, args):
    sensor = test.meta["change_scale"] * test.meta["std"]  # model units -> sensor units
    naive = float(test.y.pow(2).mean().sqrt()) * sensor    # last value = forecasting zero change
    model = last["test_rmse"] * sensor
    return (f"test RMSE {model:.2f} (sensor units; last reading + forecast change) vs last-value baseline "
            f"{naive:.2f} ({model / naive:.2f}x); plots in {args.out}")


def add_args(p):
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--depth", type=int, default=4, help="stacked LSTM layers")
    p.add_argument("--window", type=int, default=24, help="past readings per forecast")
    p.add_argument("--series", default="ambient_temperature_system_failure",
                   choices=["ambient_temperature_system_failure", "machine_temperature_system_failure"])


EXAMPLE = Example(
    name="viz-mp-lstm-temperature",
    summary="deep LSTM split across ranks on the NAB temperature stream (time order), forecasts the change "
            "from the last reading, Adam + MSE, live plots",
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
