"""The public-API training runs of tests/mpi/cases_api.py, each as a user writes it (init,
Pipeline, make_optimizer, batches or Trainer, state_dict), and the single-process training of the
same model, seed and batches it is compared with. The model and data live here so both sides
build exactly the same ones."""
from contextlib import nullcontext

import torch
from torch import nn

import mpipar
from mpipar.tensor import ColumnParallelLinear, RowParallelLinear, TPGroup, load_full_state_dict

CASES = {   # name: (ranks, grid, schedule, microbatches, chunks, batch, data kind)
    "one-rank": (1, None, "gpipe", 3, None, 30, "tensors"),
    "dp2-uneven": (2, "dp=2", "gpipe", 1, None, 31, "tensors"),
    "gpipe": (4, None, "gpipe", 4, None, 40, "tensors"),
    "1f1b": (4, None, "1f1b", 4, None, 30, "tensors"),
    "interleaved": (4, None, "interleaved", 8, 2, 40, "tensors"),
    "zb": (4, None, "zb", 4, None, 30, "tensors"),
    "pipedream": (4, None, "pipedream", 4, None, 32, "trainer"),
    "pp2xdp2-dataset": (4, "pp=2,dp=2", "1f1b", 2, None, 31, "dataset"),
    "pp2xdp2xtp2-user-tp": (8, "pp=2,dp=2,tp=2", "1f1b", 2, None, 30, "tensors"),
    "pp2xdp2-zero3": (4, "pp=2,dp=2", "1f1b", 2, None, 31, "tensors"),
}
N, STEPS_EPOCHS, LR = 150, 2, 0.05


def reference_model() -> nn.Sequential:
    """Eight children with parameters, so interleaving can cut it into p*v = 8 stages."""
    torch.manual_seed(0)
    dims = [16, 32, 32, 32, 32, 32, 32, 32, 4]
    last = len(dims) - 2
    return nn.Sequential(*[nn.Linear(a, b) if i == last else nn.Sequential(nn.Linear(a, b), nn.Tanh())
                           for i, (a, b) in enumerate(zip(dims, dims[1:]))])


class TPPair(nn.Module):
    """A user's own tensor-parallel block: column-parallel, tanh, row-parallel (one all-reduce)."""

    def __init__(self, group, width=32, hidden=64):
        super().__init__()
        self.up, self.down = ColumnParallelLinear(width, hidden, group), RowParallelLinear(hidden, width, group)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def tp_reference_model() -> nn.Sequential:
    torch.manual_seed(0)
    pair = nn.Module()
    pair.up, pair.down = nn.Linear(32, 64), nn.Linear(64, 32)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), _Pair(pair), nn.Tanh(), nn.Linear(32, 4))


class _Pair(nn.Module):
    """TPPair's single-device twin (same state-dict names: up.*, down.*)."""

    def __init__(self, pair):
        super().__init__()
        self.up, self.down = pair.up, pair.down

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, 16, generator=g), torch.randn(N, 4, generator=g)


class PairsDataset(torch.utils.data.Dataset):
    """A map-style Dataset that is not a TensorDataset (goes through a DataLoader with workers)."""

    def __init__(self):
        self.x, self.y = data()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def user_model(topo, case):
    if case.endswith("user-tp"):
        ref = tp_reference_model()
        pair = TPPair(TPGroup(topo.tp_world))
        load_full_state_dict(pair, ref[2].state_dict(), pair.up.group)
        ref[2] = pair
        return ref
    return reference_model()


def train(case: str, world) -> dict:
    """The case trained through the public API on `world`; this rank's layers' final parameters
    under single-process names (tp shards gathered; ZeRO stage 3: gathered over the replicas)."""
    ranks, grid, schedule, m, chunks, batch, kind = CASES[case]
    topo = mpipar.init(grid=grid, stall_timeout=0, world=world)   # the harness's watchdog is running
    if topo.world.size != ranks:
        raise SystemExit(f"case {case} runs on {ranks} ranks, not {topo.world.size}")
    zero = 3 if case.endswith("zero3") else 0     # parameters, gradients, optimizer state sharded over dp
    pipe = mpipar.Pipeline(user_model(topo, case), topo, schedule=schedule, microbatches=m, chunks=chunks,
                           loss_fn=nn.MSELoss(), balance="layers", data_parallel=mpipar.DataParallelOptions(zero=zero))
    opt = pipe.make_optimizer(torch.optim.SGD, lr=LR)
    if kind == "trainer":   # 2BW updates inside its lists: the Trainer drives it
        cfg = mpipar.TrainConfig(epochs=STEPS_EPOCHS, batch_size=batch, seed=0, task="regression")
        x, y = data()
        mpipar.Trainer(pipe, opt, cfg, log=lambda *a, **k: None).fit((x, y), (x[:8], y[:8]))
    else:
        source = PairsDataset() if kind == "dataset" else torch.utils.data.TensorDataset(*data())
        workers = 2 if kind == "dataset" else 0
        for epoch in range(STEPS_EPOCHS):
            for xb, yb in mpipar.batches(source, batch, topo, epoch=epoch, num_workers=workers):
                opt.zero_grad()
                pipe.step(xb, yb)
                opt.step()
    with opt.gathered() if zero else nullcontext():    # ZeRO stage 3: the parameters whole (collective)
        state = {k: v.clone() for k, v in pipe.state_dict().items()}   # tp > 1: a collective over tp
    pipe.close()
    return state


def reference(case: str) -> dict:
    """Single-process training: whole batches in the order mpipar.batches walks them."""
    from mpipar.train.batches import epoch_batches
    from mpipar.train.reference import train_reference
    from mpipar.train.trainer import TrainConfig
    _, _, schedule, _, _, batch, _ = CASES[case]
    model = tp_reference_model() if case.endswith("user-tp") else reference_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = data()
    if schedule == "pipedream":   # the 2BW rule, the oracle of train/reference.py
        cfg = TrainConfig(epochs=STEPS_EPOCHS, batch_size=batch, seed=0, task="regression")
        split = type("S", (), {"x": x, "y": y})
        return train_reference(model, nn.MSELoss(), opt, split, cfg, two_bw=True).state_dict()
    for epoch in range(STEPS_EPOCHS):
        for idx in epoch_batches(len(x), batch, 0, epoch):
            opt.zero_grad()
            nn.functional.mse_loss(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.state_dict()


def check(case: str, world) -> None:
    """The case trained on `world` equals single-process training on this rank (assert_close),
    and the ranks together hold every layer."""
    import torch.testing
    got, want = train(case, world), reference(case)
    assert set(got) <= set(want) and got, (sorted(got), sorted(want))
    for k, v in got.items():
        torch.testing.assert_close(v, want[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{case} rank {world.rank}: {k}: {m}")
    names = world.comm.allgather(sorted(got))
    assert set().union(*map(set, names)) == set(want), (names, sorted(want))
