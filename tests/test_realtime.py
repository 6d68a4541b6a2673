"""mpipar/realtime.py against a fake clock, where an infer of known duration makes every latency,
queue length, throughput and deadline miss exact. That the two realtime examples on 2 ranks print
a sane `serving:` line: tests/mpi/cases_example_runs.py."""
import numpy as np
import pytest

from mpipar.app import realtime
from mpipar.app.realtime import FakeClock, arrival_times, serve, summarize, summarize_log


def fake_server(arrivals, infer_s, **kw):
    """serve() on a fake clock where every batch takes infer_s seconds, whatever its size."""
    fc = FakeClock()
    sizes = []

    def infer(batch):
        sizes.append(len(batch))
        fc.sleep(infer_s)
        return len(batch)

    return serve(arrivals, infer, clock=fc.clock, sleep=fc.sleep, **kw), sizes


# -- arrivals -----------------------------------------------------------------------------------
def test_fixed_rate_spacing_is_exact():
    a = arrival_times(100, 50)
    assert a == [i / 100 for i in range(50)]
    assert arrival_times(100, duration=0.5) == a                    # 0 .. 0.49: 50 before 0.5 s
    assert arrival_times(100, 10, duration=0.5) == a[:10]            # whichever ends first
    assert arrival_times(100, 80, duration=0.2) == a[:20]


def test_poisson_is_reproducible_and_has_the_asked_mean_gap():
    a = arrival_times(200, 20000, process="poisson", seed=7)
    assert a == arrival_times(200, 20000, process="poisson", seed=7)
    assert a != arrival_times(200, 20000, process="poisson", seed=8)
    gaps = np.diff(a)
    assert a[0] == 0 and (gaps >= 0).all()
    assert abs(gaps.mean() - 1 / 200) < 0.03 / 200                 # mean gap 5 ms within 3 %
    assert abs(gaps.std() / gaps.mean() - 1) < 0.05                 # exponential: std = mean
    d = arrival_times(200, duration=2.0, process="poisson", seed=7)
    assert d == [t for t in a if t < 2.0]


def test_bad_arrival_settings_are_refused():
    for kw in (dict(rate=0, requests=5), dict(rate=10), dict(rate=10, requests=5, process="bursty")):
        with pytest.raises(ValueError):
            arrival_times(**kw)


# -- serving: latency, queueing, deadlines, throughput -------------------------------------------
def test_overloaded_server_queue_grows_and_misses_are_countable():
    """100 req/s, 15 ms per batch, batch 1: request i starts at 15i ms, ends at 15(i+1) ms, so its
    latency is 15 + 5i ms; with a 30 ms deadline requests 4.. miss."""
    n = 100
    log, sizes = fake_server(arrival_times(100, n), 0.015, max_batch=1)
    assert sizes == [1] * n and log.batches == n
    for i, r in enumerate(log.records):
        assert r.index == i and r.start == pytest.approx(0.015 * i, abs=1e-12)
        assert r.latency == pytest.approx(0.015 + 0.005 * i, abs=1e-12)
    # waiting just before batch i (at 15i ms): arrivals at 10j <= 15i ms, less the i served
    assert log.max_queue == max(min(n, 15 * i // 10 + 1) - i for i in range(n)) == 34
    s = summarize_log(log, deadline=0.030, offered=100)
    assert (s.completed, s.missed) == (n, n - 4) and s.missed_share == pytest.approx(0.96)
    assert s.achieved == pytest.approx(1 / 0.015)                  # the server's rate, not the offered
    lat_ms = [15 + 5 * i for i in range(n)]
    assert (s.p50_ms, s.p95_ms, s.p99_ms) == pytest.approx(tuple(np.percentile(lat_ms, [50, 95, 99])))


def test_batching_keeps_up_and_nothing_misses():
    """The same load with batches of up to 4: the 15 ms batches carry 1 or 2 requests each, so
    no request waits more than one batch: latency at most 10 + 15 = 25 ms."""
    n = 100
    log, sizes = fake_server(arrival_times(100, n), 0.015, max_batch=4)
    assert sum(sizes) == n and max(sizes) == 2 and log.max_queue == 2
    assert max(r.latency for r in log.records) == pytest.approx(0.025, abs=1e-12)
    s = summarize_log(log, deadline=0.030, offered=100)
    assert s.missed == 0 and s.max_queue == 2
    assert s.achieved == pytest.approx(n / (log.records[-1].done - 0.0))


def test_unloaded_server_latency_is_the_service_time():
    log, sizes = fake_server(arrival_times(100, 10), 0.005, max_batch=8)
    assert sizes == [1] * 10 and log.max_queue == 1
    assert all(r.latency == pytest.approx(0.005, abs=1e-12) and r.start == r.arrival for r in log.records)
    s = summarize_log(log, deadline=0.004, offered=100)
    assert s.missed == 10 and s.achieved == pytest.approx(10 / 0.095)   # last answer at 95 ms


def test_max_wait_holds_a_batch_but_never_past_it():
    a = arrival_times(100, 9)
    log, sizes = fake_server(a, 0.005, max_batch=4, max_wait=0.025)   # 0, 10, 20 wait until 25 ms
    assert sizes[0] == 3 and log.records[0].start == pytest.approx(0.025, abs=1e-12)
    assert all(r.start - r.arrival <= 0.025 + 1e-12 for r in log.records)
    log, sizes = fake_server(a, 0.005, max_batch=3, max_wait=0.025)   # full at 20 ms: goes then
    assert sizes == [3, 3, 3] and [log.records[i].start for i in (0, 3, 6)] == pytest.approx([0.02, 0.05, 0.08])
    log, sizes = fake_server(a[:2], 0.005, max_batch=4, max_wait=0.025)   # nothing more to come: no hold
    assert sizes == [2] and log.records[0].start == pytest.approx(0.01, abs=1e-12)


def test_inputs_are_sliced_in_arrival_order_and_outputs_kept():
    fc = FakeClock()
    log = serve(arrival_times(1000, 7), lambda xb: list(xb), inputs=list("abcdefg"), max_batch=3,
                clock=fc.clock, sleep=lambda s: fc.sleep(s if s > 0.0015 else 0.003))
    assert sum(log.outputs, []) == list("abcdefg") and max(map(len, log.outputs)) <= 3


def test_follower_serves_the_sizes_it_is_told():
    sizes, seen = iter([2, 3, 1, 0]), []
    assert realtime.follow(lambda: next(sizes), seen.append, list(range(10))) == 3
    assert seen == [[0, 1], [2, 3, 4], [5]]


def test_real_clock_never_starts_a_request_before_it_arrives():
    log = serve(arrival_times(500, 20), lambda b: None, max_batch=4)
    assert len(log.records) == 20 and all(r.start >= r.arrival and r.done >= r.start for r in log.records)


def test_summary_pools_servers_and_prints_one_line():
    """Latencies 4, 20 and 3 ms from two servers; percentiles interpolate (numpy's default, as the
    training report's), the answer span is 0 .. 30 ms."""
    s = summarize([0.0, 0.01, 0.005], [0.004, 0.03, 0.008], deadline=0.010, offered=300, max_queue=3,
                  process="poisson")
    assert (s.completed, s.missed) == (3, 1) and s.achieved == pytest.approx(3 / 0.03)
    assert s.line() == ("serving: poisson 300 req/s offered, 100 achieved, latency p50 4.0 ms p95 18.4 ms "
                        "p99 19.7 ms, 1/3 (33.3%) missed the 10 ms deadline, max queue 3")
    assert summarize([], [], 0.01, 100, 0).completed == 0
