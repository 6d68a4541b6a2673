"""A tensor-parallel pre-norm Transformer block and a small causal language model built from it,
with their single-device twins made of stock PyTorch modules (the parity references).

Per block and step: 2 all-reduces forward (attention out_proj, linear2) and 2 backward
(the f before in_proj and before linear1). Names match nn.TransformerEncoderLayer(norm_first=True,
batch_first=True), so its state dict shards directly into a TPTransformerBlock.
Embeddings and the final LayerNorm are replicated; the LM head is column-parallel over the
vocabulary with its output gathered.

bias=False drops every bias (Linear and LayerNorm, as nn.TransformerEncoderLayer(bias=False)).
Use it with Adam: the key bias has an exactly-zero gradient (softmax ignores a shift shared by
all keys), so its computed gradient is rounding noise that Adam scales up to full-size steps,
and two runs that sum in a different order (1 vs p ranks) drift apart in that bias.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import ParallelSelfAttention
from .group import TPGroup
from .linear import ColumnParallelLinear, RowParallelLinear

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}


class TPTransformerBlock(nn.Module):
    """x + attn(norm1(x)), then + linear2(act(linear1(norm2(x)))); x replicated [B, T, E].
    `dropout` where nn.TransformerEncoderLayer puts it (attention weights, after attention, after
    the activation, after linear2); tp = 1 only (attention.check_dropout)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, group: TPGroup,
                 activation: str = "gelu", layer_norm_eps: float = 1e-5, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        self.self_attn = ParallelSelfAttention(d_model, nhead, group, bias=bias, dropout=dropout)
        self.linear1 = ColumnParallelLinear(d_model, dim_feedforward, group, bias=bias)
        self.linear2 = RowParallelLinear(dim_feedforward, d_model, group, bias=bias)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.dropout, self.dropout1, self.dropout2 = (nn.Dropout(dropout) for _ in range(3))
        self.activation = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        x = x + self.dropout1(self.self_attn(self.norm1(x), is_causal=is_causal))
        return x + self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(self.norm2(x))))))


def reference_block(d_model: int, nhead: int, dim_feedforward: int, activation: str = "gelu",
                    layer_norm_eps: float = 1e-5, bias: bool = True,
                    dropout: float = 0.0) -> nn.TransformerEncoderLayer:
    """The single-device module a TPTransformerBlock must equal."""
    return nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout=dropout, activation=activation,
                                      layer_norm_eps=layer_norm_eps, batch_first=True, norm_first=True,
                                      bias=bias)


class TPTransformerLM(nn.Module):
    """Token + position embeddings, `num_layers` TP blocks, final LayerNorm, column-parallel head."""

    def __init__(self, vocab: int, d_model: int, nhead: int, dim_feedforward: int, num_layers: int,
                 max_len: int, group: TPGroup, bias: bool = True):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, d_model)
        self.pos_emb = nn.Embedding(max_len, d_model)
        self.layers = nn.ModuleList(TPTransformerBlock(d_model, nhead, dim_feedforward, group, bias=bias)
                                    for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model, bias=bias)
        self.head = ColumnParallelLinear(d_model, vocab, group, bias=bias, gather_output=True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] int64 -> logits [B, T, vocab] (causal: position t sees tokens <= t)."""
        x = self.tok_emb(tokens) + self.pos_emb(torch.arange(tokens.shape[1], device=tokens.device))
        for layer in self.layers:
            x = layer(x, is_causal=True)
        return self.head(self.norm(x))


class ReferenceTransformerLM(nn.Module):
    """TPTransformerLM on one device from stock modules (same names, same maths)."""

    def __init__(self, vocab: int, d_model: int, nhead: int, dim_feedforward: int, num_layers: int,
                 max_len: int, bias: bool = True):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, d_model)
        self.pos_emb = nn.Embedding(max_len, d_model)
        self.layers = nn.ModuleList(reference_block(d_model, nhead, dim_feedforward, bias=bias)
                                    for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model, bias=bias)
        self.head = nn.Linear(d_model, vocab, bias=bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        x = self.tok_emb(tokens) + self.pos_emb(torch.arange(t, device=tokens.device))
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=tokens.device)
        for layer in self.layers:
            x = layer(x, src_mask=mask, is_causal=True)
        return self.head(self.norm(x))
