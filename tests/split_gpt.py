"""A GPT as people write it (nanoGPT's shape: an nn.Module, not a Sequential): token and position
embeddings, an nn.ModuleList of pre-norm blocks looped over in forward, a causal mask buffer sliced
in forward and passed to every block, positions from torch.arange, a final LayerNorm and a head
whose weight IS the embedding's. Shared by tests/test_split.py and tests/mpi/cases_split.py, with
the single-process training every pipelined run is compared with."""
import copy
import math

import torch
from torch import nn
from torch.nn import functional as F

VOCAB, WIDTH, HEADS, LAYERS, CONTEXT = 13, 16, 2, 4, 8


class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x, mask):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in self.qkv(x).split(C, dim=2))
        att = (q @ k.transpose(-2, -1) / math.sqrt(C // self.heads)).masked_fill(~mask, float("-inf"))
        return self.proj((att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.attn, self.ln2 = nn.LayerNorm(d), Attention(d, heads), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, mask):
        x = x + self.attn(self.ln1(x), mask)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab=VOCAB, d=WIDTH, heads=HEADS, layers=LAYERS, context=CONTEXT):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight                      # tied, as nanoGPT does it
        self.register_buffer("causal", torch.tril(torch.ones(context, context, dtype=torch.bool)))

    def forward(self, idx):
        B, T = idx.shape
        mask = self.causal[:T, :T]
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln_f(x))


class FunctionalHeadGPT(GPT):
    """The other way people tie the head (F.linear on the embedding's weight), with numbers read
    at the top of forward (B, T) used at its end, a float mask made in forward and a non-persistent
    buffer: they cross every cut."""

    def __init__(self):
        super().__init__()
        del self.head
        self.register_buffer("scale", torch.ones(()), persistent=False)

    def forward(self, idx, targets=None):
        B, T = idx.shape
        mask = self.causal[:T, :T]
        bias = (~mask).double().neg()                           # float, no gradient wanted
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for block in self.blocks:
            x = block(x, mask) + 0.01 * bias.mean()
        logits = F.linear(self.ln_f(x).reshape(B * T, -1), self.wte.weight) * self.scale
        return logits.view(B, T, -1)


def gpt(cls=GPT) -> GPT:
    torch.manual_seed(0)
    return cls().double()


def lm_loss(out, y):
    """Mean cross-entropy over every token (each sample has as many: a mean over samples)."""
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


def batch(step: int, n: int = 8):
    g = torch.Generator().manual_seed(step)
    seq = torch.randint(0, VOCAB, (n, CONTEXT + 1), generator=g)
    return seq[:, :-1], seq[:, 1:]


def train_single(model, optimizer, steps: int, two_bw: bool = False):
    """Single-process training: the reference. Returns the losses. `two_bw`: PipeDream-2BW's
    rule (train/reference.py), each batch's gradient taken at the weights before the last update."""
    opt, losses, old = optimizer(model.parameters()), [], copy.deepcopy(model)
    for step in range(steps):
        x, y = batch(step)
        at = old if two_bw else model
        at.zero_grad()
        loss = lm_loss(at(x), y)
        loss.backward()
        if two_bw:
            old = copy.deepcopy(model)
            for p, q in zip(model.parameters(), at.parameters()):
                p.grad = q.grad
        opt.step()
        losses.append(loss.item())
    return losses


def sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def adam(params):
    return torch.optim.Adam(params, lr=1e-2)
