"""Single-process training of the same model, seed and batches: what every parallel mode must
reproduce (parity tests compare against it with torch.testing.assert_close). Deliberately a
separate, plain loop (forward, loss, backward, step) rather than the Trainer: an oracle that
shares no code with what it checks."""
from __future__ import annotations

import copy

import torch

from .batches import epoch_batches
from .metrics import Tally


def train_reference(model, loss_fn, optimizer, train, cfg, scheduler=None, on_epoch=None, two_bw: bool = False):
    """Train `model` in this process on cfg's batches (epochs, batch_size, steps, seed, shuffle,
    clip_grad of a TrainConfig); returns it. `on_epoch(model, epoch, tally)` after each epoch.
    `two_bw`: PipeDream-2BW's rule, each batch's gradient taken at the weights before the
    previous update (pipeline/pipedream.py), clipping and scheduler unused."""
    params = [p for p in model.parameters() if p.requires_grad]
    device = next(model.parameters()).device if params else torch.device("cpu")
    old = copy.deepcopy(model) if two_bw else None          # W(max(t-1, 0))
    x_all, y_all = train.x, train.y
    for epoch in range(cfg.epochs):
        batches = epoch_batches(len(y_all), cfg.batch_size, cfg.seed, epoch, cfg.shuffle)
        if cfg.steps:
            batches = batches[:cfg.steps]
        tally = Tally(loss_fn, cfg.task)
        for idx in batches:
            x, y = x_all[idx].to(device), y_all[idx].to(device)
            if two_bw:
                old.zero_grad(set_to_none=True)
                out = old(x)                            # the loss 2BW reports: at the weights it used
                loss_fn(out, y).backward()
                now = copy.deepcopy(model)              # W(t): the next batch's weights
                for p, q in zip(model.parameters(), old.parameters()):
                    p.grad = q.grad
                optimizer.step()
                old = now
                tally.add(out, y)
                continue
            optimizer.zero_grad(set_to_none=True)
            out = model(x)
            loss_fn(out, y).backward()
            if cfg.clip_grad:
                torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
            optimizer.step()
            if scheduler:
                scheduler.step()
            tally.add(out, y)
        if on_epoch is not None:
            on_epoch(model, epoch, tally)
    return model


@torch.no_grad()
def evaluate(model, loss_fn, task: str, split, batch_size: int) -> list[float]:
    model.eval()
    tally = Tally(loss_fn, task)
    device = next(model.parameters(), torch.empty(0)).device
    for idx in epoch_batches(len(split.y), batch_size, 0, 0, shuffle=False):
        tally.add(model(split.x[idx].to(device)), split.y[idx].to(device))
    model.train()
    return tally.vector()
