"""The pipeline engine: split and recomputed backwards equal the plain one (in process), every
schedule on one stage equals single-process training (PipeDream-2BW: its delayed reference),
and bad configurations that end the job with one line (the 4-rank parity cases: tests/mpi/cases_pipeline.py)."""
import json
import re

import pytest
import torch
from torch import nn

from mpipar.errors import ConfigError, ShapeError
from mpipar.pipeline.pipe import Pipeline
from mpipar.pipeline.stage import Stage
from mpipar.rankmap import Grid, RankMap
from mpipar.app.run import parse
from mpipar.app.session import reference_model
from mpipar.app.session import build_trainer
from mpipar.topology import Topology
from mpipar.comm import World
from mpirun import mpirun
from parity import check_parity

torch.set_num_threads(1)


def layers(dropout=0.0):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Linear(6, 8), nn.Tanh()), nn.Dropout(dropout),
                         nn.Sequential(nn.Linear(8, 5), nn.ReLU()), nn.Linear(5, 4)), g


def grads_of(index, n, split=False, recompute=False, dropout=0.0):
    """(input grad, param grads, loss or output) of one micro-batch through one stage."""
    module, g = layers(dropout)
    stage = Stage(module, index, n, None, nn.MSELoss(), recompute=recompute)
    x, y, gy = torch.randn(3, 6, generator=g), torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    torch.manual_seed(7)                                   # dropout's draws
    out = stage.forward(0, x, y if stage.is_last else None, 0.5, split=split)
    if recompute:
        assert stage.stash[0].root is None                # only the input is held
    gx = stage.backward(0, None if stage.is_last else gy, split=split)
    if split:
        assert all(p.grad is None for p in module.parameters())
        stage.backward_weight(0)
    assert not stage.stash
    return gx, [p.grad.clone() for p in module.parameters()], out.detach()


@pytest.mark.parametrize("index", [0, 1, 2], ids=["first", "middle", "last"])
@pytest.mark.parametrize("split, recompute", [(True, False), (False, True), (True, True)])
def test_split_and_recomputed_backward_equal_the_plain_one(index, split, recompute):
    want = grads_of(index, 3, dropout=0.3)
    got = grads_of(index, 3, split=split, recompute=recompute, dropout=0.3)
    assert (got[0] is None) == (want[0] is None) == (index == 0)
    if index:
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got[2], want[2], rtol=0, atol=0)


def one_stage(schedule, *extra):
    """The Trainer on one stage (p = 1: the whole engine, no messages) for 2 epochs x 6 steps."""
    args, ex = parse(["mlp", "--schedule", schedule, "--microbatches", "4", "--epochs", "2", "--steps", "6",
                      *extra])
    specs = ex.layers(args)
    topo = Topology.build(World(), Grid(1))
    trainer = build_trainer(topo, RankMap(Grid(1), [[s.name for s in specs]]), ex, specs, args, lambda *a: None)
    data, _ = ex.data(args)
    from mpipar.train.batches import epoch_batches
    for epoch in range(args.epochs):
        batches = epoch_batches(len(data.y), args.batch_size, args.seed, epoch)[:args.steps]
        for i, idx in enumerate(batches):
            trainer.train_step(data.x[idx], data.y[idx], None, position=(i, len(batches)))
    return trainer, ex, specs, data, args


@pytest.mark.parametrize("schedule, extra", [("gpipe", []), ("1f1b", ["--recompute"]), ("zb", []),
                                             ("zb", ["--recompute"]), ("pipedream", [])])
def test_every_schedule_on_one_stage_equals_its_reference(schedule, extra):
    trainer, ex, specs, data, args = one_stage(schedule, *extra)
    ref = reference_model(ex, specs, data, args, two_bw=schedule == "pipedream").state_dict()
    for k, v in trainer.state_dict().items():
        torch.testing.assert_close(v, ref[k], msg=lambda m: f"{k}: {m}")
    if schedule == "pipedream":   # and 2BW really is stale: it differs from synchronous training
        sync = reference_model(ex, specs, data, args).state_dict()
        assert max(float((v - sync[k]).abs().max()) for k, v in trainer.state_dict().items()) > 1e-4


def test_pipedream_refuses_a_batch_that_changes_the_stream():
    trainer, ex, specs, data, args = one_stage("pipedream")
    x, y = data.x[:64], data.y[:64]
    trainer.train_step(x, y, None, position=(0, 3))
    with pytest.raises(ConfigError, match="every batch must split into 4 micro-batches, but step 1 has 3"):
        trainer.train_step(x[:3], y[:3], None, position=(1, 3))


# Bad pipeline configs (a rank map that does not fit the schedule, too few micro-batches for
# pipedream) are refused with one line: tests/mpi/cases_bad_input.py.


def test_timeline_flag_writes_trace_and_gantt(tmp_path):
    p = mpirun(2, "-m", "mpipar.run", "mlp", "--schedule", "zb", "--microbatches", "4", "--epochs", "1",
               "--steps", "4", "--recompute", "--timeline", str(tmp_path / "tl"), "--out", str(tmp_path), timeout=90)
    assert p.returncode == 0, p.stderr[-2000:]
    m = re.search(r"measured bubble fraction ([\d.]+) vs formula ([\d.]+) \(zb, p=2, m=4\)", p.stdout)
    assert m and float(m.group(2)) == pytest.approx(1 / 13, abs=1e-3), p.stdout
    events = json.loads((tmp_path / "tl.json").read_text())["traceEvents"]
    assert {e["cat"] for e in events if e["ph"] == "X"} == {"F", "B", "W"}
    assert {e["tid"] for e in events if e["ph"] == "X"} == {0, 1}
    assert (tmp_path / "tl.png").stat().st_size > 1000


@pytest.mark.smoke
def test_pipeline_cifar_interleaved_on_4_ranks_equals_single_process(tmp_path):
    """Issue 15: pipeline-cifar's 8 layers fill 4 ranks x 2 chunks of the interleaved schedule."""
    out = check_parity(tmp_path, 4, ["pipeline-cifar", "--schedule", "interleaved", "--microbatches", "4",
                                     "--epochs", "1", "--steps", "3", "--n-train", "256", "--width", "8"])
    assert "schedule interleaved" in out and "conv1 + " in out, out[-2000:]


# -- issue 29: what Pipeline refuses, and what it takes (one rank, in process) ----------------------
def one_rank():
    return Topology.build(World(), Grid(1))


class SkipSequential(nn.Sequential):
    """A Sequential subclass with its own forward (a skip connection): not its children in a row."""

    def forward(self, x):
        return x + super().forward(x)


class ResMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 4), nn.Tanh())

    def forward(self, x):
        return x + self.inner(x)


def hooked():
    model = nn.Sequential(nn.Linear(4, 4))
    model.register_forward_hook(lambda m, inp, out: out * 2)
    return model


def shared():
    layer = nn.Linear(4, 4)
    return nn.Sequential(layer, nn.Tanh(), layer)


@pytest.mark.parametrize("build, message", [
    (hooked, "Sequential has forward hooks.*put them on a child"),
    (shared, "lists the same module at two places.*give each place its own module")],
    ids=["hooks", "shared"])
def test_pipeline_refuses_a_model_it_would_split_into_another(build, message):
    """Running these children one after the other is something else than model(x)."""
    with pytest.raises(ConfigError, match=message) as e:
        Pipeline(build(), one_rank(), loss_fn=nn.MSELoss())
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("build", [lambda: SkipSequential(nn.Linear(4, 4), nn.Tanh()), ResMLP],
                         ids=["subclass-forward", "not-sequential"])
def test_a_module_with_its_own_forward_is_traced_not_run_child_by_child(build):
    """Run child by child, the skip was dropped (2.34 away); traced (pipeline/split.py) it is kept."""
    torch.manual_seed(0)
    model = build().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    pipe = Pipeline(model, one_rank())
    assert pipe.traced is not None
    torch.testing.assert_close(pipe.predict(x), model(x), rtol=0, atol=0)


def test_the_skip_as_one_block_of_a_sequential_equals_the_model():
    """A block with a skip as one child of a Sequential: run whole, its forward intact."""
    torch.manual_seed(0)
    model = nn.Sequential(ResMLP(), nn.Linear(4, 2))
    x = torch.randn(5, 4, dtype=torch.float64)
    model.double()
    torch.testing.assert_close(Pipeline(model, one_rank()).predict(x), model(x), rtol=0, atol=0)


def squeezing_mse(out, y):
    return nn.functional.mse_loss(out.squeeze(-1), y)


def pairs_loss(out, y):
    """Like examples/graphsage_ppi.py's LinkLoss: reads only the output, targets of another shape."""
    return out.pow(2).mean()


@pytest.mark.parametrize("loss_fn", [nn.MSELoss(), nn.functional.mse_loss, nn.L1Loss(),
                                     lambda out, y: ((out - y) ** 2).mean()],
                         ids=["MSELoss", "mse_loss", "L1Loss", "own"])
def test_an_output_and_targets_the_loss_would_broadcast_are_refused(loss_fn):
    torch.manual_seed(0)
    pipe = Pipeline(nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)), one_rank(), loss_fn=loss_fn,
                    microbatches=2)
    x, y = torch.randn(16, 3), torch.randn(16)
    with pytest.raises(ShapeError, match=r"output of shape \(8, 1\) and targets of shape \(8,\).*y\.unsqueeze\(-1\)"):
        pipe.step(x, y)


@pytest.mark.parametrize("head, loss_fn, target", [
    (nn.Linear(8, 5), nn.CrossEntropyLoss(), lambda g: torch.randint(0, 5, (16,), generator=g)),
    (nn.Linear(8, 1), squeezing_mse, lambda g: torch.randn(16, generator=g, dtype=torch.float64)),
    (nn.Linear(8, 3), pairs_loss, lambda g: torch.randn(16, 1, generator=g, dtype=torch.float64))],
    ids=["cross-entropy", "own-squeeze", "targets-unused"])
def test_shapes_a_loss_reads_as_meant_pass_and_equal_single_process(head, loss_fn, target):
    """Class indices against logits, and losses that reshape (or ignore) the targets themselves:
    the step's loss, the global batch's loss and every gradient equal one process's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), head).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, generator=g, dtype=torch.float64), target(g)
    loss_of = loss_fn(model(x), y)
    loss_of.backward()
    want = float(loss_of.detach())
    ref = [q.grad.clone() for q in model.parameters()]
    model.zero_grad()
    pipe = Pipeline(model, one_rank(), loss_fn=loss_fn, microbatches=4)
    loss = pipe.step(x, y)
    torch.testing.assert_close(loss, want)
    assert pipe.global_loss() == loss                        # one replica: its batch is the global one
    for got, exp in zip((q.grad for q in pipe.parameters()), ref):
        torch.testing.assert_close(got, exp)


def test_a_stage_without_parameters_hands_the_optimizer_a_placeholder(tmp_path):
    """A rank whose stage holds only a Tanh (README (d) on 4 ranks): torch.optim.Adam(pipe.parameters())
    builds and steps, no state_dict shows the placeholder, and a checkpoint saves and resumes with it."""
    from mpipar import Checkpoint
    pipe = Pipeline(nn.Sequential(nn.Tanh()), one_rank(), loss_fn=nn.MSELoss())
    params = pipe.parameters()
    assert len(params) == 1 and params[0].numel() == 0 and not pipe.state_dict()
    opt = torch.optim.Adam(params, lr=1e-3)
    said = []
    ck = Checkpoint(tmp_path / "ck", pipe, opt, every=4, log=said.append)
    assert ck.resume() == 0
    for step in range(1, 6):
        opt.zero_grad()
        opt.step()
        ck.step(step)
    ck.close()
    again = Checkpoint(tmp_path / "ck", pipe, torch.optim.Adam(pipe.parameters(), lr=1e-3), every=4, log=said.append)
    assert again.resume() == 4


def test_a_resume_in_a_users_loop_says_the_step_without_epochs(tmp_path):
    """A user's loop counts steps: "step 3", never "epoch 1, 3 batches into it" (it knows no epochs)."""
    from mpipar import Checkpoint
    pipe = Pipeline(nn.Sequential(nn.Linear(3, 2)), one_rank(), loss_fn=nn.MSELoss())
    opt = torch.optim.SGD(pipe.parameters(), lr=0.1)
    ck = Checkpoint(tmp_path / "ck", pipe, opt, every=3, log=lambda *a: None)
    for step in range(1, 5):
        opt.zero_grad()
        pipe.step(torch.randn(4, 3), torch.randn(4, 2))
        opt.step()
        ck.step(step)
    ck.close()
    said = []
    assert Checkpoint(tmp_path / "ck", pipe, opt, every=3, log=said.append).resume() == 3
    assert said[-1].startswith("checkpoint: resumed from step-000000003 (step 3) written with"), said[-1]


def class_targets(ignored=None):
    """16 class indices in 0..1; `ignored` in the last micro-batch only (the check is per micro-batch)."""
    y = torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(1))
    if ignored is not None:
        y[-1] = ignored
    return y


@pytest.mark.parametrize("loss_fn, target, message", [
    (nn.MSELoss(reduction="sum"), lambda: torch.randn(16, 2), r"MSELoss with reduction='sum'"),
    (nn.CrossEntropyLoss(weight=torch.tensor([1.0, 3.0])), class_targets, r"CrossEntropyLoss with weight="),
    (nn.CrossEntropyLoss(), lambda: class_targets(-100), r"targets equal to ignore_index=-100"),
    (nn.NLLLoss(ignore_index=1), lambda: class_targets(1), r"NLLLoss with targets equal to ignore_index=1")],
    ids=["sum", "class-weights", "ignored-targets", "nll-ignored"])
def test_a_loss_that_is_not_a_mean_over_samples_is_refused(loss_fn, target, message):
    """Pipeline weighs each micro-batch's loss by its share of the samples, which equals one
    process only for a plain mean over samples: other torch losses are refused, with the fix."""
    torch.manual_seed(0)
    pipe = Pipeline(nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)), one_rank(), loss_fn=loss_fn,
                    microbatches=4)
    with pytest.raises(ConfigError, match=message + r".*not a plain mean over samples.*reduction='mean', no "
                                                    r"class weights, no ignored targets"):
        pipe.step(torch.randn(16, 3), target())


def test_predict_keeps_each_submodules_own_mode():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    model.train()
    model[1].eval()                                          # a user's partial eval toggle
    Pipeline(model, one_rank()).predict(torch.randn(2, 3))
    assert [m.training for m in model.modules()] == [True, True, False, True]


def test_a_stage_whose_layers_are_all_frozen_trains_the_rest():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    model.requires_grad_(False)
    x, y = torch.randn(4, 3), torch.randn(4, 4)
    for split in (False, True):
        stage = Stage(model, 0, 1, None, nn.MSELoss())
        stage.forward(0, x, y, 1.0, split=split)
        assert stage.backward(0, None, split=split) is None
        if split:
            stage.backward_weight(0)
    assert all(q.grad is None for q in model.parameters())


def test_zero_on_a_stage_of_frozen_layers_says_no_trainable_parameters():
    pipe = Pipeline(nn.Sequential(nn.Linear(3, 2).requires_grad_(False)), one_rank(), loss_fn=nn.MSELoss())
    pipe.zero = 1
    with pytest.raises(ConfigError, match="no trainable parameters"):
        pipe.make_optimizer(torch.optim.SGD, lr=0.1)


def test_a_second_step_on_gradients_already_reduced_over_dp_is_refused():
    pipe = Pipeline(nn.Sequential(nn.Linear(3, 2)), one_rank(), loss_fn=nn.MSELoss())
    opt = pipe.make_optimizer(torch.optim.SGD, lr=0.1)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    pipe.step(x, y)
    pipe._reduced = [(q, q.grad, q.grad._version) for q in pipe.module.parameters()]   # as dp > 1 leaves them
    opt.zero_grad(set_to_none=False)
    pipe.step(x, y)                                          # zeroed in place: fine
    pipe._reduced = [(q, q.grad, q.grad._version) for q in pipe.module.parameters()]
    with pytest.raises(ConfigError, match=r"call opt.zero_grad\(\) before each pipe.step"):
        pipe.step(x, y)


def test_a_sequential_with_tied_children_is_traced_and_equals_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 4), nn.Tanh(), nn.Linear(4, 7, bias=False))
    model[2].weight = model[0].weight
    ref = __import__("copy").deepcopy(model)
    x, y = torch.randint(0, 7, (6,)), torch.randn(6, 7)
    pipe = Pipeline(model, one_rank(), loss_fn=nn.MSELoss(), microbatches=2)
    assert pipe.traced is not None
    pipe.step(x, y)
    nn.functional.mse_loss(ref(x), y).backward()
    torch.testing.assert_close(model[0].weight.grad, ref[0].weight.grad)
