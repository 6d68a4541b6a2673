"""transformer-split: the numbers-to-words task, the packed encoder|decoder layers, autocast, Noam.
On 2 and 4 ranks, parity with single-process training (plain with micro-batches and greedy
samples, clipped over 4 stages, bf16) runs in shared mpirun jobs: tests/mpi/cases_transformer_runs.py;
the pipeline loss scaler across stages: tests/mpi/cases_transformer_split.py."""
import math

import pytest
import torch

from mpipar.app.datasets.numbers import (BOS, EOS, IGNORE, PAD, SRC_VOCAB, TGT_VOCAB, encode_pairs, lengths,
                                 numbers_to_words, to_words)
from mpipar.model import build_full
from mpipar.app.run import parse
from mpipar.train.amp import Autocast
from mpipar.train.lr import noam, noam_factor

torch.set_num_threads(1)
SMALL = ["--max-number", "999", "--batch-size", "32", "--epochs", "1", "--steps", "20", "--d-model", "32",
         "--ff", "64"]


# -- the task ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, words", [
    (0, "zero"), (7, "seven"), (13, "thirteen"), (20, "twenty"), (42, "forty two"), (100, "one hundred"),
    (105, "one hundred five"), (4213, "four thousand two hundred thirteen"), (10000, "ten thousand"),
    (9999, "nine thousand nine hundred ninety nine"), (1_000_001, "one million one"),
    (120_019, "one hundred twenty thousand nineteen")])
def test_words(n, words):
    assert " ".join(to_words(n)) == words


def test_lengths_fit_every_number():
    assert lengths(9999) == (4, 7)
    assert max(len(to_words(n)) for n in range(10000)) + 1 == 7
    for top in (9, 99, 999, 12345):
        s, t = lengths(top)
        assert s == len(str(top)) and all(len(to_words(n)) < t for n in range(top + 1))


def test_sample_layout_and_split():
    x, y = encode_pairs([4213, 7], 4, 7)
    assert SRC_VOCAB.decode(x[0, :4]) == list("4213") and SRC_VOCAB.decode(x[1, :4]) == ["7"]
    assert x[1, 1:4].eq(PAD).all() and x[:, 4].eq(BOS).all()
    assert TGT_VOCAB.decode(y[0].clamp_min(0)) == to_words(4213)
    assert y[1].tolist() == [TGT_VOCAB.ids["seven"], EOS] + [IGNORE] * 5
    words = (y[:, :-1] != IGNORE) & (y[:, :-1] != EOS)
    assert torch.equal(x[:, 5:][words], y[:, :-1][words])        # tgt_in = BOS + y shifted by one
    train, test = numbers_to_words(999)
    again, _ = numbers_to_words(999)
    assert torch.equal(train.x, again.x) and torch.equal(train.y, again.y)
    assert len(train) == 800 and len(test) == 200
    assert not set(train.meta["numbers"]) & set(test.meta["numbers"])


# -- the model pieces ----------------------------------------------------------------------------
def small_model(*extra):
    args, example = parse(["transformer-split", *SMALL, *extra])
    return args, example, build_full(example.layers(args), args.seed)


def test_decoder_is_causal_and_source_padding_is_masked():
    _, _, model = small_model("--amp", "off")
    model.eval()
    x, _ = encode_pairs([7, 42, 615], 3, 5)
    out = model(x)
    assert out.shape == (3, 5, len(TGT_VOCAB)) and out.dtype == torch.float32
    later = x.clone()
    later[:, 3 + 3:] = 5                      # change target inputs from position 3 on
    torch.testing.assert_close(model(later)[:, :3], out[:, :3])
    assert not torch.allclose(model(later)[:, 3:], out[:, 3:])
    junk = x.clone()
    junk[0, 1:3] = 9                          # '7' padded with digits instead of PAD
    assert not torch.allclose(model(junk)[0], out[0])


def test_sentence_loss_is_microbatch_transparent():
    args, example, model = small_model("--amp", "off")
    train, _ = example.data(args)
    loss = example.loss()
    x, y = train.x[:10], train.y[:10]
    whole = loss(model(x), y)
    parts = sum(loss(model(xs), ys) * len(ys) / len(y) for xs, ys in zip(x.tensor_split(3), y.tensor_split(3)))
    torch.testing.assert_close(parts, whole)


def test_autocast_wrapper_keeps_fp32_params_and_outputs():
    lin = torch.nn.Linear(8, 8)
    seen = []
    lin.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    wrapped = Autocast(lin, "bf16")
    out = wrapped(torch.randn(4, 8))
    assert seen == [torch.bfloat16] and out.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in wrapped.parameters())
    x = torch.randn(4, 8)
    assert torch.equal(Autocast(lin, "off")(x), lin(x))
    assert set(Autocast(lin, "off").state_dict()) == {"layer.weight", "layer.bias"}
    with pytest.raises(ValueError, match="unknown amp mode"):
        Autocast(lin, "fp8")


def test_noam_warms_up_then_decays():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = noam(opt, d_model=64, warmup=10)
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(2.0 * 64 ** -0.5 * 10 ** -1.5)          # first step: k = 1
    assert max(lrs) == pytest.approx(2.0 * noam_factor(10, 64, 10)) == lrs[9]
    assert lrs[9] == pytest.approx(2.0 / math.sqrt(64 * 10))
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10])) and all(a > b for a, b in zip(lrs[9:], lrs[10:]))


def test_sublayers_compose_to_torchs_pre_norm_transformer():
    """The pipeline layers are torch's pre-norm encoder and decoder layers cut at their
    sublayers: with the same weights, the packed model gives nn.Transformer*Layer's numbers."""
    from torch import nn
    args, _, model = small_model("--amp", "off")
    names = [n for n, _ in model.named_children()]
    assert names == ["embed", "enc1-attn", "enc1-ff", "enc2-attn", "enc2-ff", "dec1-attn", "dec1-cross", "dec1-ff",
                     "dec2-attn", "dec2-cross", "dec2-ff", "head"]
    assert args.balance.kind == "time"                 # the default: cut by measured cost
    d, s = args.d_model, 3
    layer = {n: m.layer for n, m in model.named_children()}
    enc = [nn.TransformerEncoderLayer(d, args.heads, args.ff, 0.0, batch_first=True, norm_first=True) for _ in range(2)]
    dec = [nn.TransformerDecoderLayer(d, args.heads, args.ff, 0.0, batch_first=True, norm_first=True) for _ in range(2)]
    with torch.no_grad():
        for i, e in enumerate(enc, 1):
            a, f = layer[f"enc{i}-attn"], layer[f"enc{i}-ff"]
            for dst, src in [(e.norm1, a.norm), (e.self_attn, a.attn), (e.norm2, f.norm), (e.linear1, f.ff[0]),
                             (e.linear2, f.ff[3])]:
                dst.load_state_dict(src.state_dict())
        for i, t in enumerate(dec, 1):
            a, c, f = layer[f"dec{i}-attn"], layer[f"dec{i}-cross"], layer[f"dec{i}-ff"]
            for dst, src in [(t.norm1, a.norm), (t.self_attn, a.attn), (t.norm2, c.norm), (t.multihead_attn, c.attn),
                             (t.norm3, f.norm), (t.linear1, f.ff[0]), (t.linear2, f.ff[3])]:
                dst.load_state_dict(src.state_dict())
    model.eval()
    x, _ = encode_pairs([7, 42, 615], s, 5)
    h = model[0](x)
    pad = h[:, :s, d] > 0.5
    mem, tgt = h[:, :s, :d], h[:, s:, :d]
    for e in enc:
        mem = e(mem, src_key_padding_mask=pad)
    mem = layer["enc2-ff"].final(mem)
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    for t in dec:
        tgt = t(tgt, mem, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=pad)
    head = layer["head"]
    torch.testing.assert_close(model(x), head.proj(head.norm(tgt)))
