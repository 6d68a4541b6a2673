"""How the layers are cut into stages by what they cost: every layer profiled once (shared by the
ranks, cached), the cut that makes the slowest stage as fast as it can be within a memory limit,
and the table that shows the user the balance and what the simulator predicts for it."""
from __future__ import annotations

import itertools
import os

import torch

from ..errors import ConfigError
from ..model import param_counts
from ..rankmap import Balance, interleaved_partition, linear_partition, parse_balance, stages_from_sizes
from .schedules import Schedule


def shared_costs(specs, sample: torch.Tensor, world=None, seed: int = 0, log=None) -> list:
    """Every layer's cost (profile.LayerCost) on the micro-batch `sample`, the same on every
    rank of `world`, so all cut alike. Rank 0's cached profile if it has one; otherwise the
    ranks on rank 0's host, up to one per core, each measure an even share of the layers at
    once (so stages are timed with their neighbours busy, as in training), and rank 0 stores
    the result. A rank whose layer fails to run ends the job with one line."""
    from ..profile import LayerCost, layer_costs, profile_layers, read_cache, write_cache
    if world is None or world.size == 1:
        return layer_costs(specs, sample, seed, log)
    n, hosts = len(specs), world.hosts()
    local = [r for r, h in enumerate(hosts) if h == hosts[0]]
    head = torch.zeros(2, dtype=torch.float64)          # [cached?, ranks that profile]
    cached = None
    if world.rank == 0:
        cached = read_cache(specs, sample)
        head[:] = torch.tensor([cached is not None, min(n, len(local), os.cpu_count() or 1)])
    world.bcast_(head, 0)
    table = torch.zeros(3, n, dtype=torch.float64)     # seconds, saved bytes, parameter bytes
    if head[0]:
        if cached is not None:
            table[:] = torch.tensor([[c.seconds, c.saved_bytes, c.param_bytes] for c in cached], dtype=torch.float64).T
            if log:
                log("layer costs: cached profile")
        world.bcast_(table, 0)
    else:
        k = int(head[1])
        profilers = local[:k]
        if world.rank in profilers:
            i = profilers.index(world.rank)
            mine = range(i * n // k, (i + 1) * n // k)
            for j, c in zip(mine, profile_layers(specs, sample, seed, which=mine)):
                table[:, j] = torch.tensor([c.seconds, c.saved_bytes, c.param_bytes], dtype=torch.float64)
        table = torch.from_numpy(world.allgather_floats(table.reshape(-1).numpy()).sum(0).reshape(3, n))
        if log:
            log(f"layer costs: profiled on {k} rank(s) at once, {-(-n // k)} layer(s) each at most")
    costs = [LayerCost(s.name, float(table[0, i]), int(table[1, i]), int(table[2, i])) for i, s in enumerate(specs)]
    if world.rank == 0 and not head[0]:
        write_cache(specs, sample, costs)
    return costs


STATE_PER_PARAM_BYTE = 4   # parameters, gradients and two optimizer states (fp32 Adam)


def stage_memory(costs, inflight):
    """memory(j, a, b): bytes virtual stage j needs for layers a..b-1 -- parameters, gradients
    and optimizer state, plus what autograd saves per micro-batch times the micro-batches the
    schedule keeps in flight there (`inflight[j]`)."""
    state = [0]
    saved = [0]
    for c in costs:
        state.append(state[-1] + STATE_PER_PARAM_BYTE * c.param_bytes)
        saved.append(saved[-1] + c.saved_bytes)
    return lambda j, a, b: state[b] - state[a] + inflight[j] * (saved[b] - saved[a])


def inflight_per_stage(schedule: Schedule, p: int, m: int, v: int) -> list[int]:
    """Micro-batches whose activations virtual stage j holds at once (the simulator's peak per
    rank, shared by that rank's v chunks)."""
    from .simulate import run
    peak = run(schedule, p, max(m, 1), v).peak_held
    return [-(-peak[j % p] // v) for j in range(p * v)]


def balance_table(stages, costs, schedule: Schedule, p: int, m: int, v: int, inflight) -> tuple[str, float, float]:
    """The chosen balance as people read it -- per virtual stage its layers, forward+backward
    ms per micro-batch, share of the total and estimated memory -- and the step time and bubble
    the simulator predicts for the schedule with these costs. Returns (text, predicted seconds,
    predicted bubble)."""
    from .simulate import lists_for, simulate
    where = {c.name: c for c in costs}
    per = [sum(where[n].seconds for n in layers) for layers in stages]
    memory = stage_memory([where[n] for layers in stages for n in layers], inflight)
    total = sum(per) or 1.0
    lists = lists_for(schedule, p, max(m, 1), v)
    split = any(a.op == "W" for acts in lists for a in acts)
    share = {"F": 1 / 3, "B": 1 / 3 if split else 2 / 3, "W": 1 / 3}   # backward ~ 2x forward

    def durations(r, a):
        return per[a.chunk * p + r] * share[a.op] if a.op in share else 0.0
    result = simulate(lists, v=v, durations=durations)
    rows = [f"{'stage':>5} {'rank':>4}  {'layers':<24} {'ms/mb':>7} {'share':>6} {'memory':>9}"]
    start = 0
    for j, layers in enumerate(stages):
        span = layers[0] if len(layers) == 1 else f"{layers[0]}..{layers[-1]}"
        mem = memory(j, start, start + len(layers))
        start += len(layers)
        rows.append(f"{j:>5} {j % p:>4}  {span:<24} {per[j] * 1e3:>7.2f} {per[j] / total:>6.0%} "
                    f"{mem / 2 ** 20:>7.1f} Mi")
    rows.append(f"predicted for {schedule}, {m} micro-batch(es): {result.makespan * 1e3:.1f} ms per step "
                f"of compute, bubble {result.bubble:.3f} (forward+backward measured per layer; "
                f"memory: 4 bytes of state per parameter byte + saved activations x micro-batches in flight)")
    return "\n".join(rows), result.makespan, result.bubble


def partition(specs, balance: Balance | str | list, n_stages: int, world=None, sample: torch.Tensor | None = None,
              seed: int = 0, costs=None, memory=None, limit: float | None = None,
              chunks: int = 1) -> list[list[str]]:
    """Layers per virtual stage. `balance` (a Balance, or what Balance.parse takes): 'time' (the
    slowest stage as fast as it can be, by each layer's forward+backward time on the micro-batch
    `sample`, measured once by the ranks and cached; within `limit` bytes per stage by `memory`,
    see stage_memory; with `chunks` > 1 per rank, by each rank's sum of its chunks), 'params'
    (even parameter counts), 'layers', sizes like [3, 3, 2, 2] or '3,3,2,2', or a JSON file.
    `costs`: shared_costs already measured. A computed cut that leaves a stage without
    parameters is made again by weighted_cut when the model has a layer with weights per stage."""
    names = [s.name for s in specs]
    balance = Balance.parse(balance)
    times = None
    if balance.kind == "time" and n_stages > 1:
        parse_balance(Balance("layers"), names, n_stages)   # enough layers for the stages? (before profiling)
        if costs is None and sample is None:
            raise ConfigError("balance='time' profiles the layers on a micro-batch: pass sample=x")
        costs = costs or shared_costs(specs, sample, world, seed)
        times = [c.seconds for c in costs]
    elif balance.kind == "time":
        return [names]
    counts = param_counts(specs)
    stages = parse_balance(balance, names, n_stages, counts, times, memory, limit, chunks)
    weighted = {n for n, c in zip(names, counts) if c}
    if (balance.kind in ("sizes", "file") or all(weighted & set(st) for st in stages)
            or len(weighted) < n_stages):
        return stages    # the user's own cut; every stage with weights; or too few layers with weights
    weights = {"params": counts, "layers": [1] * len(names), "time": times}[balance.kind]
    return weighted_cut(names, counts, weights, n_stages, memory if times else None, limit, chunks if times else 1)


def weighted_cut(names, counts, weights, n_stages: int, memory=None, limit: float | None = None,
                 chunks: int = 1) -> list[list[str]]:
    """The cut over units that each hold parameters -- a layer with weights and the layers
    without any after it (those before the first join it) -- so that every stage's optimizer
    has something to step (a stage without any gets Pipeline.parameters()'s placeholder).
    Needs at least n_stages layers with weights; `weights`, `memory`, `limit` and `chunks` as in
    rankmap.linear_partition and interleaved_partition, per layer."""
    starts = [i for i, c in enumerate(counts) if c]
    bounds = [0] + starts[1:] + [len(names)]
    unit = [sum(weights[a:b]) for a, b in zip(bounds, bounds[1:])]
    held = (lambda j, a, b: memory(j, bounds[a], bounds[b])) if memory else None
    sizes = (interleaved_partition(unit, n_stages // chunks, chunks, held, limit) if chunks > 1
             else linear_partition(unit, n_stages, held, limit))
    at = [0, *itertools.accumulate(sizes)]
    return stages_from_sizes(names, [bounds[b] - bounds[a] for a, b in zip(at, at[1:])])
