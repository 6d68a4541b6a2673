"""nanoGPT's character-level GPT on Shakespeare at its CPU size: validation on held-out plays, tokens/s, generated text.

nanoGPT's model in mpipar's layers (mpipar.tensor.gpt: token embedding, learned positions,
pre-norm causal blocks, final LayerNorm, head tied to the embedding) with nanoGPT's CPU
configuration as defaults: 4 layers, 4 heads, 128 wide, context 64, batch 12, dropout 0, AdamW
(lr 1e-3, betas 0.9/0.99, weight decay 0.1 on matrices), 100 warm-up steps then a cosine to lr/10,
gradients clipped at 1.0, 2000 steps (--steps; --epochs E runs E x --steps, with a validation row
after each --steps). Validation is on whole plays held out from training
(mpipar.app.datasets.shakespeare). Shipped: 5 plays (examples/data/shakespeare); the whole corpus
(37 plays, the sonnets, 4 poems) is read from --data-dir or $MPIPAR_DATA/shakespeare.

    mpirun -np 2 python -m mpipar.run gpt-shakespeare                  # dp=2 (the default grid: dp)
    mpirun -np 2 python -m mpipar.run gpt-shakespeare --grid tp=2      # heads, MLP and vocabulary split
    mpirun -np 4 python -m mpipar.run gpt-shakespeare --grid dp=2,tp=2 --data-dir ../shared/data/shakespeare

The model is one layer for the engine: dp replicates it, tp > 1 builds its tensor-parallel twin
holding each rank's shard of the single-process model's weights. pp waits for Pipeline's split of
an nn.Module at named submodules (#31): `layers` is the hook.
"""
import torch

from mpipar.app.datasets.shakespeare import load_shakespeare
from mpipar.app.example import Example
from mpipar.app.layers import WordCrossEntropy
from mpipar.errors import ConfigError
from mpipar.model import LayerSpec
from mpipar.tensor.gpt import GPT, ReferenceGPT, generate, padded_vocab
from mpipar.train.lr import cosine, run_steps


def data(args):
    return load_shakespeare(args.block_size, args.data_dir, args.val_windows)


def pipeline_stages(grid: str | None) -> int:
    """pp of --grid as written ('pp' alone: more than one)."""
    axes = dict(part.partition("=")[::2] for part in (grid or "").replace(" ", "").split(",") if part)
    return 1 if "pp" not in axes else int(axes["pp"]) if axes["pp"].isdigit() else 2


def layers(args):
    """The whole GPT as ONE layer (LayerSpec): single-process and dp train ReferenceGPT, tp > 1 its
    GPT twin in mpipar's layers. pp hook: once Pipeline splits an nn.Module at named submodules,
    hand it ReferenceGPT with split points "blocks.i" here instead of refusing."""
    if pipeline_stages(args.grid) > 1:
        raise ConfigError(f"gpt-shakespeare --grid {args.grid}: pipelining the GPT (an nn.Module, not a "
                          f"Sequential) needs Pipeline's module split, not there yet (#31); use dp and tp, "
                          f"e.g. --grid dp=2,tp=2")
    dims = (padded_vocab(len(data(args)[0].meta["vocab"])), args.block_size, args.n_layer, args.n_head,
            args.n_embd, args.dropout)
    return [LayerSpec("gpt", build=lambda: ReferenceGPT(*dims), tp=lambda group: GPT(*dims, group=group))]


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


def sample(trainer, train, test, args, log):
    """Every rank runs the same sampling loop (tp > 1: the model's collectives need all of them);
    rank 0 prints it."""
    vocab = train.meta["vocab"]
    model = trainer.module.gpt
    start = vocab.encode(args.prompt)[None]
    with trainer.gathered():
        ids = generate(model, start, args.sample_chars, args.block_size, len(vocab), args.temperature,
                       generator=torch.Generator().manual_seed(args.seed))
    text = vocab.decode(ids[0])
    log(f"generated ({args.sample_chars} characters, temperature {args.temperature}, prompt {args.prompt!r}):")
    log("\n".join("  | " + line for line in text.splitlines()))
    return None


def report(last, train, test, args):
    return (f"validation loss {last['test_loss']:.4f} on held-out {', '.join(test.meta['val_works'])}; "
            f"{last['samples_per_s'] * args.block_size:,.0f} tokens/s")


def add_args(p):
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4, help="attention heads (a multiple of tp)")
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--block-size", type=int, default=64, help="context length in characters")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout (tp = 1 only)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100, help="warm-up steps")
    p.add_argument("--val-windows", type=int, default=1024, help="validation windows (0: all of the held-out works)")
    p.add_argument("--log-every", type=int, default=100, help="a progress line every N steps (0: none)")
    p.add_argument("--sample-chars", type=int, default=300, help="characters generated at the end")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--prompt", default="\n", help="text the generated characters follow")


EXAMPLE = Example(
    name="gpt-shakespeare",
    summary="nanoGPT's character-level GPT (tied head) on Shakespeare, validated on held-out plays; dp x tp, AdamW",
    layers=layers,
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
