"""The QM9 dipole GNN with data parallelism across machines plus a model split (default grid pp=2,dp=2).

Same model, data, loss and optimizer as hybrid-gnn-qm9; only the default plan differs: two
pipeline stages, each replicated twice, the replicas synced by our ring all-reduce per stage.
Needs 4 ranks by default; on other counts pass --grid pp=P,dp=D (e.g. -np 8 --grid pp=2,dp=4).
"""
from mpipar.app.registry import variant

EXAMPLE = variant(
    "hybrid-gnn-qm9", name="hybrid-dp-gnn-qm9",
    summary="QM9 dipole GNN, data parallel across machines + model split (default --grid pp=2,dp=2), "
            "Adam + MAE, test MAE in Debye",
    defaults=dict(grid="pp=2,dp=2"),
)
