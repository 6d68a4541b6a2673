"""mpipar.tensor on 2 and 4 ranks: every tensor-parallel module equals its single-device twin
(forward, input and parameter gradients, sharded init, gathered state dict), the communication
counts are exactly Megatron's, training stays equal for 20 steps (in float64), and bad divisibility fails at
construction on every rank."""
import pytest
import torch
from torch import nn

from mpipar.errors import ConfigError
from mpipar.tensor import (GPT, ColumnParallelLinear, ParallelMLP, ParallelSelfAttention, ReferenceTransformerLM,
                           ReferenceGPT, RowParallelLinear, TPGroup, TPTransformerBlock, TPTransformerLM, counter_init_,
                           gather_full_state_dict, reference_block, reference_mlp, shard_state_dict, tp_plan)
from mpipar.tensor.clip import ShardedGradNormError, clip_grad_norm_tp

NP = (2, 4)
TIMEOUT = 180

torch.set_num_threads(1)
close = torch.testing.assert_close

B, D, H, O = 6, 12, 16, 8          # layers
E, NH, T = 16, 4, 5                # attention and transformer
V, L = 12, 2


@pytest.fixture(scope="module")
def group(world):
    return TPGroup(world)


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def assert_counts(name, fwd: dict, bwd: dict, phase_counts):
    for phase, want in (("forward", fwd), ("backward", bwd)):
        for op in ("allreduce", "allgather"):
            got = phase_counts.count(op, phase)
            assert got == want.get(op, 0), f"{name}: {got} {op} in {phase}, expected {want.get(op, 0)}"


def parity(group, name, tp, ref, x, seed=7, call=None, fwd=None, bwd=None, check_input_grad=True):
    """Same seed -> sharded init equals the reference's slices; forward, gradients and the gathered
    state dict equal the single-device module; communication counts as given."""
    P, counter = group.size, group.counter
    call = call or (lambda m, inp: m(inp))
    counter_init_(ref, seed)
    counter_init_(tp, seed, group)
    plan = tp_plan(tp)
    want = shard_state_dict(ref.state_dict(), plan, group.rank, P)
    for k, v in tp.state_dict().items():
        assert torch.equal(v, want[k]), f"{name}: sharded init of {k} differs from the reference slice"
    xr = x.clone().requires_grad_(x.is_floating_point())
    xt = x.clone().requires_grad_(x.is_floating_point())
    out_ref = call(ref, xr)
    counter.reset()
    out_tp = call(tp, xt)
    close(out_tp, out_ref, msg=lambda m: f"{name} forward: {m}")
    w = randn(*out_ref.shape, seed=seed + 1)
    (out_ref * w).sum().backward()
    after_fwd = {k: v for k, v in counter.calls.items()}
    (out_tp * w).sum().backward()
    if fwd is not None:
        assert_counts(name, fwd, bwd, counter)
        assert all(p == "forward" for (_, p) in after_fwd), f"{name}: backward traffic during forward"
    if check_input_grad and x.is_floating_point():
        close(xt.grad, xr.grad, msg=lambda m: f"{name} input grad: {m}")
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    want_grads = shard_state_dict(ref_grads, plan, group.rank, P)
    for n, p in tp.named_parameters():
        assert p.grad is not None, f"{name}: no gradient for {n}"
        close(p.grad, want_grads[n], msg=lambda m: f"{name} grad {n}: {m}")
    full = gather_full_state_dict(tp, group)
    for k, v in ref.state_dict().items():   # running statistics moved: close, not bitwise
        close(full[k], v, msg=lambda m: f"{name}: gathered {k}: {m}")


# -- layers -----------------------------------------------------------------------------------

def test_column_linear_gathered(group):
    parity(group, "column Linear (gathered)", ColumnParallelLinear(D, O, group, gather_output=True), nn.Linear(D, O),
           randn(B, D, seed=1), fwd={"allgather": 1}, bwd={"allreduce": 1})


def test_row_linear_split_input(group):
    parity(group, "row Linear (split input)", RowParallelLinear(D, O, group, input_is_parallel=False), nn.Linear(D, O),
           randn(B, D, seed=1), fwd={"allreduce": 1}, bwd={"allgather": 1})


def test_mlp_linear_relu_linear(group):
    parity(group, "Sequential(linear, relu, linear)", ParallelMLP(D, H, O, group), reference_mlp(D, H, O),
           randn(B, D, seed=1), fwd={"allreduce": 1}, bwd={"allreduce": 1})


def test_mlp_with_layernorm(group):
    parity(group, "MLP + LayerNorm", ParallelMLP(D, H, O, group, norm="layer"), reference_mlp(D, H, O, norm="layer"),
           randn(B, D, seed=1), fwd={"allreduce": 1}, bwd={"allreduce": 1})


def test_mlp_with_batchnorm_train_and_eval(group):
    x = randn(B, D, seed=1)
    tp_bn, ref_bn = ParallelMLP(D, H, O, group, norm="batch"), reference_mlp(D, H, O, norm="batch")
    parity(group, "MLP + BatchNorm", tp_bn, ref_bn, x, fwd={"allreduce": 1}, bwd={"allreduce": 1})
    tp_bn.eval(), ref_bn.eval()
    with torch.no_grad():
        close(tp_bn(x), ref_bn(x), msg=lambda m: f"BatchNorm eval (running stats): {m}")


# -- attention and transformer -----------------------------------------------------------------

def _xs():
    return randn(3, T, E, seed=2)


def _mask():
    return nn.Transformer.generate_square_subsequent_mask(T)


def test_self_attention(group):
    parity(group, "self-attention", ParallelSelfAttention(E, NH, group), nn.MultiheadAttention(E, NH, batch_first=True),
           _xs(), call=lambda m, inp: m(inp) if isinstance(m, ParallelSelfAttention)
           else m(inp, inp, inp, need_weights=False)[0],
           fwd={"allreduce": 1}, bwd={"allreduce": 1})


def test_causal_self_attention(group):
    mask = _mask()
    parity(group, "causal self-attention", ParallelSelfAttention(E, NH, group),
           nn.MultiheadAttention(E, NH, batch_first=True), _xs(),
           call=lambda m, inp: (m(inp, is_causal=True) if isinstance(m, ParallelSelfAttention)
                                else m(inp, inp, inp, attn_mask=mask, is_causal=True, need_weights=False)[0]))


def test_transformer_block(group):
    mask = _mask()
    parity(group, "Transformer block", TPTransformerBlock(E, NH, 32, group), reference_block(E, NH, 32), _xs(),
           call=lambda m, inp: m(inp, is_causal=True) if isinstance(m, TPTransformerBlock)
           else m(inp, src_mask=mask, is_causal=True), fwd={"allreduce": 2}, bwd={"allreduce": 2})


def test_transformer_lm(group):
    tokens = torch.randint(0, V, (4, T), generator=torch.Generator().manual_seed(3))
    parity(group, "Transformer LM", TPTransformerLM(V, E, NH, 32, L, 8, group), ReferenceTransformerLM(V, E, NH, 32, L, 8),
           tokens, fwd={"allreduce": 2 * L, "allgather": 1}, bwd={"allreduce": 2 * L + 1})


# -- training parity ----------------------------------------------------------------------------

def train_parity(group, name, tp, ref, batches, loss_fn, steps, lr, clip=0.0):
    """`steps` Adam steps of the TP model and of its single-device twin, every parameter close
    at the end. In float64: Adam divides by the root of the squared gradient, which amplifies
    summation-order rounding (float32: 1.9e-5 apart after 20 steps, seen once), and what is
    tested here is that TP computes the same gradients, not Adam's rounding."""
    tp.double()
    ref.double()
    counter_init_(ref, 11)
    counter_init_(tp, 11, group)
    opts = [torch.optim.Adam(m.parameters(), lr=lr) for m in (tp, ref)]
    norms = {}
    for step in range(steps):
        xb, yb = batches(step)
        xb = xb.double() if xb.is_floating_point() else xb
        for m, opt in zip((tp, ref), opts):
            opt.zero_grad()
            loss_fn(m(xb), yb).backward()
            if clip:
                norms[m is tp] = (clip_grad_norm_tp(m, clip, group) if m is tp
                                  else float(nn.utils.clip_grad_norm_(m.parameters(), clip)))
            opt.step()
        if clip:
            close(norms[True], norms[False], rtol=1e-5, atol=0, msg=lambda m: f"{name} step {step} grad norm: {m}")
            norms["clipped"] = norms.get("clipped", 0) + (norms[False] > clip)
    assert not clip or norms["clipped"] > 0, f"{name}: clipping never engaged; lower the threshold"
    full = gather_full_state_dict(tp, group)
    for k, v in ref.state_dict().items():
        assert full[k].dtype == v.dtype and (v.dtype == torch.float64 or not v.is_floating_point()), (k, v.dtype)
        close(full[k], v, msg=lambda m: f"{name} after {steps} steps, {k}: {m}")


def mlp_stack(make):
    return nn.Sequential(make(D, 32, 16, norm="batch"), make(16, 32, 4, norm="layer"))


def test_training_tp_mlp_with_norms_and_clipping_stays_equal(group):
    data_x = randn(20 * 8, D, seed=5)
    data_y = torch.randint(0, 4, (20 * 8,), generator=torch.Generator().manual_seed(6))
    train_parity(group, "TP MLP (BatchNorm, LayerNorm, clipped)", mlp_stack(lambda *a, **k: ParallelMLP(*a, group, **k)),
                 mlp_stack(reference_mlp), lambda s: (data_x[s * 8:(s + 1) * 8], data_y[s * 8:(s + 1) * 8]),
                 nn.CrossEntropyLoss(), 20, 1e-2, clip=0.5)


def test_training_tp_transformer_lm_stays_equal(group):
    seqs = torch.randint(0, V, (20 * 4, T + 1), generator=torch.Generator().manual_seed(8))
    xent = nn.CrossEntropyLoss()
    # bias=False: with Adam, the key bias (exactly-zero gradient) would drift on rounding noise
    train_parity(group, "TP Transformer LM", TPTransformerLM(V, E, NH, 32, L, 8, group, bias=False),
                 ReferenceTransformerLM(V, E, NH, 32, L, 8, bias=False),
                 lambda s: (seqs[s * 4:(s + 1) * 4, :-1], seqs[s * 4:(s + 1) * 4, 1:]),
                 lambda logits, y: xent(logits.reshape(-1, V), y.reshape(-1)), 20, 3e-3)


def test_gpt_tp(group):
    """GPT (mpipar.tensor.gpt): the vocabulary-parallel embedding shares its shard with the
    column-parallel head; forward, gradients (the tied shard's: its rows of the twin's embedding +
    head gradient), communication counts, gathered state dict and 20 Adam steps equal ReferenceGPT."""
    v, make = 16, lambda: GPT(16, T, L, NH, E, group=group)     # every rank's vocabulary rows looked up
    tokens = torch.randint(0, v, (4, T), generator=torch.Generator().manual_seed(3))
    gpt = make()
    parity(group, "GPT", gpt, ReferenceGPT(v, T, L, NH, E), tokens,
           fwd={"allreduce": 2 * L + 1, "allgather": 1}, bwd={"allreduce": 2 * L + 1})
    assert gpt.head.weight is gpt.tok_emb.weight and gpt.head.weight.shape == (v // group.size, E)
    seqs = torch.randint(0, v, (20 * 4, T + 1), generator=torch.Generator().manual_seed(8))
    xent = nn.CrossEntropyLoss()
    train_parity(group, "GPT", make(), ReferenceGPT(v, T, L, NH, E),
                 lambda s: (seqs[s * 4:(s + 1) * 4, :-1], seqs[s * 4:(s + 1) * 4, 1:]),
                 lambda logits, y: xent(logits.reshape(-1, v), y.reshape(-1)), 20, 3e-3)


def test_torch_clip_of_a_tp_model_is_refused_and_clip_grad_norm_tp_is_the_full_norm(group):
    """A user's own model (column, row, then replicated LayerNorm and head): torch's clip_grad_norm_
    would take each rank's shards for the whole gradient; it is refused on every rank, gradients
    untouched, and clip_grad_norm_tp clips by the single-process model's norm."""
    ref = nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.Linear(H, O), nn.LayerNorm(O), nn.Linear(O, 3)).double()
    tp = nn.Sequential(ColumnParallelLinear(D, H, group), nn.GELU(), RowParallelLinear(H, O, group), nn.LayerNorm(O),
                       nn.Linear(O, 3)).double()
    counter_init_(ref, 4)
    counter_init_(tp, 4, group)
    x = randn(B, D, seed=9).double()
    for m in (tp, ref):
        m(x).square().sum().backward()
    before = [p.grad.detach().clone() for p in tp.parameters()]
    with pytest.raises(ShardedGradNormError, match="clip_grad_norm_tp"):
        nn.utils.clip_grad_norm_(tp.parameters(), 1e-3)
    assert all(torch.equal(p.grad, g) for p, g in zip(tp.parameters(), before))
    close(clip_grad_norm_tp(tp, 1e-3, group), float(nn.utils.clip_grad_norm_(ref.parameters(), 1e-3)))
    full = {n: p.grad for n, p in ref.named_parameters()}
    mine = shard_state_dict(full, tp_plan(tp), group.rank, group.size)
    for n, p in tp.named_parameters():
        close(p.grad.detach(), mine[n], msg=lambda m: f"clipped gradient of {n}: {m}")


# -- errors at construction, on every rank -----------------------------------------------------

@pytest.mark.parametrize("what, build, needle", [
    ("hidden", lambda g: ParallelMLP(D, 4 * g.size + 1, O, g), "out_features is"),
    ("row", lambda g: RowParallelLinear(2 * g.size + 1, O, g), "in_features is"),
    ("heads", lambda g: ParallelSelfAttention(3 * (g.size + 1) * 4, g.size + 1, g), "num_heads is"),
], ids=["hidden", "row", "heads"])
def test_indivisible_sizes_fail_at_construction_with_one_line(group, what, build, needle):
    P = group.size
    with pytest.raises(ConfigError) as e:
        build(group)
    msg = str(e.value)
    assert needle in msg and f"tp={P}" in msg and "\n" not in msg, f"{what}: unclear message {msg!r}"
