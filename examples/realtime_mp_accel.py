"""Real-time activity recognition: a 1-D CNN on raw smartwatch IMU windows split across ranks."""
import torch
from torch import nn

from mpipar.data.accelerometer import load_basicmotions
from mpipar.example import Example
from mpipar.model import LayerSpec


def conv(c_in, c_out):
    return lambda: nn.Sequential(nn.Conv1d(c_in, c_out, 5, padding=2), nn.GroupNorm(4, c_out), nn.ReLU(),
                                 nn.MaxPool1d(2))


def layers(args):
    w = args.width
    return [LayerSpec("conv1", conv(6, w)), LayerSpec("conv2", conv(w, 2 * w)),      # 100 -> 50 -> 25
            LayerSpec("conv3", conv(2 * w, 2 * w)),                                     # -> 12
            LayerSpec("head", lambda: nn.Sequential(nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(2 * w, 4)))]


def report(last, train, test, args):
    return (f"per-batch latency p50 {last['step_ms_p50']:.1f} ms, p95 {last['step_ms_p95']:.1f} ms, "
            f"p99 {last['step_ms_p99']:.1f} ms (batch {args.batch_size})")


def add_args(p):
    p.add_argument("--width", type=int, default=16)


EXAMPLE = Example(
    name="realtime-mp-accel",
    summary="1-D CNN on BasicMotions IMU windows (6 ch x 100 samples, 4 activities) split across ranks, "
            "Adam + cross-entropy, latency percentiles",
    layers=layers,
    data=lambda args: load_basicmotions(args.data_dir),
    loss=nn.CrossEntropyLoss,
    optimizer=lambda params, args: torch.optim.Adam(params, lr=args.lr),
    task="classification",
    defaults=dict(epochs=15, batch_size=8, lr=3e-3, balance="layers"),
    add_args=add_args,
    report=report,
)
