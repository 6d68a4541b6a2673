"""Decoder-only Transformer LM on numbers-to-words, data parallel with ZeRO: run it with each stage.

    mpirun -np 4 python -m mpipar.run zero-transformer --zero 0|1|2|3

The grid defaults to dp=4 with --zero 3: the parameters, their gradients and Adam's state are
sharded over the four replicas, each block's weights gathered for its forward and backward only.
The run's last lines give the model state each replica held (parameters + gradients + optimizer
state, measured from its tensors) next to the formula for its stage, and the loss, so the four
stages can be compared side by side; all four train the same model (the parity tests hold them to
single-process training). `--d-model 512 --layers 8` makes DP's state ~400 MiB per replica.
"""
import torch
from torch import nn

from mpipar.app.datasets.numbers import LM_VOCAB, lengths, numbers_lm
from mpipar.app.example import Example
from mpipar.app.layers import SentenceCrossEntropy
from mpipar.model import LayerSpec
from mpipar.tensor.transformer import reference_block


class Embed(nn.Module):
    """Token ids [B, S+T] -> token + position embeddings [B, S+T, d]."""

    def __init__(self, d: int, max_len: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(LM_VOCAB, d), nn.Embedding(max_len, d)

    def forward(self, x):
        return self.tok(x) + self.pos.weight[:x.shape[1]]


class CausalBlock(nn.Module):
    """A pre-norm Transformer block attending to earlier positions only."""

    def __init__(self, d: int, heads: int, ff: int):
        super().__init__()
        self.block = reference_block(d, heads, ff, bias=False)

    def forward(self, h):
        mask = nn.Transformer.generate_square_subsequent_mask(h.shape[1], device=h.device)
        return self.block(h, src_mask=mask, is_causal=True)


class WordHead(nn.Module):
    """Final norm and vocabulary logits of the word positions [B, T, V]."""

    def __init__(self, d: int, s_len: int):
        super().__init__()
        self.s_len = s_len
        self.norm, self.out = nn.LayerNorm(d, bias=False), nn.Linear(d, LM_VOCAB, bias=False)

    def forward(self, h):
        return self.out(self.norm(h[:, self.s_len:]))


def layers(args):
    s, t = lengths(args.max_number)
    return ([LayerSpec("embed", build=lambda: Embed(args.d_model, s + t))]
            + [LayerSpec(f"block{i}", build=lambda: CausalBlock(args.d_model, args.heads, args.ff))
               for i in range(args.layers)]
            + [LayerSpec("head", build=lambda: WordHead(args.d_model, s))])


def add_args(p):
    p.add_argument("--max-number", type=int, default=9999, help="numbers 0..N (digits -> words)")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ff", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)


EXAMPLE = Example(
    name="zero-transformer",
    summary="decoder-only Transformer LM on numbers-to-words, ZeRO-sharded data parallelism (--zero 0-3), Adam",
    layers=layers,
    data=lambda args: numbers_lm(args.max_number),
    loss=SentenceCrossEntropy,
    optimizer=lambda params, args: torch.optim.Adam(params, lr=args.lr, betas=(0.9, 0.98), eps=1e-6),
    defaults=dict(grid="dp=4", zero=3, epochs=3, batch_size=64, lr=1e-3),
    add_args=add_args,
)
