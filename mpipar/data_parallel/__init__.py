"""data_parallel: our own all-reduce over the dp sub-World (message passing, shared memory on one
host, hierarchical across hosts), gradient buckets that overlap it with backward, DataParallel,
which keeps replicas identical, and ZeRO, which shards them instead.

    plan.py         what every all-reduce plan is made of (ops, layout, scratch, Handle, Plan)
    algorithms.py   the message-passing all-reduces: pipelined ring, doubling, halving-doubling
    compress.py     the ring across hosts with 16-bit messages and float32 sums (--grad-compress)
    shm.py          the shared-memory collectives of one host: all-reduce, reduce-scatter, all-gather
    choice.py       which all-reduce `auto` runs for a size, a rank count and the hosts' layout
    hier.py         the hierarchical collectives across hosts: on each host through shared memory,
                    across hosts one vector per host, cut into slices every local rank carries
    reduce.py       all_reduce / reduce_scatter / all_gather: choosing the algorithm, and running it
    samples.py      each replica's sample count per backward pass: the weights of the gradient mean
    buckets.py      gradients bucketed and reduced from autograd hooks; replica fingerprints
    partitioned.py  tables partitioned over the replicas, rows fetched from their owners by message
    wrapper.py      DataParallel
    zero3.py        ZeRO stage 3: the parameters sharded too, gathered one layer at a time
    zero.py         ShardedOptimizer: ZeRO stages 1 and 2 (optimizer state, then gradients, sharded
                    over the replicas), and stage 3 through zero3.py
    memory.py       the model-state bytes a rank holds, and the ZeRO paper's formula to check them by
"""
from .buckets import DEFAULT_BUCKET_MB, GradBuckets
from .reduce import all_gather, all_reduce, all_reduce_start, choose_algorithm, make_plan, reduce_scatter, segment_of
from .wrapper import DataParallel

__all__ = ["all_reduce", "all_reduce_start", "all_gather", "reduce_scatter", "segment_of",
           "choose_algorithm", "make_plan", "DataParallel", "GradBuckets", "DEFAULT_BUCKET_MB"]
