"""Bad command lines refused before training with one line that says what to change: each case
parses and runs a command line as `python -m mpipar.run` does, on this job's World, and every
rank must raise the same one-line error (ranks that agree on the refusal never wait on each
other). That such an error ends a real job with that line, once, is what tests/test_run.py's
launches show (a representative of each way a job ends: one rank raising, every rank raising,
a wrong shape between ranks, a missing example or dataset, a failed profile, no GPU). The last
case: ranks that fail alike agree on who prints the one line (mpipar.comm.failure.Notes)."""
import time
from pathlib import Path

import pytest

from mpipar.app.run import parse
from mpipar.app.session import run_example
from mpipar.errors import MpiparError
import job

NP = (2, 4)
TIMEOUT = 240
STALL_TIMEOUT = 30


ROOT = Path(__file__).resolve().parents[2]
BAD = {   # name: (ranks, argv, what the line says)
    "gap": (4, ["mlp", "--balance", "2,2,2,1"], "RankMapError: --balance 2,2,2,1 covers 7 of the model's 8 layers"),
    "overlap": (2, ["mlp", "--balance", str(ROOT / "tests/fixtures/overlap.json")], "(overlap)"),
    "empty stage": (4, ["mlp", "--balance", "4,0,2,2"], "stage 1 has no layers"),
    "more stages than layers": (4, [str(ROOT / "tests/fixtures/bad_shapes.py")],
                                "4 pipeline stages but the model has only 2"),
    "tp without tensor-parallel layers": (4, ["split-cnn", "--grid", "pp=2,tp=2"],
                                          "ConfigError: --grid pp=2,tp=2: example split-cnn has no tensor-parallel "
                                          "layers, so tp must be 1"),
    "no epochs": (2, ["mlp", "--epochs", "0"], "ConfigError: epochs=0: must be an integer >= 1"),
    "negative batch": (2, ["mlp", "--batch-size", "-8"], "ConfigError: batch_size=-8: must be an integer >= 1"),
    "negative steps": (2, ["mlp", "--steps", "-1"], "ConfigError: steps=-1: must be an integer >= 0"),
    "micro-batches of one graph": (2, ["pipeline-gcn-cora", "--microbatches", "5"],   # 4 sub-graphs per batch
                                   "ConfigError: --microbatches 5: a batch holds 4 sample(s) per data-parallel "
                                   "replica here"),
    "rank map does not fit": (2, ["mlp", "--schedule", "interleaved", "--microbatches", "2", "--balance", "4,4"],
                              "RankMapError: --balance 4,4 gives 2 stages, but --schedule interleaved with 2 "
                              "chunks per rank on pp=2 needs"),
    "too few micro-batches": (2, ["mlp", "--schedule", "pipedream", "--microbatches", "1"],
                              "ConfigError: schedule pipedream: needs at least p=2 micro-batches per step (got 1)"),
    "heads indivisible by tp": (2, ["tp-transformer", "--heads", "3", "--d-model", "48"],   # (ColumnParallelLinear's:
                                "ConfigError: ParallelSelfAttention num_heads is 3, not divisible by the "   # cases_tensor)
                                "tensor-parallel size tp=2"),
}


@pytest.mark.parametrize("name", [k for k, (n, _, _) in BAD.items() if n == job.size()])
def test_refused_with_one_line(world, name, mpi_tmp_path):
    _, argv, needle = BAD[name]
    with pytest.raises(MpiparError) as e:
        args, example = parse([*argv, "--out", str(mpi_tmp_path / "out")])
        run_example(world, example, args)
    line = f"{type(e.value).__name__}: {e.value}"
    assert needle in line and "\n" not in line, line


@pytest.mark.parametrize("failing", ["every rank", "the upper half"])
def test_ranks_failing_alike_print_one_line(world, failing):
    """failure.Notes over MPI, as report_and_abort uses them (without the abort): of the ranks that
    fail alike, the lowest prints, naming the others, and the others stay quiet; every note
    arrives (drained here, so the communicator is freed empty)."""
    from mpipar.comm import failure
    ranks = list(range(world.size) if failing == "every rank" else range(world.size // 2, world.size))
    comm = world.comm.Dup()
    notes = failure.Notes(comm.Get_rank(), comm)
    if world.rank in ranks:
        got = notes.decide(7, hold=0.5)
        if got[0]:
            notes.tell(notes.REPORTED, 7)
        assert got == ((True, ranks[1:]) if world.rank == ranks[0] else (False, [])), got
    expected = {r: (notes.REPORTED if r == ranks[0] else notes.FAILED, 7) for r in ranks if r != world.rank}
    deadline = time.monotonic() + 20
    while any(notes.heard.get(r) != note for r, note in expected.items()) and time.monotonic() < deadline:
        notes.listen()
        time.sleep(0.01)
    assert {r: notes.heard.get(r) for r in expected} == expected
    for _, request in notes.sent:
        request.Wait()
    comm.Free()
