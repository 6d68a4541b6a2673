"""Single-process training of the same model, seed and batches: what every parallel mode
must reproduce (parity tests compare against it with torch.testing.assert_close)."""
from __future__ import annotations

import copy

import torch

from ..model import build_full
from .metrics import Tally, summarize
from .batches import epoch_batches


def train_reference(example, specs, train, args, on_epoch=None):
    """Train the whole model in this process; returns it. `on_epoch(model, epoch, tally)` is
    called after each epoch with the epoch's training-loss tally."""
    model = build_full(specs, args.seed)
    loss_fn = example.loss()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = example.optimizer(params, args)
    sched = example.lr_scheduler(opt, args) if example.lr_scheduler else None
    for epoch in range(args.epochs):
        batches = epoch_batches(len(train.y), args.batch_size, args.seed, epoch, example.shuffle)
        if args.steps:
            batches = batches[:args.steps]
        tally = Tally(loss_fn, example.task)
        for idx in batches:
            x, y = train.x[idx], train.y[idx]
            opt.zero_grad(set_to_none=True)
            out = model(x)
            loss = loss_fn(out, y)
            loss.backward()
            if getattr(args, "clip_grad", 0):
                torch.nn.utils.clip_grad_norm_(params, args.clip_grad)
            opt.step()
            if sched:
                sched.step()
            tally.add(out, y)
        if on_epoch is not None:
            on_epoch(model, epoch, tally)
    return model


@torch.no_grad()
def evaluate(model, example, split, batch_size) -> list[float]:
    model.eval()
    tally = Tally(example.loss(), example.task)
    for idx in epoch_batches(len(split.y), batch_size, 0, 0, shuffle=False):
        tally.add(model(split.x[idx]), split.y[idx])
    model.train()
    return tally.vector()


def reference_rows(example, specs, train, test, args) -> list[dict]:
    """Per-epoch rows (same keys as the parallel run's) of single-process training."""
    rows = []

    def record(model, epoch, tally):
        rows.append({"epoch": epoch + 1, **summarize(tally.vector(), example.task, "train"),
                     **summarize(evaluate(model, example, test, args.batch_size), example.task, "test")})

    train_reference(example, specs, train, args, on_epoch=record)
    return rows


def train_reference_2bw(example, specs, train, args):
    """Single-process training with exactly the 2BW rule of pipeline/pipedream.py (whole batches,
    no pipeline): each batch's gradient is taken at the weights before the previous update."""
    model = build_full(specs, args.seed)
    old = copy.deepcopy(model)                      # W(max(t-1, 0))
    loss_fn = example.loss()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = example.optimizer(params, args)
    for epoch in range(args.epochs):
        batches = epoch_batches(len(train.y), args.batch_size, args.seed, epoch, example.shuffle)
        for idx in batches[:args.steps] if args.steps else batches:
            old.zero_grad(set_to_none=True)
            loss_fn(old(train.x[idx]), train.y[idx]).backward()
            now = copy.deepcopy(model)              # W(t): the next batch's weights
            for p, q in zip(model.parameters(), old.parameters()):
                p.grad = q.grad
            opt.step()
            old = now
    return model
