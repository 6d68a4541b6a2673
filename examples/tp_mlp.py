"""Tensor-parallel MLP on CIFAR-10 pixels: every layer's neurons split over the ranks (Megatron column/row).

`--arch mlp` is Sequential(linear1, relu, linear2) split over the ranks; `--arch deep` (default)
stacks ParallelMLP blocks with BatchNorm (on each rank's hidden channels) and LayerNorm (on the
replicated activations). Every block costs one all-reduce forward and one backward. With
--compare (on by default) rank 0 also trains the single-process model on the same batches and
writes learning_curves.png overlaying the two, then checks the parameters still agree.
SGD with momentum, not Adam: Adam divides by sqrt(v) + eps, so a gradient entry that happens to
be ~0 turns the rounding noise of a different summation order (the all-reduce) into a visible
step; SGD keeps the two runs apart by rounding only.
"""
import torch
from torch import nn

from mpipar.app.datasets.cifar10 import load_cifar10
from mpipar.app.example import Example
from mpipar.tensor import ParallelMLP, reference_mlp
from mpipar.app.tp_session import add_parity_args
from mpipar.app.tp_session import run_tp_example

PIXELS, CLASSES = 3 * 32 * 32, 10


def blocks(args):
    """(d_in, hidden, d_out, norm) of each block; hidden widths are split over tp."""
    h = args.hidden
    if args.arch == "mlp":
        return [(PIXELS, h, CLASSES, None)]
    return [(PIXELS, h, h // 2, "batch"), (h // 2, h, h // 2, "layer"), (h // 2, h, CLASSES, "layer")]


def build(args, group):
    return nn.Sequential(nn.Flatten(), *(ParallelMLP(a, h, b, group, norm=n) for a, h, b, n in blocks(args)))


def reference(args):
    return nn.Sequential(nn.Flatten(), *(reference_mlp(a, h, b, norm=n) for a, h, b, n in blocks(args)))


def add_args(p):
    p.add_argument("--arch", choices=["mlp", "deep"], default="deep")
    p.add_argument("--hidden", type=int, default=512, help="hidden width (a multiple of the number of ranks)")
    p.add_argument("--n-train", type=int, default=None, help="training images (default: all 8000 shipped)")
    p.add_argument("--n-test", type=int, default=None, help="evaluation images (default: all 2000 shipped)")
    add_parity_args(p)


EXAMPLE = Example(
    name="tp-mlp",
    summary="tensor-parallel MLP (column/row-parallel blocks, BatchNorm, LayerNorm) on CIFAR-10 pixels, SGD",
    data=lambda args: load_cifar10(args.data_dir, n_train=args.n_train, n_test=args.n_test),
    loss=nn.CrossEntropyLoss,
    optimizer=lambda params, args: torch.optim.SGD(params, lr=args.lr, momentum=0.9, nesterov=True),
    defaults=dict(epochs=4, batch_size=64, lr=0.02, compare=True),
    add_args=add_args,
    gpu=True,
    main=lambda args, world, log: run_tp_example(world, args, log, EXAMPLE, build, reference),
)
