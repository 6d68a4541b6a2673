"""The benchmarks still run and print their side-by-side tables (tiny sizes: these cases check that
the code works, never how fast; speed is read from full runs, see README's Benchmarks). Each runs
as `mpirun -np N python -m mpipar.bench NAME ...` runs it, its main(argv), on this job's ranks
(each was a job of its own: N ranks' start of torch saved); rank 0 checks what every rank printed.
The benchmarks that launch jobs themselves (oversubscribed, allreduce-hosts): tests/test_bench.py."""
import contextlib
import importlib
import io
import re

import pytest
import torch

from mpipar.comm.waits import BOARD
import job

NP = (2, 3, 4)
TIMEOUT = 240
QUICK = {2: ("test_bench_prints_its_table",)}


def sized_rows(out):
    return [line for line in out.splitlines() if re.match(r"\s+\d+ (KiB|MiB)\s", line)]


def p2p(out):
    rows = sized_rows(out)
    assert len(rows) == 5, out          # 4, 16, 64, 256 KiB, 1 MiB
    assert all(float(r.split()[-1]) > 0 for r in rows)


def allreduce(out):
    rows = [r for r in sized_rows(out) if r.rstrip().endswith("x")]
    assert [r.split()[0] + r.split()[1] for r in rows] == ["1KiB", "64KiB", "1MiB"], out
    assert "shm" in out     # 3 ranks on one host: auto picks the shared-memory all-reduce


def pipeline(out):
    assert "sleep calibration" in out
    for name in ("1f1b", "zb"):
        row = next(line for line in out.splitlines() if line.startswith(name))
        measured, ideal = float(row.split()[2]), float(row.split()[3])
        assert measured > 0 and ideal > 0, row


def pipeline_gpt(out):
    """Both pipelines ran the same work (equal step-0 losses) and the ratio is the times' own."""
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["gpipe"], ["1f1b"])]
    assert [r[0] for r in rows] == ["gpipe", "1f1b"], out
    for r in rows:
        ours_loss, torch_loss = float(r[r.index("ours") + 1]), float(r[r.index("torch") + 1])
        assert abs(ours_loss - torch_loss) <= 1e-5 * ours_loss, r       # (6 decimals printed)
        ours_ms, torch_ms = float(r[r.index("ms/step") - 1]), float(r[r.index("ms/step", r.index("ms/step") + 1) - 1])
        assert abs(float(r[r.index("ours/theirs") + 1]) - ours_ms / torch_ms) <= 0.01, r
    assert "verdict: step time ours/theirs" in out, out


def dp_gpt(out):
    """Three phases measured, and each printed ratio is the medians' own."""
    rate = {line.split()[0]: float(line.split("tokens/s")[0].split()[-1].replace(",", ""))
            for line in out.splitlines() if "tokens/s  (rounds:" in line}
    assert set(rate) == {"single", "ceiling", "dp"} and all(v > 0 for v in rate.values()), out
    ratios = dict(zip(*[iter(next(line for line in out.splitlines() if "dp/single" in line).split())] * 2))
    for name, (a, b) in {"dp/single": ("dp", "single"), "dp/ceiling": ("dp", "ceiling"),
                         "ceiling/single": ("ceiling", "single")}.items():
        assert abs(float(ratios[name].rstrip("x")) - rate[a] / rate[b]) <= 0.01, (name, out)


def dp_step(out):
    row = next(line for line in out.splitlines() if line.startswith("local "))
    times = dict(zip(row.split()[0::2], map(float, row.split()[1::2])))
    assert set(times) == {"local", "ours", "ours+bf16", "ddp-gloo", "pp2-ours"} and all(v > 0 for v in times.values()), out
    assert "synthetic inputs" in out and "ours/ddp-gloo" in out, out
    assert f"pp=2 x dp=1 (1F1B, 4 micro-batches; the same global batch): {times['pp2-ours']:.1f} ms" in out, out


def balance(out):
    rows = {(line.split()[0], line.split()[1]): line.split() for line in out.splitlines()
            if len(line.split()) > 2 and line.split()[1] in ("params", "layers", "time", "best")}
    assert set(rows) == {("1f1b", b) for b in ("params", "layers", "time", "best")} | {("eager-1f1b", "time")}, out
    assert float(rows[("1f1b", "best")][4].rstrip("x")) == 1.0, out
    assert all(float(r[3]) > 0 and 0 <= float(r[5]) < 1 for r in rows.values()), out
    assert rows[("1f1b", "time")][2] == rows[("eager-1f1b", "time")][2]     # the same cut under both


def zero(out):
    modes = {"dp", "zero1", "zero2", "zero3"}
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0] in modes}
    assert set(rows) == modes, out
    held = {k: float(r[1]) for k, r in rows.items()}
    assert held["zero3"] < held["zero2"] < held["zero1"] < held["dp"], out   # 16/N < 4+12/N < 8+8/N < 16
    assert all(abs(float(r[3]) - 1.0) <= 0.1 for r in rows.values()), out   # within 10% of the formula
    assert "synthetic inputs" in out


BENCHES = {   # name: (ranks, `python -m mpipar.bench` arguments, check of what the ranks printed)
    "p2p": (2, ["p2p", "--max-mib", "1", "--repeats", "1"], p2p),
    "dp-step": (2, ["dp_step", "--steps", "2", "--batch", "4", "--hybrid"], dp_step),
    "balance": (2, ["balance", "--examples", "pipeline-cifar", "--steps", "2", "--warmup", "1", "--microbatches", "2",
                    "--batch-size", "8"], balance),
    "zero": (2, ["zero", "--width", "64", "--depth", "2", "--steps", "2", "--warmup", "1"], zero),
    "allreduce": (3, ["allreduce", "--sizes", "1K,64K,1M", "--rounds", "2", "--no-gloo"], allreduce),
    "dp-gpt": (2, ["dp_gpt", "--steps", "2", "--warmup", "1", "--rounds", "1", "--batch", "4"], dp_gpt),
    "pipeline-gpt": (2, ["pipeline", "--part", "gpt", "--gpt-ms", "2", "--gpt-batch", "4", "--rounds", "1",
                         "--iters", "2"], pipeline_gpt),
    "pipeline": (4, ["pipeline", "--part", "a", "--schedules", "1f1b,zb", "--ms", "4", "--tf", "1", "--tb", "2",
                     "--repeats", "1"], pipeline),
}


@pytest.mark.parametrize("name", [n for n, (ranks, _, _) in BENCHES.items() if ranks == job.size()])
def test_bench_prints_its_table(world, name):
    _, (module, *argv), check = BENCHES[name]
    threads, poll, cap = torch.get_num_threads(), BOARD.poll, BOARD.poll_cap
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            assert (importlib.import_module(f"mpipar.bench.{module}").main(argv) or 0) == 0
    finally:   # torch's threads and the waits, which a benchmark sets for itself, back as the job had them
        torch.set_num_threads(threads)
        BOARD.poll, BOARD.poll_cap = poll, cap
    world.barrier()
    out = world.comm.gather(printed.getvalue())
    if world.rank == 0:
        check("".join(out))
