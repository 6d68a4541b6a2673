"""Building blocks of the pipeline benchmark: stages that sleep instead of computing, lazily
made micro-batches (so the batch itself does not grow RSS with m), one engine step, timing.

The benchmark drives bare Stage/Engine objects on purpose, not a Pipeline: part (a) builds each
rank's sleeping chunks itself, part (b) feeds micro-batches made on demand (a Pipeline takes the
whole batch), and part (c) sets the engine against torch.distributed.pipelining's own stage and
schedule objects. What a step does with the micro-batches is still the Pipeline's: the loss
weights from pipe.loss_weights and the run (the streaming schedule's stream and updates
included) by pipe.BatchRunner, the same code Pipeline.step calls."""
from __future__ import annotations

import time
from collections import OrderedDict

import torch
from torch import nn

from ..pipeline.engine import Engine
from ..pipeline.pipe import BatchRunner, loss_weights
from ..pipeline.pipedream import WeightStash
from ..pipeline.schedules import Schedule
from ..pipeline.stage import Stage


class _Sleeper:
    """time.sleep that corrects its own overshoot: each call asks for t minus the running mean
    of how late recent calls woke (a busy oversubscribed host wakes sleepers later than an idle
    one, so the calibration before the run cannot know it alone)."""

    def __init__(self):
        self.late = 0.0

    def __call__(self, t: float) -> None:
        if t <= 0:
            return
        ask = max(0.0, t - self.late)
        t0 = time.perf_counter()
        time.sleep(ask)
        self.late = 0.8 * self.late + 0.2 * (time.perf_counter() - t0 - ask)


_sleep = _Sleeper()


class _SleepIn(torch.autograd.Function):
    """Forward sleeps t_f; its backward (the input gradient, B) sleeps t_b."""

    @staticmethod
    def forward(ctx, x, t_f, t_b):
        ctx.t_b = t_b
        _sleep(t_f)
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        _sleep(ctx.t_b)
        return g, None, None


class _SleepW(torch.autograd.Function):
    """Contributes nothing forward; its backward (the weight gradient, W) sleeps t_w."""

    @staticmethod
    def forward(ctx, x, w, t_w):
        ctx.t_w = t_w
        return torch.zeros_like(x)

    @staticmethod
    def backward(ctx, g):
        _sleep(ctx.t_w)
        return None, g.sum().reshape(1) * 0, None


class SleepLayer(nn.Module):
    """A layer costing t_f forward and t_b backward (half input, half weight gradient), no CPU."""

    def __init__(self, t_f: float, t_b: float):
        super().__init__()
        self.t_f, self.t_b = t_f, t_b
        self.sleep_f, self.sleep_b = t_f, t_b   # what is asked of time.sleep (see calibrate)
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return (_SleepIn.apply(x, self.sleep_f, self.sleep_b / 2)
                + _SleepW.apply(x.detach(), self.w, self.sleep_b / 2))

    def calibrate(self, rounds: int = 7) -> tuple[float, float]:
        """Make this layer's forward and backward really take t_f and t_b.

        A sleeping process wakes late (timer slack, and on a VM the idle vCPU's wake-up and
        cold caches make the next few operations slow): here a 4 ms forward measured ~4.4 ms
        and an 8 ms backward ~8.7. That is an artefact of simulating compute by sleeping, not
        a cost of the pipeline, so the excess over `rounds` solo runs (median) is taken off the
        sleeps. Two parts, two places: _Sleeper corrects the sleep's own overshoot as load
        changes; this takes off what remains around it (waking up, autograd). Returns the
        excess (seconds) found for F and B."""
        x = torch.zeros(4, 8, requires_grad=True)
        fs, bs = [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            y = self(x)
            t1 = time.perf_counter()
            y.sum().backward()
            fs.append(t1 - t0)
            bs.append(time.perf_counter() - t1)
        ex_f = sorted(fs)[rounds // 2] - self.sleep_f
        ex_b = sorted(bs)[rounds // 2] - self.sleep_b
        self.sleep_f, self.sleep_b = max(0.0, self.t_f - ex_f), max(0.0, self.t_b - ex_b)
        self.w.grad = None
        return ex_f, ex_b


def dense(hidden: int, layers: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict((f"l{i}", nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU()))
                                     for i in range(layers)))


class Lazy:
    """Micro-batch i made on demand from a seed: a sequence whose memory does not grow with m."""

    def __init__(self, m: int, rows: int, cols: int, seed: int):
        self.m, self.rows, self.cols, self.seed = m, rows, cols, seed

    def __len__(self):
        return self.m

    def __getitem__(self, i):
        if not 0 <= i < self.m:
            raise IndexError(i)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        return torch.randn(self.rows, self.cols, generator=g)


class Pipe:
    """This rank's chunks, stages and engine for one schedule."""

    def __init__(self, world, chunks: list[nn.Module], schedule: Schedule, loss_fn=None):
        self.world, self.p, self.s = world, world.size, world.rank
        self.sched = schedule
        self.v = len(chunks)
        self.stages = [Stage(ch, self.s + c * self.p, self.p * self.v, world, loss_fn,
                             weights=WeightStash(ch) if self.sched.streaming else None)
                       for c, ch in enumerate(chunks)]
        self.engine = Engine(self.stages)
        self.runner = BatchRunner(self.engine, self.sched, self.p, self.s, self.v)
        params = [p for ch in chunks for p in ch.parameters()]
        self.opt = torch.optim.SGD(params, lr=1e-3) if params else None
        self.batch = 0

    def step(self, xs, ys, step: int = 0, steps: int = 1) -> None:
        """One batch of micro-batches already cut (`step` of `steps` in the epoch: a streaming
        schedule spans them), weighted and run as Pipeline.step runs them."""
        sizes = [ys.rows] * len(ys) if isinstance(ys, Lazy) else [len(y) for y in ys]
        weights = loss_weights(sizes, sum(sizes))
        if self.opt and not self.sched.streaming:
            self.opt.zero_grad(set_to_none=True)
        self.runner.run(xs, ys, weights, position=(step, steps), batch=self.batch, update=self._update)
        if not self.sched.streaming:
            self._update()
        self.batch += 1

    def _update(self):
        if self.opt:
            self.opt.step()


def span(world, t0: float, t1: float, same_host: bool) -> float:
    """Wall time from the first rank's start to the last rank's end (one host: one clock)."""
    times = world.allgather_floats([t0, t1])
    return float(times[:, 1].max() - times[:, 0].min()) if same_host else float((times[:, 1] - times[:, 0]).max())


def peak_rss_reset() -> None:
    """Reset this process's peak RSS (Linux: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def rss_mb(field: str = "VmHWM") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")
