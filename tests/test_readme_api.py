"""The README's "Your own model" scripts, run as written under mpirun from a directory outside
the checkout, each compared with single-process training of the same model, seed and batches
(torch.testing.assert_close); the checkpoint script is also interrupted and resumed. The three
4-rank scripts run one after the other in one job (each in its own folder, as its own __main__):
a job's start, 4 imports of torch, costs more than such a script; so do the checkpoint script's
uninterrupted run and the run it is interrupted in (the resume is a job of its own)."""
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from mpirun import ROOT, mpirun

pytestmark = pytest.mark.timeout(200)


def snippets() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Your own model"):]
    section = section[:section.index("\n## ", 1)]
    found = {}
    for block in re.findall(r"```python\n(.*?)```", section, re.S):
        m = re.match(r"# your-own: (\S+)\n", block)
        if m:
            found[m.group(1)] = block
    return found


SNIPPETS = snippets()


def run_snippet(name: str, np: int, cwd: Path, *argv: str):
    (cwd / name).write_text(SNIPPETS[name])
    p = mpirun(np, name, *argv, cwd=cwd, timeout=150)
    assert p.returncode == 0, f"{name} on {np} ranks failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p


RUN_IN_TURN = """import contextlib, os, runpy, shlex, sys
for line in sys.argv[1:]:                  # each script in its folder, as `python script.py ARGS` runs it
    sys.argv = shlex.split(line)
    os.chdir(os.path.dirname(sys.argv[0]))
    with open(f"stdout-{os.getpid()}.txt", "w") as out, contextlib.redirect_stdout(out):
        runpy.run_path(sys.argv[0], run_name="__main__")
"""
FOUR_RANKS = ("pipeline_1f1b.py", "data_parallel.py", "pipeline_x_dp.py", "transformer.py")


def in_turn(np: int, root: Path, *lines: str):
    """`python SCRIPT ARGS` for each line, one after the other in ONE job (each in its script's
    folder, as its own __main__; what it printed in stdout-PID.txt there)."""
    (root / "run_in_turn.py").write_text(RUN_IN_TURN)
    p = mpirun(np, str(root / "run_in_turn.py"), *lines, cwd=root, timeout=240)
    assert p.returncode == 0, f"{lines} failed on {np} ranks:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"


@pytest.fixture(scope="module")
def four_rank_runs(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """The 4-rank scripts run in turn in one job: {name: (its folder, what it printed)}."""
    root = tmp_path_factory.mktemp("readme")
    paths = []
    for name in FOUR_RANKS:
        (root / name[:-3]).mkdir()
        paths.append(root / name[:-3] / name)
        paths[-1].write_text(SNIPPETS[name])
    in_turn(4, root, *map(str, paths))
    return {name: (path.parent, "".join(f.read_text() for f in sorted(path.parent.glob("stdout-*.txt"))))
            for name, path in zip(FOUR_RANKS, paths)}


def merged(cwd: Path, stages: int) -> dict:
    out = {}
    for s in range(stages):
        out.update(torch.load(cwd / f"stage{s}.pt", weights_only=True))
    return out


def dataset(n: int):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 16, generator=g), torch.randn(n, 4, generator=g)


def reference(model, opt, x, y, batch: int, epochs: int):
    """Single-process training on the batches mpipar.batches walks (same seed 0 permutation)."""
    from mpipar.train.batches import epoch_batches
    losses = []
    for epoch in range(epochs):
        for idx in epoch_batches(len(x), batch, 0, epoch):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    return model.state_dict(), losses


def check_params(got: dict, want: dict):
    assert set(got) == set(want)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, msg=lambda m: f"{k}: {m}")


def test_readme_has_the_five_scripts_each_at_most_25_lines_and_the_transformer_30():
    assert set(SNIPPETS) == {"pipeline_1f1b.py", "data_parallel.py", "pipeline_x_dp.py", "checkpoint_resume.py",
                             "transformer.py"}
    for name, code in SNIPPETS.items():
        assert len(code.strip().splitlines()) <= (30 if name == "transformer.py" else 25), name


def test_pipeline_1f1b_on_4_ranks_equals_single_process(four_rank_runs):
    folder, printed_text = four_rank_runs["pipeline_1f1b.py"]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    want, losses = reference(model, torch.optim.SGD(model.parameters(), lr=0.05), *dataset(512), 64, 2)
    printed = [float(v) for v in re.findall(r"^loss (\S+)$", printed_text, re.M)]
    assert len(printed) == len(losses) == 16
    torch.testing.assert_close(torch.tensor(printed), torch.tensor(losses), rtol=1e-5, atol=1e-7)
    check_params(merged(folder, 4), want)


def test_data_parallel_in_a_user_loop_equals_single_process(four_rank_runs):
    """The optimizer wrapper syncs, and each epoch's short last batch (42 = 11/11/10/10 over 4
    ranks) is weighed by its shares: the same weights as one process."""
    folder = four_rank_runs["data_parallel.py"][0]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    want, _ = reference(model, torch.optim.SGD(model.parameters(), lr=0.05), *dataset(490), 64, 2)
    check_params(torch.load(folder / "model.pt", weights_only=True), want)


def test_pipeline_x_data_parallel_with_a_short_last_batch_equals_single_process(four_rank_runs):
    folder = four_rank_runs["pipeline_x_dp.py"][0]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    want, _ = reference(model, torch.optim.Adam(model.parameters(), lr=1e-3), *dataset(480), 64, 2)
    check_params(merged(folder, 2), want)


def test_checkpoint_resume_in_a_user_loop_is_bit_identical(tmp_path):
    name = "checkpoint_resume.py"
    whole, split = tmp_path / "whole", tmp_path / "split"
    for folder in (whole, split):
        folder.mkdir()
        (folder / name).write_text(SNIPPETS[name])
    in_turn(2, tmp_path, f"{whole / name} 17", f"{split / name} 12")   # the second checkpoints at 5 and 10
    assert sorted(p.name for p in (split / "ckpt").glob("step-*")) == ["step-000000005", "step-000000010"]
    again = run_snippet(name, 2, split, "17")                            # a job of its own resumes at 10, not 12
    assert "resumed from step-000000010" in again.stdout, again.stdout
    got, full = merged(split, 2), merged(whole, 2)
    for k, v in full.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(17):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(32, 16, generator=g), torch.randn(32, 4, generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    check_params(full, model.state_dict())


def test_your_own_transformer_split_over_4_ranks_equals_single_process(four_rank_runs):
    """The user's GPT module (not a Sequential), cut at its blocks over 4 ranks, with its head tied
    to the embedding: every parameter (the tied one from both stages that hold it) and the last
    loss as one process trains the same module on the same batches."""
    folder, printed_text = four_rank_runs["transformer.py"]
    code = SNIPPETS["transformer.py"]
    scope = {}
    exec(compile(code[:code.index("torch.manual_seed(0)")], "transformer.py", "exec"), scope)   # the user's class
    torch.manual_seed(0)
    model = scope["GPT"]()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for seq in (torch.arange(40 * 16 * 33) * 7 % 32).view(40, 16, 33):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(seq[:, :-1]).flatten(0, 1), seq[:, 1:].flatten())
        loss.backward()
        opt.step()
    printed = [float(v) for v in re.findall(r"^stage 3: loss (\S+)$", printed_text, re.M)]
    assert len(printed) == 1
    torch.testing.assert_close(printed[0], float(loss.detach()))
    stages = [torch.load(folder / f"stage{s}.pt", weights_only=True) for s in range(4)]
    torch.testing.assert_close(stages[0]["tok.weight"], stages[3]["tok.weight"], rtol=0, atol=0)   # one parameter
    check_params(merged(folder, 4), model.state_dict())
