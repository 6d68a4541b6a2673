"""tensor: intra-layer (Megatron-style) parallelism over the tp sub-World — each rank computes a
slice of the neurons of every layer.

    group.py        TPGroup: the tp sub-World, and a counter of every communication round
    mappings.py     Megatron's conjugate operators (copy, reduce, gather, scatter) as autograd functions
    init.py         sharded initialisation: each rank computes only its slice, equal to the unsplit one
    linear.py       ColumnParallelLinear and RowParallelLinear
    mlp.py          ParallelMLP: column- then row-parallel, one all-reduce forward and one backward
    attention.py    self-attention with its heads split over tp
    norm.py         normalisation under tensor parallelism (ShardedBatchNorm1d)
    transformer.py  a tensor-parallel Transformer block and language model, and their unsplit twins
    embedding.py    VocabParallelEmbedding: an embedding table split by vocabulary rows
    gpt.py          nanoGPT's model (head tied to the embedding) and its stock-PyTorch twin
    sharding.py     which slice of each full tensor a rank holds: state dicts cut and put back together
    clip.py         clipping by the norm of the full model's gradient under tensor parallelism (torch's
                    norms of a sharded gradient, this rank's slice only, are refused)
"""
from .attention import ParallelSelfAttention
from .embedding import VocabParallelEmbedding
from .gpt import GPT, ReferenceGPT, generate, padded_vocab
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
    "VocabParallelEmbedding", "GPT", "ReferenceGPT", "generate", "padded_vocab",
]
