"""Single-process training of the same model, seed and batches: what every parallel mode
must reproduce (parity tests compare against it with torch.testing.assert_close)."""
from __future__ import annotations

from ..model import build_full
from .sampler import epoch_batches


def train_reference(example, specs, train, args, curve=None):
    """Train the whole model in this process; returns it. `curve`, if a list, gets the mean
    training loss of each epoch."""
    model = build_full(specs, args.seed)
    loss_fn = example.loss()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = example.optimizer(params, args)
    for epoch in range(args.epochs):
        batches = epoch_batches(len(train.y), args.batch_size, args.seed, epoch)
        if args.steps:
            batches = batches[:args.steps]
        total = n = 0.0
        for idx in batches:
            x, y = train.x[idx], train.y[idx]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            total, n = total + float(loss.detach()) * len(y), n + len(y)
        if curve is not None:
            curve.append(total / max(n, 1))
    return model
