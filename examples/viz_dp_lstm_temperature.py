"""Synchronous data-parallel LSTM across machines on the temperature stream, speed and loss per machine.

The dashboard (dashboard.png, ranks.jsonl) shows each replica's own training loss beside the
job's, throughput per rank, and per rank the share of time spent waiting plus its traffic: MiB
sent as messages and MiB passed through host-shared memory (on one host the all-reduce is the
shared-memory one and sends no messages). The run prints which all-reduce each bucket uses.

The online phase of viz-mp-lstm-temperature runs here too: every replica forecasts each group of
streamed readings, then trains one step on its share of the group (the trainer's dp sharding, the
gradients averaged by the all-reduce), so --online-batch must be at least the replica count."""
from mpipar.app.registry import variant

EXAMPLE = variant(
    "viz-mp-lstm-temperature",
    name="viz-dp-lstm-temperature",
    summary="data-parallel LSTM (one replica per rank, our all-reduce: shared memory within a host, "
            "ring or hierarchical across hosts) on the NAB temperature stream, throughput, traffic and loss per "
            "machine, live plots; then forecasts and trains online on the timestamped test stream",
    defaults=dict(grid="dp", balance=None, batch_size=128),
)
