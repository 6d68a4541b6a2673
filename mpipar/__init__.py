"""mpipar: an MPI-native parallelism engine for PyTorch training (pipeline, tensor and data
parallelism over mpi4py communicators).

The public API, for your own model and your own loop (README, "Your own model"):

    topo = mpipar.init(grid="pp=2,dp=2")                  # MPI, the grid, this rank's place in it
    pipe = mpipar.Pipeline(model, topo, schedule="1f1b", microbatches=4, loss_fn=nn.MSELoss())
    loss = pipe.step(x, y)                                 # forward + backward of one batch
    opt.step()                                             # your optimizer, this rank's parameters

`DataParallel` keeps replicas of a module identical in a plain loop, `ShardedOptimizer` shards
the optimizer state, gradients and (stage 3) parameters over them instead (ZeRO), `mpipar.tensor` has the
column/row-parallel layers, `Checkpoint` saves and resumes from a user loop, `batches` cuts a
Dataset into this rank's shard of every global batch, and `Trainer` is the loop that
`python -m mpipar.run` drives.
"""
from .data_parallel.wrapper import DataParallel
from .data_parallel.zero import ShardedOptimizer
from .model import LayerSpec
from .pipeline.pipe import DataParallelOptions, Pipeline
from .rankmap import Grid
from .topology import Topology, init
from .train.batches import batches
from .train.checkpointing import Checkpoint
from .train.trainer import TrainConfig, Trainer
from .version import __version__

__all__ = ["init", "Topology", "Grid", "Pipeline", "LayerSpec", "DataParallel", "DataParallelOptions", "ShardedOptimizer",
           "Checkpoint", "batches",
           "Trainer", "TrainConfig", "__version__"]
