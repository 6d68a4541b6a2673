"""nanoGPT's model in mpipar's tensor-parallel layers, and its single-device twin in stock PyTorch.

    GPT           token embedding, learned positions, dropout, pre-norm causal blocks
                  (TPTransformerBlock), final LayerNorm, head tied to the token embedding
    ReferenceGPT  the same model from nn.Embedding, nn.TransformerEncoderLayer, nn.LayerNorm and
                  nn.Linear, with the same state-dict names: its weights shard straight into a GPT
                  (`sharding.shard_layer(GPT(..., group), ReferenceGPT(...), group)`)
    generate      nanoGPT's sampling loop, for either

Both are ordinary nn.Modules (blocks in an nn.ModuleList, looped over in forward) whose forward
has no data-dependent Python control flow: positions come from torch.arange(x.size(1)), the
causal mask is is_causal (nn.TransformerEncoderLayer also wants it as a tensor, made from T), so
torch.fx traces them with their layers as leaves.

The tied head under tp > 1: the token embedding is split over the vocabulary (embedding.py) and
the head is a column-parallel Linear over the same rows, its logits gathered: one parameter, one
shard per rank, both gradients added into it. Why not a replicated weight gathered for the head:
at a real vocabulary (GPT-2's 50k) the embedding is the largest matrix and the head the largest
matmul, and this splits both for one all-gather of the logits (at ~90 characters either is
cheap). The vocabulary must divide by tp: pad it (padded_vocab; nanoGPT pads GPT-2's 50257 to
50304); padded rows are never targets, and `generate` never samples them.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .attention import check_dropout
from .embedding import VocabParallelEmbedding
from .group import TPGroup
from .linear import ColumnParallelLinear
from .transformer import TPTransformerBlock, reference_block

VOCAB_MULTIPLE = 8   # a padded vocabulary splits over tp = 1, 2, 4 or 8


def padded_vocab(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """The vocabulary size rounded up to a multiple of `multiple`."""
    return -(-n // multiple) * multiple


@torch.no_grad()
def init_gpt_(model: nn.Module, n_layer: int) -> nn.Module:
    """nanoGPT's initialisation: N(0, 0.02) for every matrix (the tied embedding and head once),
    N(0, 0.02 / sqrt(2 n_layer)) for the projections into the residual stream (attention
    out_proj, MLP linear2), biases 0, norms 1 (their default)."""
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            residual = name.endswith(("out_proj.weight", "linear2.weight"))
            p.normal_(0.0, 0.02 / math.sqrt(2 * n_layer) if residual else 0.02)
        elif name.endswith("bias"):
            p.zero_()
    return model


class GPT(nn.Module):
    """idx [B, T] int64 -> logits [B, T, vocab_size], position t seeing tokens <= t; T <= block_size.
    `group`: the tp group (None: one rank, no communication); each rank holds 1/tp of the heads,
    MLP neurons and vocabulary rows."""

    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int,
                 dropout: float = 0.0, bias: bool = False, group: TPGroup | None = None):
        super().__init__()
        group = group if group is not None else TPGroup()
        check_dropout(dropout, group, "GPT")
        self.block_size = block_size
        self.tok_emb = VocabParallelEmbedding(vocab_size, n_embd, group)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(TPTransformerBlock(n_embd, n_head, 4 * n_embd, group, bias=bias, dropout=dropout)
                                    for _ in range(n_layer))
        self.norm = nn.LayerNorm(n_embd, bias=bias)
        self.head = ColumnParallelLinear(n_embd, vocab_size, group, bias=False, gather_output=True)
        self.head.weight = self.tok_emb.weight          # tied: this rank's vocabulary rows
        init_gpt_(self, n_layer)                        # a stand-in per shard; the twin's values: shard_layer

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.tok_emb(idx) + self.pos_emb(torch.arange(idx.size(1), device=idx.device)))
        for block in self.blocks:
            x = block(x, is_causal=True)
        return self.head(self.norm(x))


class ReferenceGPT(nn.Module):
    """GPT on one device from stock modules (same names, same maths, nanoGPT's initialisation)."""

    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int,
                 dropout: float = 0.0, bias: bool = False):
        super().__init__()
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(reference_block(n_embd, n_head, 4 * n_embd, bias=bias, dropout=dropout)
                                    for _ in range(n_layer))
        self.norm = nn.LayerNorm(n_embd, bias=bias)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight
        init_gpt_(self, n_layer)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.size(1)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(torch.arange(t, device=idx.device)))
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=idx.device)   # what is_causal means
        for block in self.blocks:
            x = block(x, src_mask=mask, is_causal=True)
        return self.head(self.norm(x))


@torch.no_grad()
def generate(model: nn.Module, idx: torch.Tensor, new_tokens: int, block_size: int, vocab_size: int | None = None,
             temperature: float = 1.0, top_k: int | None = None, generator: torch.Generator | None = None):
    """idx [B, T0] followed by `new_tokens` sampled ones (nanoGPT's loop: the last block_size
    tokens in, the last position's logits / temperature, the top_k kept); ids >= vocab_size (padding)
    are never drawn. Under tp > 1 every tp rank calls it with the same generator seed: the logits
    are gathered, so every rank draws the same tokens."""
    was_training = model.training
    model.eval()
    for _ in range(new_tokens):
        logits = model(idx[:, -block_size:])[:, -1, :vocab_size].float() / temperature
        if top_k:
            kth = logits.topk(min(top_k, logits.size(-1))).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        idx = torch.cat([idx, torch.multinomial(logits.softmax(-1), 1, generator=generator)], dim=1)
    model.train(was_training)
    return idx
