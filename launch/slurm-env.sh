# Sourced by launch/*.sbatch: the job's Python, the MPI settings, and `mpipar_launch`, so every
# batch script starts ranks the same way.  Knobs (environment, or sbatch --export=ALL,NAME=value):
#   MPIPAR_LAUNCHER=mpirun|srun  mpirun (default; works with the bundled PyPI Open MPI and any
#                                Open MPI >= 4) or srun --mpi=pmix (needs SLURM's PMIx plugin)
#   MPIPAR_NP=N                  ranks (default: the allocation's $SLURM_NTASKS)
#   MPIPAR_PYTHON=/path/python   interpreter with mpipar installed (default: ROOT/.venv, else python3)
#   MPIPAR_IFACE=eth0|10.1.0.0/16  restrict MPI's TCP traffic to this interface or subnet
#   MPIPAR_DRY_RUN=1             print the launch command instead of running it
# Expects ROOT (the mpipar checkout), set by the sourcing script.

if [ -z "${MPIPAR_PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then MPIPAR_PYTHON=$ROOT/.venv/bin/python; else MPIPAR_PYTHON=python3; fi
fi
# mpirun must be the one matching the Python's mpi4py: put the venv's bin (bundled Open MPI) first.
PATH=$(dirname "$(command -v "$MPIPAR_PYTHON")"):$PATH
export PATH

# Open MPI on oversubscribed nodes (more ranks than cores, as in tests or small allocations):
export OMPI_MCA_mpi_yield_when_idle=1             # idle ranks yield the core instead of spinning
export OMPI_MCA_rmaps_base_oversubscribe=1        # allow more ranks than slots (mpirun --oversubscribe)
export OMPI_MCA_hwloc_base_binding_policy=none    # no binding: SLURM/cgroups already place the job
export PRTE_MCA_prte_silence_shared_fs=1
if [ "$(id -u)" = 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
if [ -n "${MPIPAR_IFACE:-}" ]; then
  export OMPI_MCA_btl_tcp_if_include=$MPIPAR_IFACE OMPI_MCA_oob_tcp_if_include=$MPIPAR_IFACE
fi

MPIPAR_NP=${MPIPAR_NP:-${SLURM_NTASKS:-4}}

# mpipar_launch EXAMPLE [FLAGS...]: start the job's ranks on `python -m mpipar.run EXAMPLE FLAGS`.
mpipar_launch() {
  local np=$MPIPAR_NP launcher=${MPIPAR_LAUNCHER:-mpirun} cmd
  case "$launcher" in
    mpirun) cmd=(mpirun -np "$np" --oversubscribe --bind-to none) ;;
    srun)   cmd=(srun --mpi=pmix -n "$np" --kill-on-bad-exit=1)
            [ "$np" -gt "${SLURM_NTASKS:-$np}" ] && cmd+=(--overcommit) ;;
    *)      echo "MPIPAR_LAUNCHER=$launcher: use mpirun or srun" >&2; return 2 ;;
  esac
  cmd+=("$MPIPAR_PYTHON" -m mpipar.run "$@")
  echo "mpipar job ${SLURM_JOB_ID:-?}: $np ranks on ${SLURM_JOB_NODELIST:-$(hostname)} via $launcher: ${cmd[*]}"
  if [ -n "${MPIPAR_DRY_RUN:-}" ]; then return 0; fi
  "${cmd[@]}"
}
