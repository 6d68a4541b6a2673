"""The GPT (mpipar.tensor.gpt) and gpt-shakespeare's pieces, in one process: the GPT in mpipar's
layers equals its stock-PyTorch twin (forward, gradients of the tied weight, AdamW training,
dropout in training only), traces with torch.fx, keeps its tie through counter_init_; the corpus splits
by work with a round-tripping vocabulary; generation; the Trainer's progress line. tp = 2 against
the twin is tests/mpi/cases_tensor.py (test_gpt_tp)."""
import argparse
import math
import re

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from mpipar.app.datasets.shakespeare import HELD_OUT, load_shakespeare, split_works
from mpipar.errors import ConfigError, DataError
from mpipar.tensor import GPT, ReferenceGPT, TPGroup, counter_init_, generate, padded_vocab
from mpipar.tensor.sharding import shard_layer

torch.set_num_threads(1)
close = torch.testing.assert_close
V, T, L, NH, E = padded_vocab(13), 8, 2, 4, 16      # a small GPT


def twins(seed=0, dropout=0.0):
    """ReferenceGPT (nanoGPT's init from `seed`) and the GPT holding the same values (tp = 1)."""
    torch.manual_seed(seed)
    ref = ReferenceGPT(V, T, L, NH, E, dropout=dropout)
    group = TPGroup.offline(0, 1)
    return ref, shard_layer(GPT(V, T, L, NH, E, dropout=dropout, group=group), ref, group)


def tokens(n, t=T, seed=1):
    return torch.randint(0, 13, (n, t), generator=torch.Generator().manual_seed(seed))


def test_gpt_equals_its_twin_forward_backward_and_training():
    ref, gpt = twins()
    for m in (ref, gpt):
        assert m.head.weight is m.tok_emb.weight, "the head is tied to the token embedding"
    assert gpt.state_dict().keys() == ref.state_dict().keys()
    x, y = tokens(6), tokens(6, seed=2)
    close(gpt(x[:, :5]), ref(x[:, :5]))                   # shorter than the context too
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1) for m in (gpt, ref)]
    for step in range(5):
        for m, opt in zip((gpt, ref), opts):
            opt.zero_grad()
            F.cross_entropy(m(x).transpose(1, 2), y).backward()
            nn.utils.clip_grad_norm_(m.parameters(), 0.5)
        grads = dict(ref.named_parameters())
        for n, p in gpt.named_parameters():                # the tied weight: embedding + head gradients
            close(p.grad, grads[n].grad, msg=lambda m: f"step {step} grad {n}: {m}")
        for opt in opts:
            opt.step()
    for k, v in ref.state_dict().items():
        close(gpt.state_dict()[k], v, msg=lambda m: f"after 5 steps, {k}: {m}")
    assert gpt.head.weight is gpt.tok_emb.weight


def test_dropout_only_in_training_and_refused_under_tp():
    """Where the twin drops (its draws land elsewhere: nn.MultiheadAttention's output is laid out
    sequence-first in memory), nothing in eval mode, and not at all under tp > 1."""
    ref, gpt = twins(dropout=0.2)
    plain, _ = twins()
    x = tokens(4)
    for m in (ref, gpt):
        assert not torch.allclose(m(x), plain(x)), "dropout did nothing in training"
        close(m.eval()(x), plain(x))
    with pytest.raises(ConfigError, match=r"dropout 0.2 with tensor parallelism \(tp=2\)"):
        GPT(V, T, L, NH, E, dropout=0.2, group=TPGroup.offline(0, 2))


def test_forward_traces_with_torch_fx():
    ref, gpt = twins()
    x = tokens(3)
    traced = fx.symbolic_trace(ref)
    close(traced(x), ref(x))

    class Leaves(fx.Tracer):            # mpipar's layers communicate: leaves of the graph
        def is_leaf_module(self, m, name):
            return super().is_leaf_module(m, name) or type(m).__module__.startswith("mpipar.tensor")

    graph = Leaves().trace(gpt)
    called = [n.target for n in graph.nodes if n.op == "call_module"]
    assert called == ["tok_emb", "pos_emb", "drop", *[f"blocks.{i}" for i in range(L)], "norm", "head"]
    close(fx.GraphModule(gpt, graph)(x), gpt(x))


def test_counter_init_keeps_the_head_tied_and_equal_to_the_twin():
    ref, gpt = twins()
    counter_init_(ref, 3)
    counter_init_(gpt, 3, TPGroup.offline(0, 1))
    for m in (ref, gpt):
        assert m.head.weight is m.tok_emb.weight
    close(gpt(tokens(2)), ref(tokens(2)))


class PaddingFirst(nn.Module):
    """A stand-in whose logits favour the padded ids (>= 13) by far."""

    def forward(self, idx):
        return torch.arange(V, dtype=torch.float32).expand(*idx.shape, V) * 10


def test_generation_shape_range_and_determinism():
    ref, _ = twins()
    start = tokens(2, t=3)
    draw = [generate(ref, start, 2 * T, T, vocab_size=13, temperature=0.8, top_k=5,
                     generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert draw[0].shape == (2, 3 + 2 * T)               # past the context: the last T tokens are fed
    assert torch.equal(draw[0][:, :3], start) and torch.equal(draw[0], draw[1])
    assert ref.training
    padded = generate(PaddingFirst(), start, 20, T, vocab_size=13, generator=torch.Generator().manual_seed(7))
    assert int(padded.max()) < 13 <= V, "a padded id was sampled"


def test_corpus_splits_by_whole_works():
    train, val = load_shakespeare(block_size=32, val_windows=10)
    assert train.meta["val_works"] == ["macbeth"] and "macbeth" not in train.meta["train_works"]
    assert len(train.meta["train_works"]) == 4 and len(val) == 10 and val.x.shape == (10, 32)
    vocab = train.meta["vocab"]
    seen = vocab.decode(train.x[::32].reshape(-1))       # the training text, window after window
    assert "Enter Macbeth" not in seen and "MACBETH" not in seen
    head = train.x[:1000]                                 # every start: each window one character on
    assert torch.equal(head[1:, :-1], head[:-1, 1:]) and torch.equal(train.y[:1000, :-1], head[:, 1:])
    assert torch.equal(val.y[:, :-1], val.x[:, 1:])
    assert split_works(["hamlet", "tempest", "sonnets", "macbeth"]) == (["hamlet", "sonnets"], ["tempest", "macbeth"])


def test_a_folder_without_held_out_works_or_texts_is_one_line(tmp_path):
    (tmp_path / "texts").mkdir()
    with pytest.raises(DataError) as e:
        load_shakespeare(data_dir=tmp_path)
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "texts" / "hamlet_gut.txt").write_text("synthetic text, not Shakespeare\n" * 20)
    with pytest.raises(DataError, match=f"0 validation works .*{HELD_OUT[0]}"):
        load_shakespeare(data_dir=tmp_path)


def test_vocabulary_round_trip():
    train, _ = load_shakespeare(block_size=32, val_windows=10)
    vocab = train.meta["vocab"]
    text = vocab.decode(train.x[5000])
    ids = vocab.encode(text)
    assert torch.equal(ids, train.x[5000]) and vocab.decode(ids) == text
    assert list(vocab.chars) == sorted(vocab.chars) and len(set(vocab.chars)) == len(vocab)
    with pytest.raises(ValueError, match="'~' is not in"):
        vocab.encode("a~b")


def test_example_spreads_the_blocks_over_the_stages_and_refuses_more_stages_than_blocks():
    from mpipar.app import registry
    example = registry.load("gpt-shakespeare")
    args = argparse.Namespace(grid="pp=8", n_layer=4)
    assert [example.split(args, n) for n in (1, 2, 3, 4)] == [
        [], ["blocks.2"], ["blocks.1", "blocks.2"], ["blocks.1", "blocks.2", "blocks.3"]]
    with pytest.raises(ConfigError, match=r"--grid pp=8: 8 pipeline stages for 4 blocks .*at most pp=4") as e:
        example.split(args, 8)
    assert "\n" not in str(e.value)


def test_trainer_progress_line_counts_the_steps_since_the_last():
    """Two lines over an epoch of 10 steps: each the loss of its own 5 steps, so their mean is the
    epoch's train loss (equal batches), and tokens/s = samples/s x tokens per sample."""
    import mpipar
    from mpipar.comm import World
    from mpipar.rankmap import Grid
    from mpipar.topology import Topology
    topo = Topology.build(World.alone(), Grid(1))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(13, 8), nn.Linear(8, 13))
    pipe = mpipar.Pipeline(model, topo, loss_fn=lambda out, y: F.cross_entropy(out.transpose(1, 2), y))
    lines = []
    cfg = mpipar.TrainConfig(epochs=1, batch_size=4, steps=10, progress_every=5, tokens_per_sample=T)
    data = (tokens(40), tokens(40, seed=3))
    rows = mpipar.Trainer(pipe, torch.optim.SGD(pipe.parameters(), lr=0.5), cfg, log=lines.append).fit(data, data)
    got = [re.fullmatch(r"step (\d+)/10  train loss ([0-9.]+)  ([0-9,]+) tokens/s  ETA (\S+)", ln) for ln in lines[:2]]
    assert all(got), lines
    assert [int(m.group(1)) for m in got] == [5, 10] and got[1].group(4) == "0s"
    first, second = (float(m.group(2)) for m in got)
    assert first != second and math.isclose((first + second) / 2, rows[0]["train_loss"], rel_tol=1e-3)
