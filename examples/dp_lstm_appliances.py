"""Synchronous data-parallel LSTM on UCI Appliances energy, Adam + MSE, epochs/s and RMSE in Wh."""
from mpipar.app.registry import variant

EXAMPLE = variant(
    "layerwise-lstm-appliances",
    name="dp-lstm-appliances",
    summary="data-parallel stacked LSTM on UCI Appliances: replicas on every rank, ring all-reduce, "
            "Adam + MSE, RMSE in Wh vs persistence",
    defaults=dict(grid="dp", balance=None, microbatches=1),
)
