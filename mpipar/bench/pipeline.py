"""pipeline: (a) schedule efficiency with stages that sleep (no CPU, so 4+ ranks on 2 cores is
honest): measured step time against the simulated ideal of the same schedule; (b) activation
memory: peak RSS and peak stashed micro-batches for 1F1B vs GPipe as m grows; (c) step time
against torch.distributed.pipelining (ScheduleGPipe / Schedule1F1B on gloo), same model,
micro-batches and ranks; (gpt) the same against torch for a user's GPT module (not a Sequential),
cut at the same blocks by our Pipeline(split=) (torch.fx) and by their pipeline(split_spec=)
(torch.export). Run: mpirun -np 4 python -m mpipar.bench pipeline [--part a|b|c|gpt]."""
from __future__ import annotations

import argparse
import math
import socket
import statistics
import time

import torch
from torch import nn

from ..comm import World, failure
from ..comm.waits import BOARD
from ..pipeline import schedules, simulate, timeline
from ..pipeline.pipe import Pipeline, split_microbatches
from ..rankmap import Grid
from ..tensor.gpt import ReferenceGPT
from ..topology import Topology
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


def init_gloo(world):
    """torch.distributed on gloo beside MPI, for torch's pipelining (only this benchmark uses it):
    rendezvous on rank 0's host at a port it picked."""
    import torch.distributed as dist
    port = torch.zeros(1, dtype=torch.int64)
    if world.rank == 0:
        with socket.socket() as sock:
            sock.bind(("", 0))
            port[0] = sock.getsockname()[1]
    world.bcast_(port, 0)
    dist.init_process_group("gloo", init_method=f"tcp://{world.hosts()[0]}:{int(port[0])}",
                            rank=world.rank, world_size=world.size)
    return dist


def versus_torch(world, args, log) -> None:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
    p, h, m, batch = world.size, args.hidden, args.tm, args.batch
    dist = init_gloo(world)
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


GPT = dict(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128)   # nanoGPT's CPU run, characters


def lm_loss(out, y):
    """Next-token cross-entropy, the mean over a micro-batch's tokens."""
    return nn.functional.cross_entropy(out.flatten(0, 1), y.flatten())


def gpt() -> ReferenceGPT:
    """The same initial weights on every rank and for both pipelines."""
    torch.manual_seed(0)
    return ReferenceGPT(**GPT)


def gpt_versus_torch(world, args, log) -> None:
    """The GPT cut before the same blocks on p ranks by our Pipeline (torch.fx) and by torch's
    pipeline() (torch.export), the same batch, micro-batches, schedule and AdamW step; their
    step-0 losses must agree (the same work is timed), then rounds of each alternate, which goes
    first swapping every round so the host's noise falls on both alike. Their pipeline replicates
    the tied embedding/head on both stages without summing its gradients (a TODO in torch's
    pipelining/_IR.py), so only their step 0 equals single-process training; ours sums them, a
    cost only ours pays."""
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, SplitPoint, pipeline
    p, s, n, T = world.size, world.rank, args.gpt_batch, GPT["block_size"]
    ms = [int(v) for v in args.gpt_ms.split(",")]
    if p > GPT["n_layer"] or any(n % m for m in ms):
        raise SystemExit(f"--part gpt: at most {GPT['n_layer']} ranks (one block each at least) and a --gpt-batch "
                         f"that every --gpt-ms divides (torch's schedules weigh micro-batches equally)")
    dist = init_gloo(world)
    topo = Topology.build(world, Grid(pp=p))
    cuts = [f"blocks.{GPT['n_layer'] * i // p}" for i in range(1, p)]
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randint(0, GPT["vocab_size"], (n, T), generator=g) for _ in "xy")
    log(f"(gpt) vs torch.distributed.pipelining (gloo): ReferenceGPT {GPT}, cut before {cuts} (our Pipeline split= "
        f"by torch.fx; their pipeline split_spec= by torch.export), batch {n}, AdamW step included; the best "
        f"of {args.rounds} alternating rounds of {args.iters} steps each")
    ratios, cpu_ratios = [], []
    for name, theirs_cls in [("gpipe", ScheduleGPipe), ("1f1b", Schedule1F1B)]:
        for m in ms:
            ours = Pipeline(gpt(), topo, split=cuts, schedule=name, microbatches=m, loss_fn=lm_loss)
            ours_opt = torch.optim.AdamW(ours.parameters(), lr=1e-3)
            their_pipe = pipeline(gpt(), mb_args=(x[:n // m],), split_spec={c: SplitPoint.BEGINNING for c in cuts})
            stage = their_pipe.build_stage(s, torch.device("cpu"))
            sched = theirs_cls(stage, n_microbatches=m, loss_fn=lm_loss)
            their_opt = torch.optim.AdamW(stage.submod.parameters(), lr=1e-3)

            def ours_step():
                ours_opt.zero_grad(set_to_none=True)
                loss = ours.step(x, y)
                ours_opt.step()
                return loss

            def theirs_step():
                their_opt.zero_grad(set_to_none=True)
                losses = []
                if s == 0:
                    sched.step(x)
                elif s == p - 1:
                    sched.step(target=y, losses=losses)
                else:
                    sched.step()
                their_opt.step()
                return float(torch.stack(losses).mean()) if losses else None

            first = world.allgather_floats([ours_step() or 0.0, theirs_step() or 0.0])[p - 1]   # the last stage's
            if not math.isclose(first[0], first[1], rel_tol=1e-5):
                raise RuntimeError(f"--part gpt {name} m={m}: step-0 loss ours {first[0]:.7f} but torch's "
                                   f"{first[1]:.7f}: the two pipelines do not run the same model")
            times, cpu = {"ours": [], "theirs": []}, {"ours": 0.0, "theirs": 0.0}
            for r in range(args.rounds):
                for key, fn in (("ours", ours_step), ("theirs", theirs_step))[::1 if r % 2 == 0 else -1]:
                    world.barrier()
                    t0, c0 = time.perf_counter(), time.process_time()
                    for _ in range(args.iters):
                        fn()
                    cpu[key] += time.process_time() - c0
                    world.barrier()
                    times[key].append((time.perf_counter() - t0) / args.iters)
            o, t = min(times["ours"]), min(times["theirs"])     # a shared host only ever adds time
            ratios.append(o / t)
            # CPU time (all threads) per step, mean over ranks: what each pipeline costs, which other
            # load on the host barely changes (wall time it does)
            c_ours, c_theirs = world.allgather_floats([cpu["ours"], cpu["theirs"]]).mean(0) / (args.rounds * args.iters)
            cpu_ratios.append(c_ours / c_theirs)
            log(f"{name:<6} m={m:<3} step-0 loss ours {first[0]:.6f} torch {first[1]:.6f}   ours {o * 1e3:7.1f} ms/step   "
                f"torch {t * 1e3:7.1f} ms/step   ours/theirs {o / t:.2f}   CPU ms/step per rank ours "
                f"{c_ours * 1e3:.1f} torch {c_theirs * 1e3:.1f}   (rounds ours {[round(a * 1e3, 1) for a in times['ours']]}, "
                f"torch {[round(a * 1e3, 1) for a in times['theirs']]})")
    worst = max(ratios)
    log(f"verdict: step time ours/theirs {min(ratios):.2f}..{worst:.2f} on {p} ranks: "
        f"{'met' if worst <= 0.8 else 'NOT met'} (target <= 0.8); CPU time ours/theirs {min(cpu_ratios):.2f}.."
        f"{max(cpu_ratios):.2f}; load average {load_average()}")
    dist.destroy_process_group()


def main(argv) -> int:
    ap = argparse.ArgumentParser(prog="python -m mpipar.bench pipeline", description=__doc__)
    ap.add_argument("--part", default="all", choices=["a", "b", "c", "gpt", "all"])
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
    ap.add_argument("--gpt-batch", type=int, default=16, help="(gpt) sequences of 64 characters per step")
    ap.add_argument("--gpt-ms", default="4,8", help="(gpt) micro-batch counts")
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
    if args.part == "gpt" or (args.part == "all" and world.size <= GPT["n_layer"]):
        gpt_versus_torch(world, args, log)
    world.barrier()
    return 0
