"""Pipeline-parallel CNN on CIFAR-10 in 4+ stages, any schedule; learning curves vs one process.

GroupNorm, not BatchNorm: BatchNorm statistics depend on how a batch is cut into micro-batches,
so it is not micro-batch transparent; GroupNorm is per sample, so pipelining changes nothing."""
import torch
from torch import nn

from mpipar.app.datasets.cifar10 import load_cifar10
from mpipar.app.example import Example
from mpipar.model import LayerSpec


def conv(c_in, c_out, pool):
    return lambda: nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(4, c_out), nn.ReLU(),
                                 *([nn.MaxPool2d(2)] if pool else []))


def layers(args):
    """Eight layers: enough for the interleaved schedule's 2 chunks on each of 4 ranks."""
    w = args.width
    return [LayerSpec("conv1", conv(3, w, False)), LayerSpec("conv2", conv(w, w, True)),          # 32 -> 16
            LayerSpec("conv3", conv(w, 2 * w, False)), LayerSpec("conv4", conv(2 * w, 2 * w, True)),  # -> 8
            LayerSpec("conv5", conv(2 * w, 4 * w, True)), LayerSpec("conv6", conv(4 * w, 4 * w, False)),  # -> 4
            LayerSpec("fc1", lambda: nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 16, 128), nn.ReLU())),
            LayerSpec("fc2", lambda: nn.Linear(128, 10))]


def optimizer(params, args):
    """SGD with momentum 0.9 at --lr 0.02; under --schedule pipedream, plain SGD at 0.05 unless
    --lr/--momentum say otherwise: PipeDream-2BW takes each gradient at the weights before the
    previous update, and momentum 0.9 on top of that one-step delay learned about half as fast
    (measured single-process, 4 epochs: test accuracy 0.25 against 0.44 synchronous; without
    momentum at 0.05, 0.38 against 0.40)."""
    two_bw = args.schedule.streaming     # a schedules.Schedule: pipedream, also asked for as 2bw
    lr = args.lr if args.lr is not None else (0.05 if two_bw else 0.02)
    momentum = args.momentum if args.momentum is not None else (0.0 if two_bw else 0.9)
    return torch.optim.SGD(params, lr=lr, momentum=momentum)


def add_args(p):
    p.add_argument("--momentum", type=float, default=None, help="SGD momentum (default 0.9; 0 with pipedream)")
    p.add_argument("--width", type=int, default=16, help="channels of the first conv layers")
    p.add_argument("--n-train", type=int, default=4000, help="training images used (of 8000 shipped)")


EXAMPLE = Example(
    name="pipeline-cifar",
    summary="CNN on CIFAR-10 in 4+ pipeline stages (--schedule), learning curves vs single-process training",
    layers=layers,
    data=lambda args: load_cifar10(args.data_dir, n_train=args.n_train),
    loss=nn.CrossEntropyLoss,
    optimizer=optimizer,
    task="classification",
    defaults=dict(epochs=4, batch_size=64, lr=None, microbatches=4, compare=True),   # lr: see optimizer
    add_args=add_args,
)
