"""The public API's parity cases run in tests/mpi/cases_api.py (every schedule, uneven
micro-batches and shards, a Dataset with workers, pp x dp x tp with a user's TP module, ZeRO 3);
here, in one process: their tolerance is tight enough to catch a wrong loss weighting. And the
errors a user's script meets: one line naming the rank and the user's file:line (plain `python`
runs, no mpirun), once per job for ranks that fail alike (threads standing in for the ranks; over
MPI: tests/mpi/cases_bad_input.py)."""
import importlib.util
import os
import shlex
import socket
import subprocess
import sys
import threading
import time

import torch
from torch import nn

from mpipar.comm import failure
from mpipar.errors import ConfigError, RankMapError
from mpirun import MPI_DIR, ROOT

spec = importlib.util.spec_from_file_location("api_case", MPI_DIR / "api_case.py")
case_mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(case_mod)


def test_a_wrong_weighting_would_be_caught():
    """The cases can fail: 1/m micro-batch weights on an uneven split (30 into 4) move the
    parameters further than the tolerance above."""
    x, y = case_mod.data()
    torch.manual_seed(0)
    a, b = case_mod.reference_model(), case_mod.reference_model()
    xb, yb = x[:30], y[:30]
    nn.functional.mse_loss(a(xb), yb).backward()
    for xs, ys in zip(xb.tensor_split(4), yb.tensor_split(4)):
        (nn.functional.mse_loss(b(xs), ys) / 4).backward()
    diff = max(float((p.grad - q.grad).abs().max()) for p, q in zip(a.parameters(), b.parameters()))
    assert diff * case_mod.LR > 1e-5


# -- errors that point at the user's line (issue 29) ---------------------------------------------
# A user's script run with plain `python` (one rank, no mpirun: a subprocess, no launch): the one
# line names the rank, the user's file and line, and is the last thing printed.

def run_alone(tmp_path, source: str):
    (tmp_path / "train.py").write_text(source)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "train.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 1, (p.returncode, p.stderr[-3000:])
    return p.stderr.rstrip("\n").splitlines()


def line_of(source: str, needle: str) -> int:
    return next(i for i, text in enumerate(source.splitlines(), 1) if needle in text)


BAD_LOSS = """\
import torch
from torch import nn

import mpipar

topo = mpipar.init(grid="dp")
model = nn.Linear(8, 4)
x, y = torch.randn(16, 8), torch.randn(16, 3)      # targets of another width than the outputs
loss = nn.functional.mse_loss(model(x), y)
"""


def test_an_error_in_the_users_code_names_their_line_last(tmp_path):
    lines = run_alone(tmp_path, BAD_LOSS)
    head = f"rank 0 ({socket.gethostname()}): train.py:{line_of(BAD_LOSS, 'mse_loss')}: RuntimeError: "
    assert lines[-1].startswith(head + "The size of tensor a (4) must match the size of tensor b (3)"), lines[-12:]
    assert "mpipar.init(debug=True)" in lines[-1]                     # how to see the traceback
    assert sum("RuntimeError" in ln for ln in lines) == 1, lines[-12:]   # once, and no traceback


def test_plain_python_on_a_grid_of_four_ranks_says_launch_with_mpirun(tmp_path):
    source = 'import mpipar\n\ntopo = mpipar.init(grid="pp=2,dp=2")\n'
    lines = run_alone(tmp_path, source)
    assert lines == [f"rank 0 ({socket.gethostname()}): train.py:3: RankMapError: --grid 'pp=2,dp=2' needs "
                     f"pp*dp*tp = 2*2*1 = 4 ranks, but the job has 1; launch it with "
                     f"`mpirun -np 4 {shlex.join([sys.executable, 'train.py'])}`"], lines


USER_MODULE = """\
from mpipar.rankmap import Grid


def grid():
    return Grid.parse("pp=2,dp=2", 3)


def layer(n):
    raise ValueError(f"a shard of {n}")


def other_layer(n):
    raise ValueError(f"a shard of {n}")
"""


def raised(fn, *args):
    try:
        fn(*args)
    except Exception as e:
        return e
    raise AssertionError(f"{fn} did not raise")


def test_the_place_is_where_the_users_code_started_the_error(tmp_path, monkeypatch):
    """The last frame outside mpipar and the installed libraries, relative to the working folder;
    of a chained error, the innermost one that passed through the user's files (a layer that
    fails inside mpipar's profiling: the layer's line, not the line that called mpipar). Errors
    alike (one key) differ at most in their numbers."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "user_mod.py").write_text(USER_MODULE)
    spec = importlib.util.spec_from_file_location("user_mod", tmp_path / "user_mod.py")
    user = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(user)
    e = raised(user.grid)
    assert isinstance(e, RankMapError)
    assert failure.line(e, 2, "h").startswith("rank 2 (h): user_mod.py:5: RankMapError: --grid 'pp=2,dp=2' needs")
    wrapped = ConfigError("profiling layer 'b' failed")
    wrapped.__cause__ = raised(user.layer, 4)
    assert failure.line(wrapped, 0, "h", also=[1, 2, 3, 5]) == (f"rank 0 (h; also ranks 1-3, 5): user_mod.py:"
                                                             f"{line_of(USER_MODULE, 'raise')}: ConfigError: "
                                                             f"profiling layer 'b' failed")
    assert failure.key(raised(user.layer, 4)) == failure.key(raised(user.layer, 5))
    assert failure.key(raised(user.layer, 4)) != failure.key(raised(user.other_layer, 4))


class ThreadNotes(failure.Notes):
    """failure.Notes between threads standing in for ranks: `boxes` holds each rank's unread notes."""

    def __init__(self, rank, boxes, lock):
        super().__init__(rank)
        self.boxes, self.lock = boxes, lock

    def tell(self, kind, key):
        with self.lock:
            for q, box in enumerate(self.boxes):
                if q != self.rank:
                    box.append((self.rank, kind, key))

    def listen(self):
        with self.lock:
            got, self.boxes[self.rank][:] = list(self.boxes[self.rank]), []
        for q, kind, key in got:
            self.heard[q] = (kind, key)


def fail(n, keys, delays=None, hold=0.2, patience=0.4):
    """Ranks `keys` fail (after their delays) with an error of that key and decide whether they
    print it, as report_and_abort does (one that prints tells the others); rank -> decision."""
    boxes, lock, out = [[] for _ in range(n)], threading.Lock(), {}

    def rank(r):
        time.sleep((delays or {}).get(r, 0))
        notes = ThreadNotes(r, boxes, lock)
        out[r] = notes.decide(keys[r], hold, patience)
        if out[r][0]:
            notes.tell(notes.REPORTED, keys[r])

    threads = [threading.Thread(target=rank, args=(r,)) for r in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_ranks_failing_alike_print_one_line():
    """The lowest of the ranks that fail alike prints, naming the others; a rank that fails after
    a report stays quiet; different errors are each printed; a lower rank that never reports
    (stuck) is waited for only so long."""
    every = {0: (True, [1, 2, 3]), 1: (False, []), 2: (False, []), 3: (False, [])}
    assert fail(4, {0: 7, 1: 7, 2: 7, 3: 7}, delays={0: 0.05}) == every              # rank 0 a little late
    assert fail(4, {2: 7, 3: 7}) == {2: (True, [3]), 3: (False, [])}               # the last stage's replicas
    assert fail(4, {1: 7, 0: 7}, delays={0: 0.6}) == {1: (True, []), 0: (False, [])}  # after rank 1's report
    assert fail(4, {0: 7, 1: 8}) == {0: (True, []), 1: (True, [])}                  # two different errors
    boxes, lock = [[], []], threading.Lock()
    ThreadNotes(0, boxes, lock).tell(failure.Notes.FAILED, 7)                       # rank 0 failed, then hung
    t0 = time.monotonic()
    assert ThreadNotes(1, boxes, lock).decide(7, 0.2, 0.4) == (True, [0])
    assert time.monotonic() - t0 >= 0.6
