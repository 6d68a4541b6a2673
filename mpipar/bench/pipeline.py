"""pipeline: (a) schedule efficiency with stages that sleep (no CPU, so 4+ ranks on 2 cores is
honest): measured step time against the simulated ideal of the same schedule; (b) activation
memory: peak RSS and peak stashed micro-batches for 1F1B vs GPipe as m grows; (c) step time
against torch.distributed.pipelining (ScheduleGPipe / Schedule1F1B on gloo), same model,
micro-batches and ranks. Run: mpirun -np 4 python -m mpipar.bench pipeline [--part a|b|c]."""
from __future__ import annotations

import argparse
import socket
import statistics
import time

import torch
from torch import nn

from ..comm import World, failure
from ..comm.waits import BOARD
from ..pipeline import schedules, simulate, timeline
from ..pipeline.pipe import split_microbatches
from ._pipeline_parts import Lazy, Pipe, SleepLayer, dense, peak_rss_reset, rss_mb, span

SCHEDULES = ["gpipe", "1f1b", "interleaved", "zb", "pipedream"]


def load_average() -> str:
    """The host's 1-minute load: timings on a shared machine mean little without it."""
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[0]
    except OSError:
        return "?"


def efficiency(world, args, log) -> None:
    p, same_host = world.size, len(set(world.hosts())) == 1
    t_f, t_b = args.tf / 1e3, args.tb / 1e3
    log(f"(a) schedule efficiency, stages sleep F {args.tf:g} ms, B {args.tb:g} ms (ZB: B {args.tb / 2:g} + "
        f"W {args.tb / 2:g}; interleaved: /v per chunk), p={p}; ideal = simulate.py's makespan of the same lists")
    log(f"{'schedule':<12} {'m':>4} {'measured ms':>12} {'ideal ms':>9} {'ideal/meas':>10} {'bubble ideal':>12} "
        f"{'no-bubble ms':>12} {'ideal* ms':>10} {'ideal*/meas':>9}   (*: with the compute times measured)")
    for i, sched in enumerate(schedules.get(name) for name in args.schedules.split(",")):
        v = sched.chunks                         # interleaved: its default 2; the others 1
        chunks = [nn.Sequential(SleepLayer(t_f / v, t_b / v)) for _ in range(v)]
        excess = calibrate_in_turn(world, [ch[0] for ch in chunks])
        if i == 0:
            log(f"sleep calibration: a sleeping stage wakes late by F {excess[0] * 1e3:.2f} ms, B {excess[1] * 1e3:.2f} ms "
                f"(mean over ranks); taken off its sleeps so stages cost what they claim")
        pipe = Pipe(world, chunks, sched, nn.MSELoss())
        for m in [int(x) for x in args.ms.split(",")]:
            steps = args.steps if sched.streaming else 1
            # the input needs a gradient so the first stage pays its B like every other stage
            xs, ys = [torch.zeros(4, 8, requires_grad=True)] * m, [torch.zeros(4, 8)] * m
            lists = simulate.lists_for(sched, p, m, v, steps)
            split = any(a.op == "W" for acts in lists for a in acts)   # zb: B and W apart
            dur = {"F": t_f, "B": t_b / 2 if split else t_b, "W": t_b / 2}
            ideal = simulate.simulate(lists, v=v, durations=dur).makespan / steps
            for i in range(steps):                 # warm-up
                pipe.step(xs, ys, i, steps)
            best, rec = float("inf"), timeline.Recorder(keep_steps=0)
            pipe.engine.recorder = rec
            for _ in range(args.repeats):
                world.barrier()
                t0 = time.perf_counter()
                for i in range(steps):
                    rec.begin_step()
                    pipe.step(xs, ys, i, steps)
                best = min(best, span(world, t0, time.perf_counter(), same_host) / steps)
            pipe.engine.recorder = None
            # the same lists simulated with the compute times this run really saw (sleep overshoot,
            # CPU contention): what is left of measured/ideal is the engine's and the messages' share
            real = measured_durations(world, rec, v)
            ideal_real = simulate.simulate(lists, v=v, durations=real).makespan / steps
            log(f"{sched:<12} {m:>4} {best * 1e3:>12.1f} {ideal * 1e3:>9.1f} {ideal / best:>10.3f} "
                f"{1 - m * (t_f + t_b) / ideal:>12.3f} {m * (t_f + t_b) * 1e3:>12.1f} {ideal_real * 1e3:>10.1f} "
                f"{ideal_real / best:>9.3f}")


def calibrate_in_turn(world, layers) -> list[float]:
    """SleepLayer.calibrate on one rank at a time while the others sleep (oversubscribed cores
    would otherwise inflate what is measured); returns the mean F and B excess over ranks."""
    poll, BOARD.poll = BOARD.poll, 1e-3
    mine = [0.0, 0.0]
    for r in range(world.size):
        world.barrier()
        if r == world.rank:
            mine = [sum(e) for e in zip(*(layer.calibrate() for layer in layers))]
    world.barrier()
    BOARD.poll = poll
    return list(world.allgather_floats(mine).mean(0))


def measured_durations(world, rec, v: int) -> dict[str, float]:
    """Mean F, B, W time over all ranks' recorded actions, scaled back to a whole stage (x v)."""
    rows = rec.array()
    sums = []
    for i, op in enumerate(timeline.OPS[:3]):
        sel = rows[rows[:, 1] == i]
        sums += [float((sel[:, 5] - sel[:, 4]).sum()), len(sel)]
    tot = world.allgather_floats(sums).sum(0)
    return {op: v * tot[2 * i] / max(tot[2 * i + 1], 1) for i, op in enumerate(timeline.OPS[:3])}


def memory(world, args, log) -> None:
    p, h, rows = world.size, args.hidden, args.mb_rows
    log(f"(b) memory: 4 stages x 2 Linear({h},{h})+ReLU, micro-batches of {rows} rows made lazily "
        f"(the batch itself never grows), one step each, peak RSS reset before each run")
    model = dense(h, 2, seed=world.rank)
    results = {}
    for name in ["1f1b", "gpipe"]:                 # 1F1B first: GPipe's high-water mark comes last
        pipe = Pipe(world, [model], schedules.get(name), nn.MSELoss())
        pipe.step(Lazy(8, rows, h, 0), Lazy(8, rows, h, 1))   # warm up allocator and comm
        for m in [int(x) for x in args.mem_ms.split(",")]:
            pipe.engine.reset_peak()
            peak_rss_reset()
            base = rss_mb("VmRSS")
            t0 = time.perf_counter()
            pipe.step(Lazy(m, rows, h, 2), Lazy(m, rows, h, 3))
            secs = time.perf_counter() - t0
            got = world.allgather_floats([rss_mb("VmHWM"), base, pipe.engine.peak_held, secs])
            results[name, m] = got
            log(f"{name:<6} m={m:<5} peak RSS MB per rank {[round(x) for x in got[:, 0]]} "
                f"(before {[round(x) for x in got[:, 1]]}), peak stashed micro-batches {got[:, 2].astype(int).tolist()}, "
                f"step {got[:, 3].max():.1f} s")
    ms = [int(x) for x in args.mem_ms.split(",")]
    for name in ["1f1b", "gpipe"]:
        ratio = (results[name, ms[-1]][:, 0] / results[name, ms[0]][:, 0]).tolist()
        log(f"{name}: peak RSS m={ms[-1]} / m={ms[0]} per rank: {[round(r, 3) for r in ratio]}")


def versus_torch(world, args, log) -> None:
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
    p, h, m, batch = world.size, args.hidden, args.tm, args.batch
    port = torch.zeros(1, dtype=torch.int64)
    if world.rank == 0:
        with socket.socket() as sock:
            sock.bind(("", 0))
            port[0] = sock.getsockname()[1]
    world.bcast_(port, 0)
    dist.init_process_group("gloo", init_method=f"tcp://{world.hosts()[0]}:{int(port[0])}",
                            rank=world.rank, world_size=p)
    log(f"(c) vs torch.distributed.pipelining (gloo): 4 stages x {args.layers} Linear({h},{h})+ReLU, batch {batch}, "
        f"m={m}, SGD step included; best-of-round medians over {args.rounds} alternating rounds of {args.iters} steps")
    x, y = torch.randn(batch, h), torch.randn(batch, h)
    loss = nn.MSELoss()
    for name, theirs_cls in [("gpipe", ScheduleGPipe), ("1f1b", Schedule1F1B)]:
        ours_model = dense(h, args.layers, seed=world.rank)
        their_model = dense(h, args.layers, seed=world.rank)
        ours = Pipe(world, [ours_model], schedules.get(name), loss)
        xs, ys = split_microbatches(x, m), split_microbatches(y, m)
        stage = PipelineStage(their_model, world.rank, p, torch.device("cpu"))
        sched = theirs_cls(stage, n_microbatches=m, loss_fn=loss)
        opt = torch.optim.SGD(their_model.parameters(), lr=1e-3)

        def theirs_step():
            opt.zero_grad(set_to_none=True)
            if world.rank == 0:
                sched.step(x)
            elif world.rank == p - 1:
                sched.step(target=y)
            else:
                sched.step()
            opt.step()

        def ours_step():
            ours.step(xs, ys)

        times = {"ours": [], "theirs": []}
        for fn in (ours_step, theirs_step):
            fn()                                   # warm-up (their shape inference, our first buffers)
        for _ in range(args.rounds):
            for key, fn in (("ours", ours_step), ("theirs", theirs_step)):
                world.barrier()
                t0 = time.perf_counter()
                for _ in range(args.iters):
                    fn()
                world.barrier()
                times[key].append((time.perf_counter() - t0) / args.iters)
        o, t = statistics.median(times["ours"]), statistics.median(times["theirs"])
        log(f"{name:<6} ours {o * 1e3:7.1f} ms/step   torch {t * 1e3:7.1f} ms/step   ours/theirs {o / t:.2f}   "
            f"(rounds ours {[round(a * 1e3, 1) for a in times['ours']]}, theirs {[round(a * 1e3, 1) for a in times['theirs']]})")
    dist.destroy_process_group()


def main(argv) -> int:
    ap = argparse.ArgumentParser(prog="python -m mpipar.bench pipeline", description=__doc__)
    ap.add_argument("--part", default="all", choices=["a", "b", "c", "all"])
    ap.add_argument("--schedules", default=",".join(SCHEDULES))
    ap.add_argument("--ms", default="8,16,32,64", help="(a) micro-batch counts")
    ap.add_argument("--tf", type=float, default=4.0, help="(a) forward ms per stage")
    ap.add_argument("--tb", type=float, default=8.0, help="(a) backward ms per stage")
    ap.add_argument("--steps", type=int, default=4, help="(a) steps per epoch for pipedream's stream")
    ap.add_argument("--repeats", type=int, default=5, help="(a) timed repeats (best kept: a shared host only ever adds time)")
    ap.add_argument("--mem-ms", default="8,100,1000", help="(b) micro-batch counts")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--mb-rows", type=int, default=16, help="(b) rows per micro-batch")
    ap.add_argument("--layers", type=int, default=2, help="(c) Linear layers per stage")
    ap.add_argument("--batch", type=int, default=256, help="(c) batch size")
    ap.add_argument("--tm", type=int, default=8, help="(c) micro-batches")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--wait", default="poll", choices=["spin", "poll"],
                    help="how our ranks wait: MPI_Wait (spins) or test + short sleeps (comm BOARD.poll)")
    ap.add_argument("--poll-us", type=float, default=10.0, help="first sleep between tests with --wait poll")
    ap.add_argument("--poll-cap-us", type=float, default=500.0,
                    help="with --wait poll: a wait's sleeps double up to this (0: no backoff; each wake-up "
                         "of a waiting rank takes a core from one that computes)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    world = World()
    failure.install(world.host)
    if args.wait == "poll":
        BOARD.use_polling(args.poll_us * 1e-6, args.poll_cap_us * 1e-6)
    log = (lambda *a: print(*a, flush=True)) if world.rank == 0 else (lambda *a: None)
    waits = args.wait if args.wait == "spin" else f"poll {args.poll_us:g} us" + (
        f" doubling to {args.poll_cap_us:g} us" if args.poll_cap_us > args.poll_us else "")
    log(f"mpipar.bench pipeline: {world.size} ranks, waits: {waits}, load average {load_average()}")
    if args.part in ("a", "all"):
        efficiency(world, args, log)
    if args.part in ("b", "all"):
        memory(world, args, log)
    if args.part in ("c", "all"):
        versus_torch(world, args, log)
    world.barrier()
    return 0
