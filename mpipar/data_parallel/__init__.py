"""data_parallel: our own all-reduce over the dp sub-World (message passing, shared memory on one
host, hierarchical across hosts), gradient buckets that overlap it with backward, and
DataParallel, which keeps replicas identical.

    plan.py        what every all-reduce plan is made of (ops, layout, scratch, Handle, Plan)
    algorithms.py  the message-passing all-reduces: pipelined ring, doubling, halving-doubling
    shm.py         the shared-memory ones: one host, and hierarchical across hosts
    compress.py    the ring across hosts with 16-bit messages and float32 sums (--grad-compress)
    reduce.py      all_reduce / reduce_scatter / all_gather: which algorithm, and running it
    buckets.py     gradients bucketed and reduced from autograd hooks; replica fingerprints
    wrapper.py     DataParallel
    zero.py        ShardedOptimizer: ZeRO stages 1 and 2 (optimizer state, then gradients, sharded over
                   the replicas), and the model-state bytes a rank holds against the formula
    zero3.py       ZeRO stage 3: the parameters sharded too, gathered one layer at a time
"""
from .buckets import DEFAULT_BUCKET_MB, GradBuckets
from .reduce import all_gather, all_reduce, all_reduce_start, choose_algorithm, make_plan, reduce_scatter, segment_of
from .wrapper import DataParallel

__all__ = ["all_reduce", "all_reduce_start", "all_gather", "reduce_scatter", "segment_of",
           "choose_algorithm", "make_plan", "DataParallel", "GradBuckets", "DEFAULT_BUCKET_MB"]
