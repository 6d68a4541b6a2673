"""Synchronous data-parallel CNN on CIFAR-10 (one replica per rank, our ring all-reduce), SGD."""
from mpipar.app.registry import variant

EXAMPLE = variant(
    "split-cnn",
    name="dp-cifar",
    summary="data-parallel CNN on CIFAR-10: replicas on every rank (across hosts with --hostfile), "
            "bucketed ring all-reduce overlapped with backward, SGD + cross-entropy",
    defaults=dict(grid="dp", batch_size=128),
)
