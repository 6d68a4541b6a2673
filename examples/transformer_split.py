"""Encoder-decoder transformer split across stages (encoder | decoder) on numbers-to-words, mixed precision, Noam lr, global clipping.

The model is a sequence of layers whose stage boundaries carry ONE tensor, so the decoder's
inputs travel packed: `embed` turns x = [src digits | shifted target words] into
    h [B, S + T, d + 1] = [encoder states (S rows) | decoder states (T rows)], + a pad-flag column
(1.0 where a source slot is padding). Encoder blocks rewrite rows :S, decoder blocks rewrite rows
S: attending to rows :S (masking flagged slots), `head` maps rows S: to logits [B, T, V].
With the default 2 encoder + 2 decoder blocks, `--balance layers` on 2 ranks puts
embed..enc2 on stage 0 and dec1..head on stage 1; 3..6 ranks split deeper.
After training, greedy decoding runs through the same pipeline (forward-only schedule, one
position per round, the last stage broadcasting its predicted tokens over the pp world).
"""
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mpipar.data.numbers import IGNORE, PAD, BOS, EOS, SRC_VOCAB, TGT_VOCAB, lengths, numbers_to_words
from mpipar.example import Example
from mpipar.model import LayerSpec, check_unique
from mpipar.train.amp import MODES, Autocast, PipelineGradScaler
from mpipar.train.noam import noam


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


class EncoderBlock(nn.Module):
    """One pre-norm encoder layer on rows :S (the last block also applies the final norm)."""

    def __init__(self, s_len, d, heads, ff, dropout, final):
        super().__init__()
        self.s_len, self.d = s_len, d
        self.layer = nn.TransformerEncoderLayer(d, heads, ff, dropout, batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(d) if final else None

    def forward(self, h):
        s, d = self.s_len, self.d
        mem = self.layer(h[:, :s, :d], src_key_padding_mask=h[:, :s, d] > 0.5)
        if self.norm is not None:
            mem = self.norm(mem)
        return torch.cat([torch.cat([mem.to(h.dtype), h[:, s:, :d]], 1), h[..., d:]], -1)


class DecoderBlock(nn.Module):
    """One pre-norm decoder layer on rows S: (causal), cross-attending to rows :S."""

    def __init__(self, s_len, d, heads, ff, dropout):
        super().__init__()
        self.s_len, self.d = s_len, d
        self.layer = nn.TransformerDecoderLayer(d, heads, ff, dropout, batch_first=True, norm_first=True)

    def forward(self, h):
        s, d = self.s_len, self.d
        t_len = h.shape[1] - s
        causal = torch.ones(t_len, t_len, dtype=torch.bool, device=h.device).triu(1)
        tgt = self.layer(h[:, s:, :d], h[:, :s, :d], tgt_mask=causal, tgt_is_causal=True,
                         memory_key_padding_mask=h[:, :s, d] > 0.5)
        return torch.cat([torch.cat([h[:, :s, :d], tgt.to(h.dtype)], 1), h[..., d:]], -1)


class Head(nn.Module):
    """Final decoder norm and the word projection: rows S: -> logits [B, T, V]."""

    def __init__(self, s_len, d):
        super().__init__()
        self.s_len, self.d = s_len, d
        self.norm, self.proj = nn.LayerNorm(d), nn.Linear(d, len(TGT_VOCAB))

    def forward(self, h):
        return self.proj(self.norm(h[:, self.s_len:, :self.d]))


class SentenceCrossEntropy(nn.Module):
    """Mean over sentences of each sentence's mean token cross-entropy (-100 padding skipped).
    A mean over samples, so micro-batches weighted by sample count add up to the whole batch."""

    def forward(self, logits, y):
        tok = F.cross_entropy(logits.float().transpose(1, 2), y, ignore_index=IGNORE, reduction="none")
        return (tok.sum(1) / (y != IGNORE).sum(1).clamp_min(1)).mean()


def layers(args):
    s, t = lengths(args.max_number)
    d, wrap = args.d_model, (lambda build: lambda: Autocast(build(), args.amp))
    block = (args.heads, args.ff, args.dropout)
    specs = [LayerSpec("embed", wrap(lambda: Embed(s, t, d)))]
    for i in range(args.enc_layers):
        final = i == args.enc_layers - 1
        specs.append(LayerSpec(f"enc{i + 1}", wrap(lambda final=final: EncoderBlock(s, d, *block, final))))
    for i in range(args.dec_layers):
        specs.append(LayerSpec(f"dec{i + 1}", wrap(lambda: DecoderBlock(s, d, *block))))
    specs.append(LayerSpec("head", wrap(lambda: Head(s, d))))
    return specs


# -- greedy decoding through the pipeline -------------------------------------------------------
@torch.no_grad()
def greedy_decode(trainer, x: torch.Tensor, s_len: int, batch_size: int = 500) -> torch.Tensor:
    """Predicted word ids [N, T] for the sources in x[:, :S] (x[:, S:] is ignored). Every pp rank
    calls this with the same x: position by position, a forward-only pass through all stages,
    then the last stage broadcasts the argmax; all ranks stop together once every row has EOS."""
    from mpipar.pipeline.schedules import forward_only
    topo, engine = trainer.topo, trainer.engine
    acts = forward_only(topo.grid.pp, 1, topo.pp_rank)
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
            engine.run(acts, [xb], None, [1.0], lambda mb, logits: step.copy_(logits[:, pos].argmax(-1)))
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
    for i in show.tolist():
        digits = "".join(SRC_VOCAB.decode(test.x[i, :s_len]))
        mark = "ok " if right[i] else "BAD"
        log(f"  {mark} {digits:>{s_len}} -> {' '.join(words[i])}" + ("" if right[i] else f"   (want: {' '.join(truth[i])})"))
    return exact


# -- the run: session.run_example's steps, plus loss scaling and decoding -----------------------
def main(args, world, log):
    from mpipar.rankmap import Grid, RankMap, human
    from mpipar.session import banner, compare, partition
    from mpipar.topology import Topology
    from mpipar.train.trainer import PipelineTrainer
    grid = Grid.parse(args.grid, world.size)
    specs = layers(args)
    check_unique(specs)
    if args.balance != "time":
        partition(world, EXAMPLE, specs, args, grid, None)
    train, test = EXAMPLE.data(args)
    rankmap = RankMap(grid, partition(world, EXAMPLE, specs, args, grid, train))
    topo = Topology.build(world, grid)
    trainer = PipelineTrainer(topo, rankmap, EXAMPLE, specs, args, log)
    scaler = PipelineGradScaler(world).attach(trainer) if args.amp == "fp16" else None
    params = [int(v) for v in world.allgather_floats([sum(p.numel() for p in trainer.params)])[:, 0]]
    log(banner(world, world.hosts(), EXAMPLE, args, grid))
    log(f"data: {train.note}")
    log(f"model: d={args.d_model} heads={args.heads} ff={args.ff} enc={args.enc_layers} dec={args.dec_layers} | "
        f"amp {args.amp} | clip global norm {args.clip_grad or 'off'} | Noam warmup {args.warmup}, factor {args.lr}")
    log(rankmap.table(world.hosts(), params))
    t0 = time.perf_counter()
    rows = trainer.fit(train, test)
    elapsed = time.perf_counter() - t0
    if args.save_params and topo.dp_rank == 0 and topo.tp_rank == 0:
        Path(args.save_params).mkdir(parents=True, exist_ok=True)
        torch.save(trainer.state_dict(), Path(args.save_params) / f"stage{topo.pp_rank}.pt")
    if args.compare and world.rank == 0:
        compare(EXAMPLE, specs, train, test, args, rows, grid, log)
    world.barrier()
    exact = decode_report(trainer, test, args, log) if args.samples >= 0 else float("nan")
    last = rows[-1] if rows else {}
    if scaler:
        log(f"fp16 loss scale {scaler.scale:g}, {scaler.skipped} step(s) skipped for inf/NaN gradients")
    log(f"summary: {EXAMPLE.name} on {world.size} ranks (pp={grid.pp}), {len(rows)} epochs in {elapsed:.1f} s: "
        f"test loss {last.get('test_loss', float('nan')):.4g}, test token accuracy "
        f"{last.get('test_accuracy', float('nan')):.4g}, greedy exact match {exact:.4g}, "
        f"{last.get('samples_per_s', 0):.0f} samples/s; total params {human(sum(params))}")
    return {"example": EXAMPLE.name, "ranks": world.size, "epochs": len(rows), "seconds": elapsed,
            "greedy_exact_match": exact, **{k: v for k, v in last.items() if k != "epoch"}}


def add_args(p):
    p.add_argument("--max-number", type=int, default=9999, help="numbers 0..N (digits -> words)")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ff", type=int, default=128, help="feed-forward width")
    p.add_argument("--enc-layers", type=int, default=2)
    p.add_argument("--dec-layers", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.0, help="(>0 breaks parity with single-process)")
    p.add_argument("--warmup", type=int, default=200, help="Noam warm-up steps")
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
    defaults=dict(epochs=8, batch_size=64, lr=1.0, clip_grad=1.0, balance="layers"),
    add_args=add_args,
    main=main,
)
