#!/usr/bin/env bash
# Run an example on this machine with oversubscribed ranks:
#   bash launch/local.sh EXAMPLE [-np N] [flags...]     (default 4 ranks)
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
NP=4
if [ "${2:-}" = "-np" ]; then NP=$3; set -- "$1" "${@:4}"; fi
export OMPI_MCA_mpi_yield_when_idle=1          # idle ranks yield the core (else ~500x slower)
export OMPI_MCA_hwloc_base_binding_policy=none
[ "$(id -u)" = 0 ] && export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
exec mpirun -np "$NP" --oversubscribe --bind-to none python -m mpipar.run "$@"
