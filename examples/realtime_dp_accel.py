"""Real-time activity recognition, data parallel: the realtime-mp-accel CNN replicated on every rank.

Same flags and the same `serving:` line as realtime-mp-accel (its after_fit, inherited): after
training, every rank serves its round-robin share of the requests (rate/ranks each) with its own
whole replica, no messages per batch; the ranks' latencies are gathered into one summary. Next
to realtime-mp-accel on 2 ranks it shows the other side of the trade: a request crosses no
stage boundary, so latency is one replica's compute plus queueing, and capacity grows with the
replicas instead of being capped by the slowest stage plus the hops.
"""
from mpipar.app.registry import variant

EXAMPLE = variant(
    "realtime-mp-accel",
    name="realtime-dp-accel",
    summary="1-D CNN on BasicMotions IMU windows replicated on every rank (synchronous gradients), "
            "Adam + cross-entropy, latency percentiles, then served under an arrival process, requests "
            "dealt round-robin - compare with realtime-mp-accel",
    defaults=dict(grid="dp", balance=None),
)
