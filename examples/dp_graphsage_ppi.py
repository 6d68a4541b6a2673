"""Unsupervised GraphSAGE on PPI (SYNTHETIC unless --data-dir), data parallel with the graph partitioned over the ranks.

Same model, sampled computation trees, loss and optimizers as graphsage-ppi; every rank trains on
its shard of each global batch of link triples (default --grid dp). The SAGE layers are
replicated (our all-reduce keeps them equal); the nodes are not: rank r owns an even share of
the node ids, their 50 features and their learnable embedding rows. A batch's computation trees
touch nodes of every rank, so each forward routes the needed ids to their owners and receives
the rows (data_parallel/partitioned.py, MPI_Alltoallv on a communicator of its own), and each
backward sends the fetched rows' gradients back as sparse rows, summed at the owner before its
SparseAdam step. The summary reports the bytes moved per step against a dense all-reduce of the
table; `--dense-table-grad` runs the replicated alternative. With --table-dropout 0 the result
equals single-process training (tests/mpi/cases_graphs.py).
"""
from mpipar.app.registry import variant

EXAMPLE = variant(
    "graphsage-ppi", name="dp-graphsage-ppi",
    summary="unsupervised GraphSAGE on PPI (SYNTHETIC unless --data-dir), data parallel over neighbour-sampled "
            "mini-batches with the nodes' features and embedding rows partitioned over the ranks (rows fetched "
            "by message, sparse gradients returned to their owners), micro-F1 of a linear classifier",
    defaults=dict(grid="dp"),
)
