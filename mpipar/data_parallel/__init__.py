"""data_parallel: our own ring all-reduce over the dp sub-World, gradient buckets that overlap
communication with backward, and the DataParallel wrapper that keeps replicas identical.

Imports are lazy so `flags` (read by the command-line parser) never initialises MPI."""
__all__ = ["all_reduce", "all_reduce_start", "all_gather", "reduce_scatter", "segment_of",
           "choose_algorithm", "make_plan", "DataParallel", "GradBuckets"]


def __getattr__(name):
    if name in ("DataParallel",):
        from . import wrapper
        return getattr(wrapper, name)
    if name in ("GradBuckets",):
        from . import buckets
        return getattr(buckets, name)
    if name in __all__:
        from . import ring
        return getattr(ring, name)
    raise AttributeError(name)
