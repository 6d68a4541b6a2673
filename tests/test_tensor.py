"""Tensor parallelism: sharding and init logic in one process. Every module's parity with its
single-device twin on 2 and 4 ranks is tests/mpi/cases_tensor.py (one launch per size, run case
by case by tests/test_mpi_cases.py); the tp examples' parity and curves are
tests/mpi/cases_example_runs.py, their refusal of indivisible sizes tests/mpi/cases_bad_input.py."""
import copy

import pytest
import torch
from torch import nn

from mpipar.comm import World
from mpipar.data_parallel import DataParallel
from mpipar.errors import ConfigError
from mpipar.tensor import (QKV, ColumnParallelLinear, ParallelMLP, ParallelSelfAttention, ReferenceTransformerLM,
                           RowParallelLinear, ShardedBatchNorm1d, ShardRule, TPGroup, TPTransformerLM, counter_init_,
                           gather_state_dict, reference_mlp, shard_state_dict, tp_plan)
from mpipar.tensor.clip import ShardedGrad, ShardedGradNormError
from mpipar.tensor.group import CommCounter


def shards_of(build, size, seed, meta=False):
    out = []
    for r in range(size):
        group = TPGroup.offline(r, size)
        if meta:
            with torch.device("meta"):
                m = build(group)
        else:
            m = build(group)
        out.append(counter_init_(m, seed, group))
    return out


@pytest.mark.parametrize("size", [1, 2, 4])
@pytest.mark.parametrize("norm", [None, "layer", "batch"])
def test_sharded_init_is_the_reference_slice_and_round_trips(size, norm):
    ref = counter_init_(reference_mlp(8, 16, 4, norm=norm), seed=3)
    mods = shards_of(lambda g: ParallelMLP(8, 16, 4, g, norm=norm), size, seed=3)
    plan = tp_plan(mods[0])
    for r, m in enumerate(mods):
        want = shard_state_dict(ref.state_dict(), plan, r, size)
        assert want.keys() == m.state_dict().keys()
        for k, v in m.state_dict().items():
            assert torch.equal(v, want[k]), (k, r)
    full = gather_state_dict([m.state_dict() for m in mods], plan)
    for k, v in ref.state_dict().items():
        assert torch.equal(full[k], v), k


def test_transformer_materialised_from_meta_equals_reference_slices():
    ref = counter_init_(ReferenceTransformerLM(12, 16, 4, 32, 2, 10), seed=5)
    mods = shards_of(lambda g: TPTransformerLM(12, 16, 4, 32, 2, 10, g), 4, seed=5, meta=True)
    plan = tp_plan(mods[0])
    assert plan["layers.1.self_attn.in_proj_weight"] == QKV
    full = gather_state_dict([m.state_dict() for m in mods], plan)
    assert full.keys() == ref.state_dict().keys()
    for k, v in ref.state_dict().items():
        assert torch.equal(full[k], v), k
    assert mods[1].layers[0].self_attn.in_proj_weight.shape == (12, 16)   # 3 blocks x 1 head x 4


def test_tp1_model_equals_reference_without_communication():
    g = TPGroup.offline(0, 1)
    tp = counter_init_(TPTransformerLM(12, 16, 4, 32, 2, 10, g), 5, g)
    ref = counter_init_(ReferenceTransformerLM(12, 16, 4, 32, 2, 10), 5)
    tokens = torch.randint(0, 12, (3, 7), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(tp(tokens), ref(tokens))
    assert g.counter.count() == 0


def test_qkv_rule_takes_the_same_heads_from_q_k_and_v():
    idx = QKV.indices(12, rank=1, size=2)   # E = 4: q 0..3, k 4..7, v 8..11
    assert idx.tolist() == [2, 3, 6, 7, 10, 11]
    assert ShardRule.parse(QKV.text()) == QKV and ShardRule.parse("dim1") == ShardRule(1)


def test_init_distributions_have_the_usual_scale():
    lin = counter_init_(nn.Linear(400, 300), 0)
    bound = 400 ** -0.5
    assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > 0.99 * bound
    emb = counter_init_(nn.Embedding(500, 100), 0).weight.detach()
    assert abs(float(emb.mean())) < 0.02 and abs(float(emb.std()) - 1) < 0.02
    other = counter_init_(nn.Linear(400, 300), 1)
    assert not torch.equal(lin.weight, other.weight)


@pytest.mark.parametrize("build, needle", [
    (lambda g: ColumnParallelLinear(8, 10, g), "ColumnParallelLinear out_features is 10"),
    (lambda g: RowParallelLinear(10, 8, g), "RowParallelLinear in_features is 10"),
    (lambda g: ParallelMLP(8, 6, 8, g), "out_features is 6"),
    (lambda g: ParallelSelfAttention(24, 6, g), "num_heads is 6"),
    (lambda g: ParallelSelfAttention(20, 3, g), "not a multiple of num_heads 3"),
])
def test_bad_divisibility_fails_at_construction_with_one_line(build, needle):
    for rank in range(4):
        with pytest.raises(ConfigError, match=needle) as e:
            build(TPGroup.offline(rank, 4))
        assert "\n" not in str(e.value)


def test_counter_counts_calls_bytes_and_ring_traffic():
    c = CommCounter()
    c.add("allreduce", "forward", 1000, 4)
    c.add("allgather", "backward", 100, 4)
    assert c.count() == 2 and c.count("allreduce") == 1 and c.count(phase="backward") == 1
    assert c.total_bytes() == 1100 and c.total_bytes(wire=True) == 1500 + 300


def test_init_of_a_sharded_module_without_its_group_is_refused():
    with pytest.raises(ValueError, match="needs its TPGroup"):
        counter_init_(ShardedBatchNorm1d(8, TPGroup.offline(1, 2)), 0)


def test_offline_group_refuses_to_communicate():
    g = TPGroup.offline(0, 2)
    with pytest.raises(RuntimeError, match="offline"):
        ColumnParallelLinear(4, 4, g, gather_output=True)(torch.ones(1, 4))


# -- torch's norm of a sharded gradient (this rank's slice only) is refused ----------------------

def sharded_and_replicated(group):
    """A column-parallel layer (sharded) and a Linear after it (replicated), with a backward that
    needs no communication: the input does not require grad, so copy_to_tp's backward never runs."""
    torch.manual_seed(0)
    model = nn.Sequential(ColumnParallelLinear(4, 8, group), nn.Linear(8 // group.size, 3))
    model(torch.randn(5, 4)).square().sum().backward()
    return model


def test_torch_norms_of_sharded_gradients_are_refused_naming_clip_grad_norm_tp(tmp_path):
    model = sharded_and_replicated(TPGroup.offline(0, 2))
    col, lin = model
    assert type(col.weight.grad) is ShardedGrad and type(col.bias.grad) is ShardedGrad
    assert type(lin.weight.grad) is torch.Tensor      # replicated: plain
    for norm in (lambda: nn.utils.clip_grad_norm_(model.parameters(), 0.1),
                 lambda: nn.utils.clip_grad_norm_(model.parameters(), 0.1, foreach=True),
                 lambda: nn.utils.get_total_norm([p.grad for p in model.parameters()]),
                 lambda: col.weight.grad.norm(), lambda: torch.norm(col.weight.grad),
                 lambda: torch.linalg.norm(col.weight.grad), lambda: torch.linalg.vector_norm(col.bias.grad)):
        with pytest.raises(ShardedGradNormError, match=r"only this rank's shard.*clip_grad_norm_tp\(model, max_norm"):
            norm()
    nn.utils.clip_grad_norm_(lin.parameters(), 1e9)   # replicated gradients alone: torch's own, as ever
    # everything else sees a plain tensor and gives plain ones, with the values of plain gradients
    g = col.weight.grad
    assert type(g * 2) is torch.Tensor and type(g.detach()) is torch.Tensor and torch.equal(g * 2, g.detach() * 2)
    torch.save(g, tmp_path / "g.pt")
    assert torch.equal(torch.load(tmp_path / "g.pt", weights_only=True), g.detach())
    nn.utils.clip_grad_value_(model.parameters(), 0.5)
    assert type(g) is ShardedGrad and float(g.detach().abs().max()) <= 0.5


@pytest.mark.parametrize("make", [lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), lambda ps: torch.optim.Adam(ps, lr=0.1)])
def test_optimizers_step_sharded_gradients_as_plain_ones(make):
    guarded = sharded_and_replicated(TPGroup.offline(0, 2))
    plain = copy.deepcopy(guarded)
    for p, q in zip(guarded.parameters(), plain.parameters()):
        q.grad = p.grad.detach().clone()
    for m in (guarded, plain):
        make(m.parameters()).step()
    for p, q in zip(guarded.parameters(), plain.parameters()):
        assert torch.equal(p, q)


def test_sharded_gradients_stay_guarded_through_deepcopy_meta_init_and_data_parallel():
    group = TPGroup.offline(0, 2)
    copied = copy.deepcopy(sharded_and_replicated(group))    # new parameters, without hooks
    copied.zero_grad()
    copied(torch.randn(5, 4)).sum().backward()
    with torch.device("meta"):
        meta = nn.Sequential(ColumnParallelLinear(4, 8, group), nn.Linear(4, 3))
    meta.to_empty(device="cpu")
    meta(torch.randn(5, 4)).sum().backward()
    dp = DataParallel(copied, World.alone())                   # finish() points .grad at its buckets
    copied.zero_grad()
    copied(torch.randn(5, 4)).sum().backward()
    dp.finish()
    for model in (copied, meta):
        assert type(model[0].weight.grad) is ShardedGrad and type(model[1].weight.grad) is torch.Tensor
        with pytest.raises(ShardedGradNormError):
            nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    dp.buckets.remove()


def test_tp1_gradients_are_plain():
    """One tp rank holds the whole tensor: torch's norm is right there."""
    model = sharded_and_replicated(TPGroup.offline(0, 1))
    assert type(model[0].weight.grad) is torch.Tensor
    nn.utils.clip_grad_norm_(model.parameters(), 0.1)
