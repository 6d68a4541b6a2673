"""Any traceable nn.Module pipelined (mpipar/pipeline/split.py), in process: a user's GPT cut into
units that compose to the model exactly, trained on one rank through every way a stage runs them
(split backward with the tied head and embedding in one stage, recompute, interleaved chunks whose
tuples travel through MPI to this rank itself) against single-process training, the tuple wire
header, and the refusals, each one line. Multi-rank parity and the tie across ranks:
tests/mpi/cases_split.py."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import mpipar
from mpipar.comm.messages import decode_values, encode_values
from mpipar.comm.world import World
from mpipar.errors import ConfigError
from mpipar.model import LayerSpec
from mpipar.pipeline.split import split_units
from mpipar.rankmap import Grid
from mpipar.topology import Topology
from split_gpt import GPT, FunctionalHeadGPT, adam, batch, gpt, lm_loss, sgd, train_single

torch.set_num_threads(1)


def one_rank():
    return Topology.build(World(), Grid(1))


@pytest.mark.parametrize("cls", [GPT, FunctionalHeadGPT])
def test_the_units_compose_to_the_model(cls):
    model = gpt(cls)
    traced = split_units(model)
    assert traced.starts == ["wte", "wpe", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "ln_f"] + (
        ["head"] if cls is GPT else [])
    x, _ = batch(0)
    h = x
    for spec in traced.specs:
        h = spec.build()(h)
    torch.testing.assert_close(h, model(x), rtol=0, atol=0)
    state = traced.state_dict(spec.build() for spec in traced.specs)
    assert list(state) == list(model.state_dict())        # the model's own keys, in its order
    assert state.keys() == model.state_dict().keys()


STEPS = 5
WAYS = {  # name: (model, Pipeline keywords, optimizer)
    "gpipe": (GPT, dict(schedule="gpipe"), sgd),
    "zb": (GPT, dict(schedule="zb"), adam),                      # W of the head owns the tied weight
    "zb-recompute": (FunctionalHeadGPT, dict(schedule="zb", recompute=True), sgd),
    "1f1b-recompute": (GPT, dict(schedule="1f1b", recompute=True), adam),
    "interleaved": (FunctionalHeadGPT, dict(schedule="interleaved", chunks=2, split=["blocks.2"]), adam),
}


@pytest.mark.parametrize("way", WAYS)
def test_a_gpt_on_one_rank_equals_single_process_training(way):
    cls, kwargs, optimizer = WAYS[way]
    ref = gpt(cls)
    losses = train_single(ref, optimizer, STEPS)
    pipe = mpipar.Pipeline(gpt(cls), one_rank(), loss_fn=lm_loss, microbatches=4, **kwargs)
    opt, got = optimizer(pipe.parameters()), []
    for step in range(STEPS):
        x, y = batch(step)
        opt.zero_grad()
        got.append(pipe.step(x, y))
        opt.step()
    torch.testing.assert_close(got, losses)
    want = ref.state_dict()
    mine = pipe.state_dict()
    assert list(mine) == list(want)
    for k, v in want.items():
        torch.testing.assert_close(mine[k], v, msg=lambda m: f"{way}: {k}: {m}")


@pytest.mark.parametrize("values", [
    (torch.zeros(2, 3), 7, -(2 ** 62), 2.5, float("-inf"), -0.0, True, False, torch.ones(1, dtype=torch.int64)),
    ()])
def test_a_tuple_header_carries_its_numbers_and_where_its_tensors_go(values):
    kinds = decode_values(encode_values(values))
    for (kind, got), v in zip(kinds, values, strict=True):
        if isinstance(v, torch.Tensor):
            assert got is None
        else:
            assert type(got) is type(v) and np.array_equal(np.float64(got), np.float64(v))
            assert np.signbit(np.float64(got)) == np.signbit(np.float64(v))


def test_a_tuple_header_refuses_what_is_not_one():
    with pytest.raises(ValueError, match="not an mpipar tuple header"):
        decode_values(np.zeros(6, dtype=np.int64))
    with pytest.raises(TypeError, match="not str"):
        encode_values(("a",))


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.b(self.a(x))
        return self.a(x)


class ShapeAcross(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        shape = x.size()
        return self.b(self.a(x)).view(shape)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x, y):
        return self.a(x) + y


def hooked():
    model = gpt()
    model.register_forward_pre_hook(lambda m, inp: None)
    return model


@pytest.mark.parametrize("build, kwargs, message", [
    (Branchy, {}, r"Branchy.forward cannot be traced by torch.fx at .*test_split.py:\d+ \(`if x.sum\(\) > 0:`\): "
                  r"symbolically traced variables cannot be used as inputs to control flow; keep that code inside "
                  r"one submodule .* or give Pipeline an nn.Sequential or a list of mpipar.LayerSpec"),
    (gpt, dict(split=["blocks.9"]), r"split= names 'blocks.9', which is not a module GPT can be cut before; the "
                                    r"candidates, in forward order: wte, wpe, blocks.0, .*, ln_f, head"),
    (gpt, dict(split=["blocks.2"]), r"split= names 1 cut point\(s\), 2 stage\(s\), but the pipeline has 1 "
                                    r"\(pp x chunks per rank\): name 0 modules"),
    (gpt, dict(split=["blocks.2", "blocks.2", "ln_f"], schedule="interleaved", chunks=4),
     r"split= \['blocks.2', 'blocks.2', 'ln_f'\] leaves stage 1 without a module: name the cut points in forward "
     r"order, each once and none before wte"),
    (gpt, dict(split=["blocks.2"], schedule="interleaved", balance="params"), "split=.* and balance=params .*give one"),
    (lambda: [LayerSpec("a", lambda: nn.Linear(2, 2))], dict(split=["a"]), "split= names submodules of an nn.Module"),
    (TwoInputs, {}, r"TwoInputs.forward\(x, y\) takes other than one input"),
    (hooked, {}, "GPT has forward hooks, which a traced split would not run"),
    (gpt, dict(balance="time"), "balance='time' profiles the layers one by one on a tensor"),
], ids=["untraceable", "unknown-name", "count", "empty-stage", "split-and-balance", "layerspecs", "two-inputs",
        "hooks", "time"])
def test_what_cannot_be_split_so_is_refused_with_one_line(build, kwargs, message):
    with pytest.raises(ConfigError, match=message) as e:
        mpipar.Pipeline(build(), one_rank(), loss_fn=lm_loss, **kwargs)
    assert "\n" not in str(e.value)


def test_a_value_that_is_neither_tensor_nor_number_across_a_cut_is_refused_with_where_it_was_made():
    pipe = mpipar.Pipeline(ShapeAcross(), one_rank(), loss_fn=nn.MSELoss())
    with pytest.raises(ConfigError, match=r"the value made at .*test_split.py:\d+ \(`shape = x.size\(\)`\) is a Size "
                                          r"that forward uses after the cut before b: only tensors and numbers") as e:
        pipe.step(torch.randn(4, 4), torch.randn(4, 4))
    assert "\n" not in str(e.value)


def test_the_user_model_keeps_its_tied_parameter_as_one():
    model = gpt()
    pipe = mpipar.Pipeline(model, one_rank(), loss_fn=lm_loss)
    params = pipe.parameters()
    assert any(q is model.wte.weight for q in params) and len(params) == len(list(model.parameters()))
    assert pipe.parameter_order() == list(range(len(params)))
    before = copy.deepcopy(model.wte.weight.detach())
    opt = sgd(params)
    x, y = batch(0)
    pipe.step(x, y)
    opt.step()
    assert model.head.weight is model.wte.weight and not torch.equal(model.wte.weight, before)


def test_a_checkpoint_of_a_split_module_resumes_to_single_process_training(tmp_path):
    """Checkpoints key a split module's tensors by unit (wte.wte.weight, head.wte.weight): resumed
    mid-run (zb: the tied head's W in the last unit) it ends where single-process training does."""
    def run(until: int):
        pipe = mpipar.Pipeline(gpt(FunctionalHeadGPT), one_rank(), loss_fn=lm_loss, microbatches=2, schedule="zb")
        opt = adam(pipe.parameters())
        ckpt = mpipar.Checkpoint(tmp_path, pipe, opt, every=2, log=lambda *a: None)
        step = start = ckpt.resume()
        while step < until:
            x, y = batch(step)
            opt.zero_grad()
            pipe.step(x, y)
            opt.step()
            step += 1
            ckpt.step(step)
        ckpt.close()
        return pipe, start

    run(3)
    pipe, start = run(5)
    assert start == 2
    ref = gpt(FunctionalHeadGPT)
    train_single(ref, adam, 5)
    mine = pipe.state_dict()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(mine[k], v, msg=lambda m: f"{k}: {m}")
