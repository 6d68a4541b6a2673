"""Encoder | decoder transformer over pipeline stages on numbers-to-words (amp, Noam, global clip).

The model is a sequence of layers whose stage boundaries carry ONE tensor, so the decoder's
inputs travel packed: `embed` turns x = [src digits | shifted target words] into
    h [B, S + T, d + 1] = [encoder states (S rows) | decoder states (T rows)], + a pad-flag column
(1.0 where a source slot is padding). Encoder sublayers rewrite rows :S, decoder sublayers rows
S: (cross-attention reads rows :S, masking flagged slots), `head` maps rows S: to logits [B, T, V].
Each pre-norm transformer layer is split into its sublayers as pipeline layers (encN-attn,
encN-ff; decN-attn, decN-cross, decN-ff), so the default cut by measured time (--balance time)
can even out the stages: a decoder layer costs ~1.7 encoder layers, and with whole layers the
best cut of the default 2 + 2 on 2 ranks was 8.4 against 4.8 ms per micro-batch. `--balance
params` or sizes like 6,6 (embed..dec1-attn | dec1-cross..head) cut it by hand.
After training, greedy decoding runs through the same pipeline (forward-only schedule, one
position per round, the last stage broadcasting its predicted tokens over the pp world).
"""
import time

import torch
from torch import nn

from mpipar.app.datasets.numbers import PAD, BOS, EOS, SRC_VOCAB, TGT_VOCAB, lengths, numbers_to_words
from mpipar.app.example import Example
from mpipar.app.layers import SentenceCrossEntropy
from mpipar.model import LayerSpec
from mpipar.train.amp import MODES, Autocast, PipelineGradScaler
from mpipar.train.lr import noam


# -- the layers ---------------------------------------------------------------------------------
class Embed(nn.Module):
    """x [B, S+T] token ids -> h [B, S+T, d+1]: token + learned position embeddings, pad flags."""

    def __init__(self, s_len, t_len, d):
        super().__init__()
        self.s_len = s_len
        self.src_tok, self.src_pos = nn.Embedding(len(SRC_VOCAB), d, padding_idx=PAD), nn.Embedding(s_len, d)
        self.tgt_tok, self.tgt_pos = nn.Embedding(len(TGT_VOCAB), d, padding_idx=PAD), nn.Embedding(t_len, d)

    def forward(self, x):
        src, tgt = x[:, :self.s_len], x[:, self.s_len:]
        states = torch.cat([self.src_tok(src) + self.src_pos.weight, self.tgt_tok(tgt) + self.tgt_pos.weight], 1)
        flag = torch.cat([src == PAD, torch.zeros_like(tgt, dtype=torch.bool)], 1)
        return torch.cat([states, flag.unsqueeze(-1).to(states.dtype)], -1)


def freeze_key_bias(attn: nn.MultiheadAttention) -> None:
    """Keep the key part of the in-projection bias at zero: it shifts every score of a query
    alike, so softmax ignores it and its gradient is pure rounding noise, which Adam would
    scale up to lr-sized steps (and micro-batching would then change the weights)."""
    d = attn.embed_dim
    keep = torch.ones(3 * d)
    keep[d:2 * d] = 0
    attn.in_proj_bias.register_hook(lambda g: g * keep)


def put(h, s_len, d, src=None, tgt=None):
    """h with its rows :S replaced by `src` and/or its rows S: by `tgt` (pad flags kept)."""
    states = torch.cat([h[:, :s_len, :d] if src is None else src.to(h.dtype),
                        h[:, s_len:, :d] if tgt is None else tgt.to(h.dtype)], 1)
    return torch.cat([states, h[..., d:]], -1)


class SelfAttention(nn.Module):
    """Pre-norm self-attention with its residual, on the source rows (padding masked) or on the
    target rows (causal)."""

    def __init__(self, s_len, d, heads, dropout, side):
        super().__init__()
        self.s_len, self.d, self.side = s_len, d, side
        self.norm = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, dropout, batch_first=True)
        self.drop = nn.Dropout(dropout)
        freeze_key_bias(self.attn)

    def forward(self, h):
        s, d = self.s_len, self.d
        if self.side == "src":
            x = h[:, :s, :d]
            mask = dict(key_padding_mask=h[:, :s, d] > 0.5)
        else:
            x = h[:, s:, :d]
            n = x.shape[1]
            mask = dict(attn_mask=torch.ones(n, n, dtype=torch.bool, device=h.device).triu(1), is_causal=True)
        y = self.norm(x)
        x = x + self.drop(self.attn(y, y, y, need_weights=False, **mask)[0])
        return put(h, s, d, **{self.side: x})


class CrossAttention(nn.Module):
    """Pre-norm cross-attention of the target rows to the source rows (padding masked)."""

    def __init__(self, s_len, d, heads, dropout):
        super().__init__()
        self.s_len, self.d = s_len, d
        self.norm = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, dropout, batch_first=True)
        self.drop = nn.Dropout(dropout)
        freeze_key_bias(self.attn)

    def forward(self, h):
        s, d = self.s_len, self.d
        x, mem = h[:, s:, :d], h[:, :s, :d]
        x = x + self.drop(self.attn(self.norm(x), mem, mem, key_padding_mask=h[:, :s, d] > 0.5,
                                    need_weights=False)[0])
        return put(h, s, d, tgt=x)


class FeedForward(nn.Module):
    """Pre-norm feed-forward block with its residual on one side's rows; the encoder's last one
    also applies the encoder's final norm."""

    def __init__(self, s_len, d, ff, dropout, side, final=False):
        super().__init__()
        self.s_len, self.d, self.side = s_len, d, side
        self.norm = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, ff), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ff, d), nn.Dropout(dropout))
        self.final = nn.LayerNorm(d) if final else None

    def forward(self, h):
        s, d = self.s_len, self.d
        x = h[:, :s, :d] if self.side == "src" else h[:, s:, :d]
        x = x + self.ff(self.norm(x))
        if self.final is not None:
            x = self.final(x)
        return put(h, s, d, **{self.side: x})


class Head(nn.Module):
    """Final decoder norm and the word projection: rows S: -> logits [B, T, V]."""

    def __init__(self, s_len, d):
        super().__init__()
        self.s_len, self.d = s_len, d
        self.norm, self.proj = nn.LayerNorm(d), nn.Linear(d, len(TGT_VOCAB))

    def forward(self, h):
        return self.proj(self.norm(h[:, self.s_len:, :self.d]))


def layers(args):
    s, t = lengths(args.max_number)
    d, wrap = args.d_model, (lambda build: lambda: Autocast(build(), args.amp))
    heads, ff, drop = args.heads, args.ff, args.dropout
    specs = [LayerSpec("embed", wrap(lambda: Embed(s, t, d)))]
    for i in range(1, args.enc_layers + 1):
        last = i == args.enc_layers
        specs += [LayerSpec(f"enc{i}-attn", wrap(lambda: SelfAttention(s, d, heads, drop, "src"))),
                  LayerSpec(f"enc{i}-ff", wrap(lambda last=last: FeedForward(s, d, ff, drop, "src", last)))]
    for i in range(1, args.dec_layers + 1):
        specs += [LayerSpec(f"dec{i}-attn", wrap(lambda: SelfAttention(s, d, heads, drop, "tgt"))),
                  LayerSpec(f"dec{i}-cross", wrap(lambda: CrossAttention(s, d, heads, drop))),
                  LayerSpec(f"dec{i}-ff", wrap(lambda: FeedForward(s, d, ff, drop, "tgt")))]
    specs.append(LayerSpec("head", wrap(lambda: Head(s, d))))
    return specs


# -- greedy decoding through the pipeline -------------------------------------------------------
@torch.no_grad()
def greedy_decode(trainer, x: torch.Tensor, s_len: int, batch_size: int = 500) -> torch.Tensor:
    """Predicted word ids [N, T] for the sources in x[:, :S] (x[:, S:] is ignored). Every pp rank
    calls this with the same x: position by position, a forward-only pass through all stages
    (the trainer's forward-only schedule), then the last stage broadcasts the argmax over the
    pp world; all ranks stop together once every row has produced EOS."""
    topo = trainer.topo
    t_len = x.shape[1] - s_len
    preds = torch.full((len(x), t_len), PAD, dtype=torch.int64)
    trainer.module.eval()
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size].clone()
        xb[:, s_len:] = PAD
        xb[:, s_len] = BOS
        pb = preds[start:start + len(xb)]
        for pos in range(t_len):
            step = torch.zeros(len(xb), dtype=torch.int64)
            trainer.pipe.forward_only(xb, None, lambda mb, logits: step.copy_(logits[:, pos].argmax(-1)))
            topo.pp_world.bcast_(step, topo.grid.pp - 1)
            pb[:, pos] = step
            if pos + 1 < t_len:
                xb[:, s_len + pos + 1] = step
            if bool((pb[:, :pos + 1] == EOS).any(1).all()):
                break
    trainer.module.train()
    return preds


def decode_report(trainer, test, args, log) -> float:
    """Greedy-decode the test numbers; log exact-match accuracy and a few samples."""
    s_len = test.meta["src_len"]
    t0 = time.perf_counter()
    preds = greedy_decode(trainer, test.x, s_len)
    words = [TGT_VOCAB.decode(p) for p in preds]
    truth = [TGT_VOCAB.decode(y.clamp_min(PAD)) for y in test.y]
    right = [w == t for w, t in zip(words, truth)]
    exact = sum(right) / len(right)
    log(f"greedy decoding through the pipeline: exact match {exact:.1%} of {len(right)} test numbers "
        f"({time.perf_counter() - t0:.1f} s)")
    show = torch.randperm(len(right), generator=torch.Generator().manual_seed(args.seed))[:args.samples]
    wrong = [i for i, ok in enumerate(right) if not ok and i not in show.tolist()][:3]
    for i in show.tolist() + wrong:
        digits = "".join(SRC_VOCAB.decode(test.x[i, :s_len]))
        said = " ".join(words[i]) or "(nothing)"
        log(f"  ok  {digits:>{s_len}} -> {said}" if right[i] else
            f"  BAD {digits:>{s_len}} -> {said}   (want: {' '.join(truth[i])})")
    return exact


# -- the hooks run_example calls: loss scaling once the trainer exists, decoding after fit --------
def attach_scaler(trainer, args):
    """on_trainer: log the model settings; for --amp fp16 attach the pipeline loss scaler (after the
    pipeline's own data-parallel sync) as one of its callbacks; returns it (None otherwise)."""
    trainer.log(f"model: d={args.d_model} heads={args.heads} ff={args.ff} enc={args.enc_layers} "
                f"dec={args.dec_layers} | amp {args.amp} | clip global norm {args.clip_grad or 'off'} | "
                f"Noam warmup {args.warmup}, factor {args.lr}")
    return PipelineGradScaler(trainer.topo.world).attach(trainer) if args.amp == "fp16" else None


def after_fit(trainer, train, test, args, log) -> str | None:
    """Greedy-decode the test set through the pipeline (every rank); text for the summary line."""
    parts = []
    if args.samples >= 0:
        parts.append(f"greedy exact match {decode_report(trainer, test, args, log):.4g}")
    scaler = PipelineGradScaler.of(trainer)
    if scaler:
        parts.append(f"fp16 loss scale {scaler.scale:g}, {scaler.skipped} step(s) skipped for inf/NaN")
    return "; ".join(parts) or None


def add_args(p):
    p.add_argument("--max-number", type=int, default=9999, help="numbers 0..N (digits -> words)")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ff", type=int, default=128, help="feed-forward width")
    p.add_argument("--enc-layers", type=int, default=2)
    p.add_argument("--dec-layers", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.0, help="(>0 breaks parity with single-process)")
    p.add_argument("--warmup", type=int, default=100, help="Noam warm-up steps")
    p.add_argument("--amp", choices=list(MODES), default="bf16",
                   help="autocast inside layers: bf16 (CPU), fp16 + loss scaling (CUDA), off")
    p.add_argument("--samples", type=int, default=8, help="greedy-decoded samples to print (-1: skip decoding)")


EXAMPLE = Example(
    name="transformer-split",
    summary="encoder-decoder transformer on numbers-to-words, encoder and decoder on different stages; "
            "autocast, Noam lr, global-norm clipping, greedy decoding",
    layers=layers,
    data=lambda args: numbers_to_words(args.max_number),
    loss=SentenceCrossEntropy,
    optimizer=lambda params, args: torch.optim.Adam(params, lr=args.lr, betas=(0.9, 0.98), eps=1e-9),
    lr_scheduler=lambda opt, args: noam(opt, args.d_model, args.warmup),
    task="classification",
    defaults=dict(epochs=2, batch_size=64, lr=0.5, clip_grad=1.0),
    add_args=add_args,
    on_trainer=attach_scaler,
    after_fit=after_fit,
)
