#!/usr/bin/env bash
# Run an example on this machine with oversubscribed ranks, under the MPI of the set-up's venv
# (mpipar.launcher builds the command and the yield-when-idle settings for Open MPI, MPICH or Intel MPI):
#   bash launch/local.sh EXAMPLE [-np N] [flags...]       (default 4 ranks)
#   MPIPAR_VENV=.venv-mpich bash launch/local.sh mlp      (the MPICH set-up: MPIPAR_MPI=mpich launch/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MPIPAR_VENV:-.venv}
[ -x "$VENV/bin/python" ] || { echo "launch/local.sh: no $VENV/bin/python: run bash launch/setup.sh first" >&2; exit 2; }
NP=4
if [ "${2:-}" = "-np" ]; then NP=$3; set -- "$1" "${@:4}"; fi
exec "$VENV/bin/python" -m mpipar.launcher --np "$NP" -- -m mpipar.run "$@"
