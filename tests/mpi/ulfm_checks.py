"""ULFM on 4 ranks (mpirun --with-ft ulfm): data-parallel training of the mlp example survives
rank 2 being SIGKILLed at step 5 without a relaunch, finishes on 3 ranks, and ends with the
parameters of single-process training (up to float summation order).
usage: mpirun --with-ft ulfm -np 4 python tests/mpi/ulfm_checks.py TMPDIR"""
import sys
from pathlib import Path

import torch

from mpipar.checkpoint import fault
from mpipar.train.survive import SurvivingDataParallel
from mpipar.comm import World, failure, ulfm
from mpipar.app.run import parse
from mpipar.model import build_full
from mpipar.app.session import reference_model, train_config

torch.set_num_threads(1)
world = World()
failure.install(world.host)
if not ulfm.enabled():   # explicit checks: they hold under python -O too
    raise AssertionError(ulfm.status())
args, example = parse(["mlp", "--epochs", "2", "--steps", "8", "--log-level", "quiet"])
specs = example.layers(args)
train, _ = example.data(args)
faults = [fault.Fault(2, 5)]
model = build_full(specs, args.seed)
dp = SurvivingDataParallel(world, model, example.optimizer(model.parameters(), args), example.loss(),
                           train_config(example, args), faults, fault.FaultPlan(faults, Path(sys.argv[1]), world.rank),
                           log=lambda *a, **k: None)
dp.fit(train)
if not (dp.world.size == 3 and dp.lost == [2] and dp.redone == 1):
    raise AssertionError((dp.world.size, dp.lost, dp.redone))
ref = reference_model(example, specs, train, args).state_dict()
for k, v in dp.model.state_dict().items():
    torch.testing.assert_close(v, ref[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"rank {world.rank}: {k}: {m}")
if dp.world.rank == 0:
    print(f"ulfm checks: passed on {dp.world.size} survivors (lost rank {dp.lost})", flush=True)
