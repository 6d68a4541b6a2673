"""Tensor-parallel Transformer language model on numbers-to-words: attention heads and MLP neurons split over the ranks.

Decoder-only: one sequence [digits | BOS words...] per number, causal attention, loss on the word
positions only ("4213" -> "four thousand two hundred thirteen"). Each block is Megatron's: QKV
column-parallel with the heads split, output projection and second MLP layer row-parallel, so a
block costs two all-reduces forward and two backward. With --compare (on by default) rank 0 also
trains the single-process model (stock nn.TransformerEncoderLayer blocks) on the same batches and
writes learning_curves.png; greedy decodes of a few test numbers close the run.
Parity with Adam: Adam's step lr*g/(|g|+eps) turns the rounding difference of a gradient entry
that happens to be ~0 into up to lr*|dg|/eps, so eps is 1e-6 (not 1e-8), and the model has no
biases: the key bias's gradient is exactly zero, pure rounding noise, at every step.
"""
import torch
from torch import nn

from mpipar.app.datasets.numbers import BOS, LM_VOCAB as VOCAB, TGT_VOCAB, lengths, numbers_lm
from mpipar.app.example import Example
from mpipar.app.layers import WordCrossEntropy
from mpipar.tensor import ReferenceTransformerLM, TPTransformerLM
from mpipar.app.tp_session import add_parity_args
from mpipar.app.tp_session import run_tp_example


class WordLogits(nn.Module):
    """The LM over the whole sequence, keeping the logits of the word positions [B, T, V]."""

    def __init__(self, lm, s_len):
        super().__init__()
        self.lm, self.s_len = lm, s_len

    def forward(self, x):
        return self.lm(x)[:, self.s_len:]


def sizes(args):
    s, t = lengths(args.max_number)
    return s, (VOCAB, args.d_model, args.heads, args.ff, args.layers, s + t)


def build(args, group):
    s, dims = sizes(args)
    return WordLogits(TPTransformerLM(*dims, group, bias=False), s)


def reference(args):
    s, dims = sizes(args)
    return WordLogits(ReferenceTransformerLM(*dims, bias=False), s)


@torch.no_grad()
def greedy_decode(model, test, args, log, count=6):
    """Every rank runs the same loop (the model's collectives need all of them)."""
    model.eval()
    s = test.meta["src_len"]
    pick = torch.linspace(0, len(test.y) - 1, count).long()   # spread over the range of numbers
    x = test.x[pick].clone()
    x[:, s + 1:] = 0
    x[:, s] = BOS
    for t in range(x.shape[1] - s - 1):
        x[:, s + t + 1] = model(x)[:, t].argmax(-1)
    for i, row in zip(pick.tolist(), x[:, s + 1:]):
        n = test.meta["numbers"][i]
        log(f"  {n:>6} -> {' '.join(TGT_VOCAB.decode(row.tolist()))}")


def add_args(p):
    p.add_argument("--max-number", type=int, default=9999, help="numbers 0..N (digits -> words)")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4, help="attention heads (a multiple of the number of ranks)")
    p.add_argument("--ff", type=int, default=256, help="MLP width (a multiple of the number of ranks)")
    p.add_argument("--layers", type=int, default=2)
    add_parity_args(p)


EXAMPLE = Example(
    name="tp-transformer",
    summary="tensor-parallel Transformer LM (heads and MLP split over the ranks) on numbers-to-words, Adam",
    data=lambda args: numbers_lm(args.max_number),
    loss=WordCrossEntropy,
    optimizer=lambda params, args: torch.optim.Adam(params, lr=args.lr, betas=(0.9, 0.98), eps=1e-6),
    defaults=dict(epochs=6, batch_size=64, lr=3e-3, compare=True),
    add_args=add_args,
    gpu=True,
    main=lambda args, world, log: run_tp_example(world, args, log, EXAMPLE, build, reference,
                                                 after=lambda model, test: greedy_decode(model, test, args, log)),
)
