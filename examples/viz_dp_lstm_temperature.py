"""Synchronous data-parallel LSTM across machines on the temperature stream, speed and loss per machine."""
from mpipar.registry import variant

EXAMPLE = variant(
    "viz-mp-lstm-temperature",
    name="viz-dp-lstm-temperature",
    summary="data-parallel LSTM (one replica per rank, ring all-reduce) on the NAB temperature stream, "
            "throughput and communication per machine, live plots",
    defaults=dict(grid="dp", balance=None, batch_size=128),
)
