"""transformer-split on 2 and 4 ranks against single-process training, in one mpirun job per rank
count: each case parses the command line as `python -m mpipar.run` does and runs it on this job's
World, then rank 0 gathers the stages' saved parameters and compares them with the same model
trained in one process (plain with micro-batches and greedy samples, clipped by the global norm
over 4 stages, bf16) and checks what the run printed. (Moved from tests/test_transformer_split.py;
the pipeline loss scaler across stages: tests/mpi/cases_transformer_split.py.)"""
import pytest
import torch

from mpipar.app.run import parse
from mpipar.app.session import reference_model
import job

NP = (2, 4)
TIMEOUT = 240
QUICK = {2: ("test_equals_single_process",)}

torch.set_num_threads(1)
SMALL = ["--max-number", "999", "--batch-size", "32", "--epochs", "1", "--steps", "20", "--d-model", "32",
         "--ff", "64"]


def pipeline_params(world, tmp, argv):
    """Run argv on `world` saving every stage's parameters; on rank 0 return (the stages' parameters,
    what the run printed), on the other ranks None."""
    save = tmp / "params"
    printed = job.run(world, [*argv, "--save-params", str(save), "--out", str(tmp / "out")])
    if world.rank != 0:
        return None
    got = {}
    for f in sorted(save.glob("stage*.pt")):
        got.update(torch.load(f, weights_only=True))
    return got, printed


def reference_params(argv, **override):
    args, example = parse(argv)
    vars(args).update(override)
    train, _ = example.data(args)
    return reference_model(example, example.layers(args), train, args).state_dict()


def assert_same(got, ref):
    assert sorted(got) == sorted(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], msg=lambda m: f"{k}: {m}")


def two_stage_parity_with_microbatches_and_greedy_samples(world, tmp):
    argv = ["transformer-split", *SMALL, "--amp", "off", "--clip-grad", "0", "--microbatches", "2",
            "--samples", "3", "--balance", "6,6"]
    ran = pipeline_params(world, tmp, argv)   # 20 steps
    if ran is None:
        return
    got, out = ran
    assert_same(got, reference_params(argv))
    assert "embed..dec1-attn" in out and "dec1-cross..head" in out     # a cut inside a decoder layer
    assert "greedy decoding through the pipeline: exact match" in out
    assert "; greedy exact match " in next(ln for ln in out.splitlines() if ln.startswith("summary:"))
    shown = [ln for ln in out.splitlines() if ln.startswith(("  ok ", "  BAD ")) and " -> " in ln]
    assert 3 <= len(shown) <= 6      # 3 random samples, then up to 3 more wrong ones
    assert " lr " in out


def two_stage_bf16_parity(world, tmp):
    argv = ["transformer-split", *SMALL, "--amp", "bf16", "--samples", "-1"]
    ran = pipeline_params(world, tmp, argv)
    if ran is None:
        return
    got, out = ran
    assert "amp bf16" in out
    assert_same(got, reference_params(argv))


def four_stage_clip_is_global(world, tmp):
    argv = ["transformer-split", *SMALL, "--batch-size", "16", "--amp", "off", "--clip-grad", "0.05",
            "--samples", "-1", "--balance", "3,3,3,3"]
    ran = pipeline_params(world, tmp, argv)
    if ran is None:
        return
    got, out = ran
    assert "embed..enc1-ff" in out and "dec2-cross..head" in out
    clipped = reference_params(argv)                 # torch.nn.utils.clip_grad_norm_ over the whole model
    assert_same(got, clipped)
    unclipped = reference_params(argv, clip_grad=0.0)
    assert max(float((unclipped[k] - clipped[k]).abs().max()) for k in clipped) > 1e-3   # the clip acted


CASES = {   # name: (ranks, check)
    "two-stage-microbatches-greedy": (2, two_stage_parity_with_microbatches_and_greedy_samples),
    "two-stage-bf16": (2, two_stage_bf16_parity),
    "four-stage-global-clip": (4, four_stage_clip_is_global),
}


@pytest.mark.parametrize("name", [k for k, (n, _) in CASES.items() if n == job.size()])
def test_equals_single_process(world, name, mpi_tmp_path):
    CASES[name][1](world, mpi_tmp_path / name)
