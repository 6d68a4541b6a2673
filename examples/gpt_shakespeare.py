"""nanoGPT's character-level GPT on Shakespeare at its CPU size: validation on held-out plays, tokens/s, generated text.

nanoGPT's model in mpipar's layers (mpipar.tensor.gpt: token embedding, learned positions,
pre-norm causal blocks, final LayerNorm, head tied to the embedding) with nanoGPT's CPU
configuration as defaults: 4 layers, 4 heads, 128 wide, context 64, batch 12, dropout 0, AdamW
(lr 1e-3, betas 0.9/0.99, weight decay 0.1 on matrices), 100 warm-up steps then a cosine to lr/10,
gradients clipped at 1.0, 2000 steps (--steps; --epochs E runs E x --steps, with a validation row
after each --steps). Validation is on whole plays held out from training
(mpipar.app.datasets.shakespeare), or with --val-split tail on the last 10% of every work (the
same plays on both sides, as nanoGPT splits its one text). Measured at these defaults on the whole
corpus, one process, 2000 steps (2 cores, ~20k tokens/s): validation loss 1.919 on the held-out
works, 1.896 with --val-split tail; nanoGPT's README reports 1.88 for this configuration on
tinyshakespeare (another text: 65 characters, its own formatting; a 20-batch estimate). Shipped: 5 plays (examples/data/shakespeare); the whole corpus
(37 plays, the sonnets, 4 poems) is read from --data-dir or $MPIPAR_DATA/shakespeare.

    mpirun -np 2 python -m mpipar.run gpt-shakespeare                  # dp=2 (the default grid: dp)
    mpirun -np 2 python -m mpipar.run gpt-shakespeare --grid tp=2      # heads, MLP and vocabulary split
    mpirun -np 4 python -m mpipar.run gpt-shakespeare --grid dp=2,tp=2 --data-dir ../shared/data/shakespeare
    mpirun -np 2 python -m mpipar.run gpt-shakespeare --grid pp=2                # blocks 0-1 | 2-3, tied head
    mpirun -np 8 python -m mpipar.run gpt-shakespeare --grid pp=2,dp=2,tp=2

The example hands the app the model as one nn.Module (`model`; tp > 1: its tensor-parallel twin
holding this rank's shard of the single-process model's weights), and Pipeline traces it with
torch.fx (mpipar's layers kept whole) and cuts it before the blocks `split` names: spread evenly
over the pp stages (or --balance params | layers | sizes over the traced units: tok_emb, pos_emb,
drop, blocks.i, norm, head). The head tied to the embedding stays one parameter: its gradient is
summed between the first and last stage.
"""
import torch
from torch import nn

from mpipar.app.datasets.shakespeare import load_shakespeare
from mpipar.app.example import Example
from mpipar.app.layers import WordCrossEntropy
from mpipar.errors import ConfigError
from mpipar.tensor.gpt import GPT, ReferenceGPT, generate, padded_vocab
from mpipar.tensor.sharding import shard_layer
from mpipar.train.lr import cosine, run_steps


def data(args):
    return load_shakespeare(args.block_size, args.data_dir, args.val_windows, args.val_split)


def vocab_size(args) -> int:
    return padded_vocab(len(data(args)[0].meta["vocab"]))


def model(args, group):
    """ReferenceGPT (one process, tp = 1), or under tp > 1 its GPT twin in mpipar's layers holding this
    rank's shard of ReferenceGPT's weights (built first, from the same seed, then sliced)."""
    dims = (vocab_size(args), args.block_size, args.n_layer, args.n_head, args.n_embd, args.dropout)
    whole = ReferenceGPT(*dims)
    return whole if group is None else shard_layer(GPT(*dims, group=group), whole, group)


def split(args, stages: int) -> list[str]:
    """Cut before blocks.i so the blocks spread evenly over the stages (the embeddings ride with the
    first, the final norm and the tied head with the last)."""
    if stages > args.n_layer:
        raise ConfigError(f"--grid {args.grid}: {stages} pipeline stages for {args.n_layer} blocks (--n-layer); "
                          f"give each stage a block: at most pp={args.n_layer} (x --chunks), or a larger --n-layer")
    return [f"blocks.{i * args.n_layer // stages}" for i in range(1, stages)]


def adamw(params, args):
    """nanoGPT's AdamW: weight decay on the matrices (the tied embedding included), none on norms."""
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=args.lr, betas=(0.9, 0.99))


def schedule(opt, args):
    """Warm-up, then a cosine to lr/10 over the run's steps (nanoGPT's decay to min_lr = lr/10)."""
    steps = run_steps(len(data(args)[0]), args.batch_size, args.epochs, args.steps)
    return cosine(opt, steps, floor=0.1, warmup=args.warmup)


def progress(trainer, args):
    trainer.config.progress_every = args.log_every
    trainer.config.tokens_per_sample = args.block_size


class Whole(nn.Module):
    """The pipelined GPT as one module for `generate`: every rank runs its stage of the forward and
    the last stage's logits are broadcast over the stages, so every rank draws the same characters."""

    def __init__(self, pipe, vocab: int):
        super().__init__()
        self.pipe, self.vocab = pipe, vocab

    def forward(self, idx):
        logits = self.pipe.predict(idx)
        if logits is None:        # a stage before the last: the last stage's logits come here
            logits = torch.empty(*idx.shape, self.vocab, device=self.pipe.device)
        return self.pipe.topo.pp_world.bcast_(logits.float().contiguous(), self.pipe.p - 1)


def sample(trainer, train, test, args, log):
    """Every rank runs the same sampling loop (pp > 1: each its stage; tp > 1: the model's collectives
    need all of them); rank 0 prints it."""
    vocab = train.meta["vocab"]
    start = vocab.encode(args.prompt)[None]
    with trainer.gathered():
        ids = generate(Whole(trainer.pipe, vocab_size(args)), start, args.sample_chars, args.block_size, len(vocab),
                       args.temperature, generator=torch.Generator().manual_seed(args.seed))
    text = vocab.decode(ids[0])
    log(f"generated ({args.sample_chars} characters, temperature {args.temperature}, prompt {args.prompt!r}):")
    log("\n".join("  | " + line for line in text.splitlines()))
    return None


def report(last, train, test, args):
    held = f"held-out {', '.join(test.meta['val_works'])}" if args.val_split == "works" else test.meta["val_works"][0]
    return (f"validation loss {last['test_loss']:.4f} on {held}; "
            f"{last['samples_per_s'] * args.block_size:,.0f} tokens/s")


def add_args(p):
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4, help="attention heads (a multiple of tp)")
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--block-size", type=int, default=64, help="context length in characters")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout (tp = 1 only)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100, help="warm-up steps")
    p.add_argument("--val-split", choices=("works", "tail"), default="works",
                   help="validation: works held out from training, or the last 10%% of every work (nanoGPT's split)")
    p.add_argument("--val-windows", type=int, default=1024, help="validation windows (0: all of the held-out works)")
    p.add_argument("--log-every", type=int, default=100, help="a progress line every N steps (0: none)")
    p.add_argument("--sample-chars", type=int, default=300, help="characters generated at the end")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--prompt", default="\n", help="text the generated characters follow")


EXAMPLE = Example(
    name="gpt-shakespeare",
    summary="nanoGPT's character-level GPT (tied head) on Shakespeare, validated on held-out plays; pp x dp x tp",
    model=model,
    split=split,
    data=data,
    loss=WordCrossEntropy,
    optimizer=adamw,
    lr_scheduler=schedule,
    defaults=dict(grid="dp", epochs=1, steps=2000, batch_size=12, lr=1e-3, clip_grad=1.0),
    add_args=add_args,
    on_trainer=progress,
    after_fit=sample,
    report=report,
)
