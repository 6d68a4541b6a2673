"""Every schedule, with no process: all ranks' lists simulated in one process (every send
received, no deadlock under the engine's send window), activations held as claimed, and the
bubble (unit F, B = 2F or B = W = F) equal to the schedule's formula."""
import itertools

import pytest

from mpipar.errors import ConfigError
from mpipar.pipeline import schedules, simulate
from mpipar.pipeline.schedules import Action

PS = [1, 2, 3, 4, 5, 8]
MS = [1, 2, 3, 4, 5, 7, 8, 12, 16, 32]
CASES = [(name, p, m, v) for name in ["gpipe", "1f1b", "eager-1f1b", "zb"] for p in PS for m in MS for v in [1]]
CASES += [("interleaved", p, m, v) for p in PS for m in MS for v in [2, 3, 4] if m % p == 0]
CASES += [("pipedream", p, m, 1) for p in PS for m in MS if m >= p]


def fits(name, p, m, v):
    try:
        schedules.get(name).check(p, m, v)
        return True
    except ConfigError:
        return False


@pytest.mark.parametrize("name, p, m, v", CASES, ids=[f"{n}-p{p}-m{m}-v{v}" for n, p, m, v in CASES])
def test_schedule_is_sound_bounded_and_has_its_bubble(name, p, m, v):
    steps = 3 if name == "pipedream" else 1
    lists = simulate.lists_for(name, p, m, v, steps)
    for window in (None, 8, 2):
        res = simulate.simulate(lists, v=v, send_window=window)
        assert res.bubble == pytest.approx(schedules.get(name).bubble(p, m * steps, v), abs=1e-9)
    # every (micro-batch, chunk) gets exactly one F and one B on every rank, and one W when split
    for s, acts in enumerate(lists):
        for op in ("F", "B"):
            got = sorted((a.mb, a.chunk) for a in acts if a.op == op)
            assert got == sorted(itertools.product(range(m * steps), range(v))), (s, op)
        ws = [a for a in acts if a.op == "W"]
        assert len(ws) == (m if name == "zb" else 0)
    peak = res.peak_held
    if name == "gpipe":
        assert peak == [m] * p
    elif name in ("1f1b", "pipedream"):
        assert peak == [min(p - s, m * steps) for s in range(p)]          # flat in m
    elif name == "eager-1f1b":
        assert peak == [min(p - s + (s < p - 1), m) for s in range(p)]    # one more, but the last stage
    elif name == "zb":
        assert peak == [min(p, m)] * p                                     # 1F1B's peak, held until W
    else:
        warm = [m * v if m == p else min(2 * (p - 1 - s) + (v - 1) * p + 1, m * v) for s in range(p)]
        assert peak == warm                                                # Megatron's warm-up + 1


def test_smaller_bubbles_for_interleaved_and_zero_bubble():
    p, m = 4, 16
    b = {n: simulate.run(n, p, m, 2 if n == "interleaved" else 1).bubble for n in ["1f1b", "interleaved", "zb"]}
    assert b["interleaved"] < b["1f1b"] / 1.8 and b["zb"] < b["1f1b"] / 2.5, b
    assert b["1f1b"] == pytest.approx(3 / 19)


@pytest.mark.parametrize("p, m", [(2, 8), (4, 8), (4, 16), (8, 16)])
def test_eager_1f1b_keeps_message_latency_off_the_critical_path(p, m):
    """With a latency per message (here 5% of a forward), 1F1B pays it in every steady-state
    micro-batch; eager-1f1b (one more warm-up forward) only while filling and draining. Longer
    latencies it hides in part."""
    ideal = simulate.run("1f1b", p, m).makespan
    plain, eager = (simulate.run(n, p, m, latency=0.05).makespan - ideal for n in ("1f1b", "eager-1f1b"))
    assert eager <= 2 * (p - 1) * 0.05 + 1e-9 < (m - 1) * 0.05 <= plain
    for latency in (0.1, 0.2, 0.5):
        assert simulate.run("eager-1f1b", p, m, latency=latency).makespan < \
            simulate.run("1f1b", p, m, latency=latency).makespan


def test_1f1b_memory_is_flat_in_m_while_gpipe_grows():
    for m in (8, 100, 1000):
        assert max(simulate.run("1f1b", 4, m).peak_held) == 4
    assert simulate.run("gpipe", 4, 1000).peak_held == [1000] * 4


def test_pipedream_streams_across_steps_and_updates_once_per_batch():
    p, m, steps = 4, 4, 5
    for s in range(p):
        stream = []
        for t in range(steps):
            acts = schedules.get("pipedream")(p, m, s, step=t, steps=steps)
            assert sorted(a.mb for a in acts if a.op == "F") == list(range(m))     # only its own batch's forwards
            stream += [(a.op, a.mb + (t if a.op == "OPT" else t * m)) for a in acts]
        opts = [i for i, (op, _) in enumerate(stream) if op == "OPT"]
        assert [stream[i][1] for i in opts] == list(range(steps))
        for b, i in enumerate(opts):                     # OPT b right after the batch's last backward
            assert stream[i - 1 - (s > 0)] == ("B", b * m + m - 1)
            # two weight versions suffice: batch b+2's first forward comes after OPT b
            if b + 2 < steps:
                assert i < stream.index(("F", (b + 2) * m))
    # the stream's only bubble is the epoch's: (p-1)/(T*m+p-1)
    assert simulate.run("pipedream", p, m, steps=steps).bubble == pytest.approx((p - 1) / (steps * m + p - 1))


def test_optimizer_steps_with_a_collective_do_not_deadlock():
    """An OPT with a collective inside (global-norm clipping) is a barrier: still sound."""
    for p, m in [(2, 2), (4, 4), (4, 9), (8, 8)]:
        simulate.run("pipedream", p, m, steps=3, opt_barrier=True)


def test_send_window_of_one_deadlocks_interleaved_so_the_engine_uses_more():
    with pytest.raises(simulate.DeadlockError, match="deadlock: rank .* waits for rank"):
        simulate.run("interleaved", 4, 8, 2, send_window=1)
    simulate.run("interleaved", 4, 8, 2, send_window=2)


def test_deadlock_is_reported_as_a_cycle():
    # rank 0 waits for a gradient before sending the activation rank 1 needs first
    lists = [[Action("F", 0), Action("RECV_B", 0), Action("SEND_F", 0), Action("B", 0)],
             [Action("RECV_F", 0), Action("F", 0), Action("B", 0), Action("SEND_B", 0)]]
    with pytest.raises(simulate.DeadlockError) as e:
        simulate.simulate(lists)
    assert str(e.value) == ("deadlock: rank 0 waits for RECV_B0 from rank 1 -> "
                            "rank 1 waits for RECV_F0 from rank 0")


def test_unmatched_messages_are_reported():
    # rank 0 never receives the gradient of micro-batch 1
    lists = [schedules.one_f_one_b(2, 2, 0)[:-2] + [Action("B", 1)], schedules.one_f_one_b(2, 2, 1)]
    with pytest.raises(simulate.UnmatchedError) as e:
        simulate.simulate(lists)
    assert str(e.value) == "unmatched: rank 1 waits for rank 0 to receive its grad of mb 1 -> rank 0 has finished"
    # rank 1 expects an activation rank 0 never sends
    lists = [[Action("F", 0)], [Action("RECV_F", 0), Action("F", 0)]]
    with pytest.raises(simulate.UnmatchedError, match="rank 1 waits for RECV_F0 from rank 0 -> rank 0 has finished"):
        simulate.simulate(lists)


def test_order_grid_reads_like_torch_pipelining():
    grid = simulate.order_grid(simulate.lists_for("1f1b", 2, 3))
    rows = [r.split() for r in grid.splitlines()[1:]]
    assert rows[0] == ["F0", "F0"] and rows[1] == ["F1", "B0"]


@pytest.mark.parametrize("name, p, m, v, needle", [
    ("interleaved", 4, 6, 2, "multiple of p=4, got 6; use --microbatches 8"),
    ("pipedream", 4, 3, 1, "at least p=4 micro-batches"),
    ("gpipe", 4, 4, 2, "one model chunk per rank, but the rank map gives 2"),
    ("1f1b", 4, 0, 1, "must be >= 1"),
])
def test_configurations_that_do_not_fit_fail_with_one_line(name, p, m, v, needle):
    with pytest.raises(ConfigError, match=None) as e:
        schedules.get(name)(p, m, 0, v)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_names_and_chunks():
    assert schedules.get("zb-h1").name == "zb" and schedules.get("2bw").name == "pipedream"
    with pytest.raises(ConfigError, match="unknown schedule 'nope'; choose one of gpipe, 1f1b"):
        schedules.get("nope")
    assert schedules.get("interleaved").chunks == 2 and schedules.get("1f1b", None).chunks == 1
    assert schedules.get("interleaved", 3).chunks == 3 and schedules.get(schedules.get("2bw")).streaming
    with pytest.raises(ConfigError, match="--chunks 3 needs --schedule interleaved"):
        schedules.get("zb", 3)
