"""tensor: intra-layer (Megatron-style) parallelism over the tp sub-World — each rank computes a
slice of the neurons of every layer."""
from .attention import ParallelSelfAttention
from .group import CommCounter, TPGroup
from .init import counter_init_
from .linear import ColumnParallelLinear, RowParallelLinear
from .mappings import copy_to_tp, gather_from_tp, reduce_from_tp, scatter_to_tp
from .mlp import ParallelMLP, reference_mlp
from .norm import ShardedBatchNorm1d
from .sharding import (COLUMN, QKV, ROW, ShardRule, gather_full_state_dict, gather_state_dict,
                       load_full_state_dict, shard_state_dict, tp_plan)
from .transformer import ReferenceTransformerLM, TPTransformerBlock, TPTransformerLM, reference_block

__all__ = [
    "TPGroup", "CommCounter", "ColumnParallelLinear", "RowParallelLinear", "ParallelMLP", "reference_mlp",
    "ShardedBatchNorm1d", "ParallelSelfAttention", "TPTransformerBlock", "TPTransformerLM",
    "ReferenceTransformerLM", "reference_block", "counter_init_", "ShardRule", "COLUMN", "ROW", "QKV",
    "tp_plan", "shard_state_dict", "gather_state_dict", "gather_full_state_dict", "load_full_state_dict",
    "copy_to_tp", "reduce_from_tp", "gather_from_tp", "scatter_to_tp",
]
