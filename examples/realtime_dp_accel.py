"""Real-time activity recognition, data parallel: the realtime-mp-accel CNN replicated on every rank."""
from mpipar.registry import variant

EXAMPLE = variant(
    "realtime-mp-accel",
    name="realtime-dp-accel",
    summary="1-D CNN on BasicMotions IMU windows replicated on every rank (synchronous gradients), "
            "Adam + cross-entropy, latency percentiles - compare with realtime-mp-accel",
    defaults=dict(grid="dp", balance=None),
)
