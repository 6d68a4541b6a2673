"""What an example states — model, data, loss, optimizer, task — and nothing else; the shared
trainer does the epochs, metrics, logging and parallel plumbing."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Callable, Iterable

from torch import nn


@dataclass
class Example:
    name: str
    summary: str
    layers: Callable[[argparse.Namespace], list] | None = None          # -> list[LayerSpec]
    # or the whole model as an nn.Module, which Pipeline traces and cuts (any pp): (args, tp group or
    # None) -> the module, or under tp > 1 its tensor-parallel twin holding this rank's shard
    model: Callable[[argparse.Namespace, object], nn.Module] | None = None
    split: Callable[[argparse.Namespace, int], list] | None = None     # with model: (args, stages) -> cut before
    data: Callable[[argparse.Namespace], tuple] | None = None           # -> (train Split, test Split)
    loss: Callable[[], nn.Module] | None = None
    optimizer: Callable[[Iterable[nn.Parameter], argparse.Namespace], object] | None = None
    lr_scheduler: Callable[[object, argparse.Namespace], object] | None = None  # stepped every step
    task: str = "classification"                                        # or "regression"
    shuffle: bool = True                                                # False: batches in data order (streams)
    defaults: dict = field(default_factory=dict)                        # flag defaults, e.g. epochs
    add_args: Callable[[argparse.ArgumentParser], None] | None = None   # example-specific flags
    report: Callable | None = None   # (last_row, train, test, args) -> extra summary text (rank 0)
    on_trainer: Callable | None = None  # (trainer, args): extra hooks once the trainer is built (every rank)
    after_fit: Callable | None = None   # (trainer, train, test, args, log) -> summary text or None (every rank)
    main: Callable | None = None   # custom flow (args, world) -> summary dict, for non-sequential plans
    gpu: bool = False              # a custom flow that honours --device (args.device_); others run on CPU
