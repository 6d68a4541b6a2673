"""Unsupervised GraphSAGE on PPI (SYNTHETIC unless --data-dir), data parallel with neighbour-sampled mini-batches.

Same model, sampled computation trees, loss and optimizers as graphsage-ppi; every rank holds a
replica and trains on its shard of each global batch of link triples (default --grid dp). The
embedding table's gradient is made dense so our ring all-reduce can sum it, then sparsified to
the touched rows before SparseAdam (open cost: the dense all-reduce moves the whole table).
"""
from mpipar.registry import variant

EXAMPLE = variant(
    "graphsage-ppi", name="dp-graphsage-ppi",
    summary="unsupervised GraphSAGE on PPI (SYNTHETIC unless --data-dir), data parallel over neighbour-sampled "
            "mini-batches, SparseAdam for the embedding table, micro-F1 of a linear classifier",
    defaults=dict(grid="dp"),
)
