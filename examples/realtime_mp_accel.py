"""Real-time activity recognition: a 1-D CNN on raw smartwatch IMU windows split across ranks.

After training, the test windows are served as requests arriving at `--rate` per second (fixed
spacing or Poisson, mpipar/realtime.py) with micro-batching (`--max-batch`, `--max-wait-ms`),
and the run prints one `serving:` line: offered vs achieved rate, latency p50/p95/p99 from arrival
to answer, deadline misses, longest queue. Here one pipeline serves every request: a batch
crosses every stage and its answer comes back from the last, so a request pays all the stages'
compute plus the hops, and with one batch in flight at a time the stages take turns instead of
overlapping. realtime-dp-accel prints the same line with the whole model on every rank and the
requests dealt round-robin (rate/ranks each): side by side on 2 ranks (same flags) the comparison
shows what splitting a small model costs in latency and what replicating it buys in capacity.
Measured on a shared 2-core host: at the default 200 req/s, which loads the 2-rank pipeline
without saturating it (with --max-batch 1 it saturated at 300 to 1,000 req/s, by the host's
load), the replicas answered sooner (p50 1.3-1.6 ms against 6-7 ms here) and missed no more
deadlines; offered 2,000 req/s fixed with --max-batch 1, the replicas kept up (1,969 achieved,
none missed) while the pipeline fell behind.

Lockstep: the stages of a pipeline must run the same batches in the same order, yet only one
clock may decide when a batch closes. The first stage (the front end, which receives the
requests) runs the serving loop on its clock and broadcasts each batch's size over the pipeline
world before starting it (0: done); the other stages only follow those sizes (they know the
requests' order, so a size names the batch). The last stage broadcasts the predicted classes
back, which is when the first stage counts the requests answered.
"""
import time

import numpy as np
import torch
from torch import nn

from mpipar.app import realtime
from mpipar.app.datasets.accelerometer import load_basicmotions
from mpipar.errors import ConfigError
from mpipar.app.example import Example
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


# -- serving after training (every rank) -----------------------------------------------------------
def pipeline_server(trainer):
    """(announce, infer) for this rank's pipeline: announce(k) tells the other stages the next
    batch's size (from stage 0); infer(x) runs x through every stage and returns the predicted
    classes on every stage (broadcast from the last)."""
    topo = trainer.topo
    pp, last = topo.pp_world, topo.grid.pp - 1

    def announce(k: int) -> int:
        return int(pp.bcast_(torch.tensor([k], dtype=torch.int64), 0)) if pp.size > 1 else k

    @torch.no_grad()
    def infer(x):
        pred = torch.zeros(len(x), dtype=torch.int64)
        trainer.pipe.forward_only(x, None, lambda mb, logits: pred.copy_(logits.argmax(-1)))
        return pp.bcast_(pred, last) if pp.size > 1 else pred

    return announce, infer


def serve_requests(trainer, test, args):
    """This replica's share of the requests served (stage 0: its ServeLog; other stages: None)."""
    topo = trainer.topo
    announce, infer = pipeline_server(trainer)
    arrivals = realtime.arrival_times(args.rate, None if args.duration > 0 else args.requests,
                                      args.duration if args.duration > 0 else None, args.arrivals, args.seed)
    mine = list(range(topo.dp_rank, len(arrivals), topo.grid.dp))           # dealt round-robin
    x = test.x[torch.tensor(mine, dtype=torch.int64) % len(test.x)]        # request i: window i mod N
    trainer.module.eval()
    try:
        warm = min(args.max_batch, len(x))                                  # first-call costs, untimed
        if warm and topo.pp_rank == 0:
            announce(warm)
            infer(x[:warm])
        elif warm:
            infer(x[:announce(0)])
        topo.world.barrier()
        if topo.pp_rank != 0:
            realtime.follow(lambda: announce(0), infer, x)
            return None

        def front(xb):
            announce(len(xb))
            return infer(xb)

        log = realtime.serve([arrivals[i] for i in mine], front, x, args.max_batch, args.max_wait_ms / 1e3)
        announce(0)
        return log
    finally:
        trainer.module.train()


def check_serving(trainer, args):
    """on_trainer: refuse bad serving flags before training, not after it (every rank raises)."""
    if not (args.rate > 0 and args.max_batch >= 1 and args.requests >= 0 and args.max_wait_ms >= 0):
        raise ConfigError(f"serving needs --rate > 0, --max-batch >= 1, --requests >= 0 and --max-wait-ms >= 0 "
                          f"(got {args.rate:g}, {args.max_batch}, {args.requests}, {args.max_wait_ms:g})")


def after_fit(trainer, train, test, args, log):
    """Serve the test windows under load; pool every replica's requests for one summary line."""
    t0 = time.perf_counter()
    served = serve_requests(trainer, test, args)
    recs = served.records if served else []
    world = trainer.topo.world
    counts = world.allgather_floats([len(recs), served.max_queue if served else 0])
    width = max(1, int(counts[:, 0].max()))
    pad = [float("nan")] * (width - len(recs))
    arrivals = world.allgather_floats([r.arrival for r in recs] + pad).ravel()
    dones = world.allgather_floats([r.done for r in recs] + pad).ravel()
    keep = ~np.isnan(arrivals)
    s = realtime.summarize(arrivals[keep], dones[keep], args.deadline_ms / 1e3, args.rate,
                           int(counts[:, 1].max()), args.arrivals)
    log(s.line() + f" ({time.perf_counter() - t0:.1f} s)")
    return f"serving p99 {s.p99_ms:.1f} ms at {s.achieved:.0f} req/s, {s.missed_share:.1%} missed"


def add_args(p):
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--rate", type=float, default=200.0,
                   help="serving: requests per second offered (default 200: a 2-rank pipeline queues "
                        "now and then but is not saturated; see the docstring)")
    p.add_argument("--arrivals", choices=realtime.PROCESSES, default="poisson", help="serving: arrival process")
    p.add_argument("--requests", type=int, default=300, help="serving: number of requests")
    p.add_argument("--duration", type=float, default=0.0, help="serving: seconds of arrivals instead of --requests")
    p.add_argument("--deadline-ms", type=float, default=20.0, help="serving: a request answered later misses")
    p.add_argument("--max-batch", type=int, default=8, help="serving: most requests in one batch")
    p.add_argument("--max-wait-ms", type=float, default=0.0,
                   help="serving: hold a part-full batch at most this long for more arrivals")


EXAMPLE = Example(
    name="realtime-mp-accel",
    summary="1-D CNN on BasicMotions IMU windows (6 ch x 100 samples, 4 activities) split across ranks, "
            "Adam + cross-entropy, latency percentiles, then served under an arrival process",
    layers=layers,
    data=lambda args: load_basicmotions(args.data_dir),
    loss=nn.CrossEntropyLoss,
    optimizer=lambda params, args: torch.optim.Adam(params, lr=args.lr),
    task="classification",
    defaults=dict(epochs=15, batch_size=8, lr=3e-3, balance="layers"),
    add_args=add_args,
    report=report,
    on_trainer=check_serving,
    after_fit=after_fit,
)
