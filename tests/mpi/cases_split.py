"""A user's own GPT module (tests/split_gpt.py: not a Sequential; a head tied to the embedding,
positions from torch.arange and a causal mask buffer sliced in forward) traced, cut at named
blocks or by the balance, and trained 20 steps (float64) on pp=2, on pp=4 with every schedule
(m=8; PipeDream-2BW m=4, against its own delayed reference), and on pp=2 x dp=2 and pp=2 x tp=2:
on every rank each parameter (the tied one under both of its names) equals single-process
training, the reported losses too, and after every step (2BW: after its stream) the tied parameter
is bit-identical on every rank holding it. On 8 ranks (pp=2 x dp=2 x tp=2) the same for mpipar's own
tensor-parallel GPT (mpipar.tensor.gpt, its layers kept whole by the trace: their forwards
communicate) against its single-process twin. The global norm counts the tied parameter once; ZeRO
with it is refused."""
import pytest
import torch

import job
import mpipar
from mpipar.comm.world import allgather
from mpipar.errors import ConfigError
from mpipar.tensor.gpt import GPT, ReferenceGPT
from mpipar.tensor.group import TPGroup
from mpipar.tensor.sharding import shard_layer
from split_gpt import adam, batch, gpt, lm_loss, sgd, train_single

NP = (2, 4, 8)         # 8: in the job of cases_parity.py's 8-rank cases
TIMEOUT = 180
STEPS = 20

CASES = {   # name: (ranks, grid, Pipeline keywords, optimizer)
    "pp2-split-1f1b": (2, "pp=2", dict(schedule="1f1b", microbatches=4, split=["blocks.2"]), adam),
    "pp4-gpipe": (4, "pp=4", dict(schedule="gpipe", microbatches=8), sgd),
    "pp4-1f1b-split": (4, "pp=4", dict(schedule="1f1b", microbatches=8, split=["blocks.0", "blocks.2", "ln_f"]), adam),
    "pp4-eager-1f1b": (4, "pp=4", dict(schedule="eager-1f1b", microbatches=8), sgd),
    "pp4-interleaved": (4, "pp=4", dict(schedule="interleaved", microbatches=8, chunks=2), adam),
    "pp4-zb-recompute": (4, "pp=4", dict(schedule="zb", microbatches=8, recompute=True), sgd),
    "pp4-pipedream": (4, "pp=4", dict(schedule="pipedream", microbatches=4), sgd),
    "pp2xdp2": (4, "pp=2,dp=2", dict(schedule="1f1b", microbatches=2), sgd),
    "pp2xtp2": (4, "pp=2,tp=2", dict(schedule="zb", microbatches=4, split=["blocks.1"]), adam),
}
REFS = {}   # (optimizer, 2BW) -> (state dict, losses): the same single-process run for every case here


def reference(optimizer, two_bw: bool):
    if (optimizer, two_bw) not in REFS:
        model = gpt()
        losses = train_single(model, optimizer, STEPS, two_bw)
        REFS[optimizer, two_bw] = model.state_dict(), losses
    return REFS[optimizer, two_bw]


def check_tie(world, tied, holders, when: str) -> None:
    """The holders' copies are bit-identical (`holders`: lists of ranks holding the same copy)."""
    copies = allgather(world, tied.detach())
    assert all(torch.equal(copies[r], copies[same[0]]) for same in holders for r in same), f"{when}: tied copies differ"


@pytest.mark.parametrize("case", [c for c, spec in CASES.items() if spec[0] == job.size()])
def test_a_users_gpt_pipelined_equals_single_process(world, case):
    _, grid, kwargs, optimizer = CASES[case]
    topo = mpipar.init(grid=grid, stall_timeout=0, world=world)
    model = gpt()
    pipe = mpipar.Pipeline(model, topo, loss_fn=lm_loss, **kwargs)
    opt = optimizer(pipe.parameters())
    tied = model.wte.weight
    holds = any(q is tied for q in pipe.parameters())
    holders = [r for r, h in enumerate(world.allgather_floats([holds])[:, 0]) if h]
    assert len(holders) == 2 * topo.grid.dp * topo.grid.tp, holders      # first and last stage, each replica
    holders = [holders]
    losses, d, D = [], topo.dp_rank, topo.grid.dp
    for step in range(STEPS):
        x, y = batch(step)
        if pipe.streaming:          # 2BW updates inside its stream, which crosses the steps
            losses.append(pipe.step(x, y, position=(step, STEPS), batch=step, update=opt.step))
            continue
        opt.zero_grad()
        pipe.step(x.tensor_split(D)[d], y.tensor_split(D)[d])
        opt.step()
        losses.append(pipe.global_loss())
        check_tie(world, tied, holders, f"step {step}")
    check_tie(world, tied, holders, "the end")
    want, want_losses = reference(optimizer, pipe.streaming)
    mine = pipe.state_dict()
    assert mine and set(mine) <= set(want), sorted(mine)
    for k, v in mine.items():
        torch.testing.assert_close(v, want[k], msg=lambda m: f"{case}: {k}: {m}")
    if topo.dp_rank == 0 and topo.tp_rank == 0:      # the stages' keys make up the model's, each once
        assert topo.pp_world.allgather_floats([len(mine)]).sum() == len(want)
    if pipe.is_last:
        torch.testing.assert_close(losses, want_losses)
    else:
        assert losses == [None] * STEPS


TP_DIMS = (16, 8, 2, 2, 16)   # vocabulary (a multiple of tp), context, blocks, heads, width


def twin() -> ReferenceGPT:
    """The single-process GPT (float64, seed 0) that mpipar's tensor-parallel GPT is sharded from."""
    torch.manual_seed(0)
    return ReferenceGPT(*TP_DIMS).double()


@pytest.mark.mpi(min_size=4)
def test_the_tensor_parallel_gpt_on_pp_dp_tp_equals_single_process(world):
    """pp=2 x tp=2 (4 ranks) and pp=2 x dp=2 x tp=2 (8): GPT's TPTransformerBlocks, vocabulary-parallel
    embedding and tied column-parallel head stay whole in the trace; every parameter (gathered over
    tp, the tied one under both names) and every reported loss equal the twin's single-process
    training, and each shard of the tied weight is bit-identical on its two stages (and replicas)
    after every step."""
    topo = mpipar.init(grid="pp=2,tp=2" if world.size == 4 else "pp=2,dp=2,tp=2", stall_timeout=0, world=world)
    group = TPGroup(topo.tp_world)
    model = shard_layer(GPT(*TP_DIMS, group=group).double(), twin(), group)      # this rank's shard
    pipe = mpipar.Pipeline(model, topo, loss_fn=lm_loss, schedule="1f1b", microbatches=2, split=["blocks.1"])
    opt = adam(pipe.parameters())
    holds = any(q is model.tok_emb.weight for q in pipe.parameters())
    where = world.allgather_floats([holds, topo.tp_rank])
    holders = [[r for r in range(world.size) if where[r, 0] and where[r, 1] == t] for t in range(2)]
    D = topo.grid.dp
    assert [len(h) for h in holders] == [2 * D, 2 * D], holders   # per tp shard: first and last stage, each replica
    losses, d = [], topo.dp_rank
    for step in range(STEPS):
        x, y = batch(step)
        opt.zero_grad()
        pipe.step(x.tensor_split(D)[d], y.tensor_split(D)[d])
        opt.step()
        losses.append(pipe.global_loss())
        check_tie(world, model.tok_emb.weight, holders, f"step {step}")
    ref = twin()
    want_losses = train_single(ref, adam, STEPS)
    want, mine = ref.state_dict(), pipe.state_dict()
    assert mine and set(mine) <= set(want) and "tok_emb.weight" in want and "head.weight" in want, sorted(mine)
    for k, v in mine.items():
        torch.testing.assert_close(v, want[k], msg=lambda m: f"{k}: {m}")
    assert topo.pp_world.allgather_floats([len(mine)]).sum() == len(want)
    if pipe.is_last:
        torch.testing.assert_close(losses, want_losses)
    else:
        assert losses == [None] * STEPS


@pytest.mark.mpi(min_size=4)
def test_zero_with_a_parameter_tied_across_stages_is_refused_on_every_rank(world):
    topo = mpipar.init(grid=f"pp=2,dp={world.size // 2}", stall_timeout=0, world=world)
    with pytest.raises(ConfigError, match=r"--zero 1 shards gradients .* GPT has a parameter that units on several "
                                          r"pipeline ranks use \(tied weights\).*use zero=0 with it") as e:
        mpipar.Pipeline(gpt(), topo, loss_fn=lm_loss, data_parallel=mpipar.DataParallelOptions(zero=1))
    assert "\n" not in str(e.value)


def test_the_global_norm_counts_a_tied_parameter_once(world):
    """The clip's norm over every stage (train/clip.py) equals clip_grad_norm_ on the model, where
    the tied weight is one parameter (the holders' bit-identical copies count once)."""
    from mpipar.train.clip import clip_global_norm
    topo = mpipar.init(grid=f"pp={world.size}", stall_timeout=0, world=world)
    model, ref = gpt(), gpt()
    pipe = mpipar.Pipeline(model, topo, loss_fn=lm_loss, microbatches=2)
    x, y = batch(0)
    pipe.step(x, y)
    got = clip_global_norm(pipe.parameters(), 0.5, topo.pp_world, order=pipe.parameter_order())
    lm_loss(ref(x), y).backward()
    want = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5))
    torch.testing.assert_close(got, want)
    for k, v in pipe.state_dict().items():          # gradients clipped alike: one SGD step lands alike
        q = dict(model.named_parameters()).get(k)
        if q is not None:
            torch.testing.assert_close(q.grad, dict(ref.named_parameters())[k].grad, msg=k)
