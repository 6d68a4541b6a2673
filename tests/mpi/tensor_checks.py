"""Multi-rank checks of mpipar.tensor: every tensor-parallel module equals its single-device
twin (forward, input and parameter gradients, sharded init, gathered state dict), the
communication counts are exactly Megatron's, training stays equal for 20+ steps, and bad
divisibility fails at construction on every rank."""
import time

import torch
from torch import nn

from mpipar.comm import World, failure
from mpipar.errors import ConfigError
from mpipar.tensor.clip import clip_grad_norm_tp
from mpipar.tensor import (ColumnParallelLinear, ParallelMLP, ParallelSelfAttention, ReferenceTransformerLM,
                           RowParallelLinear, TPGroup, TPTransformerBlock, TPTransformerLM, counter_init_,
                           gather_full_state_dict, reference_block, reference_mlp, shard_state_dict, tp_plan)

torch.set_num_threads(1)
world = World()
failure.install(world.host)
P = world.size
group = TPGroup(world)
counter = group.counter
close = torch.testing.assert_close


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def ok(name, t0):
    if world.rank == 0:
        print(f"ok {name} (tp={P}, {time.perf_counter() - t0:.2f} s)", flush=True)


def assert_counts(name, fwd: dict, bwd: dict, phase_counts):
    for phase, want in (("forward", fwd), ("backward", bwd)):
        for op in ("allreduce", "allgather"):
            got = phase_counts.count(op, phase)
            assert got == want.get(op, 0), f"{name}: {got} {op} in {phase}, expected {want.get(op, 0)}"


def parity(name, tp, ref, x, seed=7, call=None, fwd=None, bwd=None, check_input_grad=True):
    """Same seed -> sharded init equals the reference's slices; forward, gradients and the gathered
    state dict equal the single-device module; communication counts as given."""
    t0 = time.perf_counter()
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
    ok(name, t0)


# -- layers -----------------------------------------------------------------------------------
B, D, H, O = 6, 12, 16, 8
x = randn(B, D, seed=1)
parity("column Linear (gathered)", ColumnParallelLinear(D, O, group, gather_output=True), nn.Linear(D, O), x,
       fwd={"allgather": 1}, bwd={"allreduce": 1})
parity("row Linear (split input)", RowParallelLinear(D, O, group, input_is_parallel=False), nn.Linear(D, O), x,
       fwd={"allreduce": 1}, bwd={"allgather": 1})
parity("Sequential(linear, relu, linear)", ParallelMLP(D, H, O, group), reference_mlp(D, H, O), x,
       fwd={"allreduce": 1}, bwd={"allreduce": 1})
parity("MLP + LayerNorm", ParallelMLP(D, H, O, group, norm="layer"), reference_mlp(D, H, O, norm="layer"), x,
       fwd={"allreduce": 1}, bwd={"allreduce": 1})
tp_bn, ref_bn = ParallelMLP(D, H, O, group, norm="batch"), reference_mlp(D, H, O, norm="batch")
parity("MLP + BatchNorm", tp_bn, ref_bn, x, fwd={"allreduce": 1}, bwd={"allreduce": 1})
tp_bn.eval(), ref_bn.eval()
with torch.no_grad():
    close(tp_bn(x), ref_bn(x), msg=lambda m: f"BatchNorm eval (running stats): {m}")

# -- attention and transformer -----------------------------------------------------------------
E, NH, T = 16, 4, 5
xs = randn(3, T, E, seed=2)
mask = nn.Transformer.generate_square_subsequent_mask(T)
mha = nn.MultiheadAttention(E, NH, batch_first=True)
parity("self-attention", ParallelSelfAttention(E, NH, group), mha, xs,
       call=lambda m, inp: m(inp) if isinstance(m, ParallelSelfAttention) else m(inp, inp, inp, need_weights=False)[0],
       fwd={"allreduce": 1}, bwd={"allreduce": 1})
parity("causal self-attention", ParallelSelfAttention(E, NH, group), nn.MultiheadAttention(E, NH, batch_first=True), xs,
       call=lambda m, inp: (m(inp, is_causal=True) if isinstance(m, ParallelSelfAttention)
                            else m(inp, inp, inp, attn_mask=mask, is_causal=True, need_weights=False)[0]))
parity("Transformer block", TPTransformerBlock(E, NH, 32, group), reference_block(E, NH, 32), xs,
       call=lambda m, inp: m(inp, is_causal=True) if isinstance(m, TPTransformerBlock)
       else m(inp, src_mask=mask, is_causal=True), fwd={"allreduce": 2}, bwd={"allreduce": 2})
V, L = 12, 2
tokens = torch.randint(0, V, (4, T), generator=torch.Generator().manual_seed(3))
parity("Transformer LM", TPTransformerLM(V, E, NH, 32, L, 8, group), ReferenceTransformerLM(V, E, NH, 32, L, 8),
       tokens, fwd={"allreduce": 2 * L, "allgather": 1}, bwd={"allreduce": 2 * L + 1})


# -- training parity ----------------------------------------------------------------------------
def train_parity(name, tp, ref, batches, loss_fn, steps, lr, clip=0.0):
    t0 = time.perf_counter()
    counter_init_(ref, 11)
    counter_init_(tp, 11, group)
    opts = [torch.optim.Adam(m.parameters(), lr=lr) for m in (tp, ref)]
    norms = {}
    for step in range(steps):
        xb, yb = batches(step)
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
        close(full[k], v, msg=lambda m: f"{name} after {steps} steps, {k}: {m}")
    ok(f"{name}: {steps} training steps equal", t0)


def mlp_stack(make):
    return nn.Sequential(make(D, 32, 16, norm="batch"), make(16, 32, 4, norm="layer"))


data_x, data_y = randn(20 * 8, D, seed=5), torch.randint(0, 4, (20 * 8,), generator=torch.Generator().manual_seed(6))
train_parity("TP MLP (BatchNorm, LayerNorm, clipped)", mlp_stack(lambda *a, **k: ParallelMLP(*a, group, **k)),
             mlp_stack(reference_mlp), lambda s: (data_x[s * 8:(s + 1) * 8], data_y[s * 8:(s + 1) * 8]),
             nn.CrossEntropyLoss(), 20, 1e-2, clip=0.5)
seqs = torch.randint(0, V, (20 * 4, T + 1), generator=torch.Generator().manual_seed(8))
xent = nn.CrossEntropyLoss()
# bias=False: with Adam, the key bias (exactly-zero gradient) would drift on rounding noise
train_parity("TP Transformer LM", TPTransformerLM(V, E, NH, 32, L, 8, group, bias=False),
             ReferenceTransformerLM(V, E, NH, 32, L, 8, bias=False),
             lambda s: (seqs[s * 4:(s + 1) * 4, :-1], seqs[s * 4:(s + 1) * 4, 1:]),
             lambda logits, y: xent(logits.reshape(-1, V), y.reshape(-1)), 20, 3e-3)

# -- errors at construction, on every rank -----------------------------------------------------
t0 = time.perf_counter()
bad = [("hidden", lambda: ParallelMLP(D, 4 * P + 1, O, group), "out_features is"),
       ("row", lambda: RowParallelLinear(2 * P + 1, O, group), "in_features is"),
       ("heads", lambda: ParallelSelfAttention(3 * (P + 1) * 4, P + 1, group), "num_heads is")]
for what, build, needle in bad:
    try:
        build()
    except ConfigError as e:
        msg = str(e)
        assert needle in msg and f"tp={P}" in msg and "\n" not in msg, f"{what}: unclear message {msg!r}"
    else:
        raise AssertionError(f"{what}: construction did not fail on tp={P}")
ok("divisibility errors at construction", t0)
world.barrier()
if world.rank == 0:
    print(f"all tensor checks passed on {P} ranks", flush=True)
