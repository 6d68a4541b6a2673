# Sourced by launch/*.sbatch: the job's Python, the MPI settings, and `mpipar_launch`, so every
# batch script starts ranks the same way.  Knobs (environment, or sbatch --export=ALL,NAME=value):
#   MPIPAR_LAUNCHER=mpirun|srun  mpirun (default: the MPI's own launcher, Open MPI's mpirun or
#                                MPICH's / Intel MPI's mpiexec, as mpipar.launcher detects it) or
#                                srun --mpi=$MPIPAR_PMI (pmix by default; MPICH builds may want pmi2)
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

# The MPI's own settings for oversubscribed nodes (yield when idle, no binding; as root, Open MPI's
# permission) and MPIPAR_IFACE, as mpipar.launcher gives them for the MPI this Python uses.
while IFS= read -r line; do [ -n "$line" ] && export "$line"; done < <(
  "$MPIPAR_PYTHON" -c 'import os, sys
from mpipar.launcher import find
for k, v in find().environment(True, os.environ.get("MPIPAR_IFACE") or None).items():
    if k not in os.environ: print(f"{k}={v}")')

MPIPAR_NP=${MPIPAR_NP:-${SLURM_NTASKS:-4}}

# mpipar_launch EXAMPLE [FLAGS...]: start the job's ranks on `python -m mpipar.run EXAMPLE FLAGS`.
mpipar_launch() {
  local np=$MPIPAR_NP launcher=${MPIPAR_LAUNCHER:-mpirun} cmd
  case "$launcher" in
    mpirun) mapfile -t cmd < <("$MPIPAR_PYTHON" -c 'import sys
from mpipar.launcher import find
print("\n".join(find().command(int(sys.argv[1]), sys.argv[2:], python=sys.executable)))' "$np" -m mpipar.run "$@") ;;
    srun)   cmd=(srun "--mpi=${MPIPAR_PMI:-pmix}" -n "$np" --kill-on-bad-exit=1)
            [ "$np" -gt "${SLURM_NTASKS:-$np}" ] && cmd+=(--overcommit)
            cmd+=("$MPIPAR_PYTHON" -m mpipar.run "$@") ;;
    *)      echo "MPIPAR_LAUNCHER=$launcher: use mpirun or srun" >&2; return 2 ;;
  esac
  [ "${#cmd[@]}" -gt 0 ] || return 2   # mpipar.launcher printed why
  echo "mpipar job ${SLURM_JOB_ID:-?}: $np ranks on ${SLURM_JOB_NODELIST:-$(hostname)} via $launcher: ${cmd[*]}"
  if [ -n "${MPIPAR_DRY_RUN:-}" ]; then return 0; fi
  mpipar_preemptible "${cmd[@]}"
}

# mpipar_preemptible CMD...: run CMD (mpirun, srun or the supervisor) so that a preemption saves
# the work. `#SBATCH --signal=B:USR1@120` sends USR1 to this batch shell alone, 120 s before the
# time limit (scancel --signal=USR1 --batch, or TERM at a preemption, likewise); bash runs a trap
# only after its foreground child ends, so CMD runs in the background and the trap passes USR1
# on: the MPI's launcher, srun and the supervisor hand it to every rank, which write a
# checkpoint and exit 75 (PREEMPTED). Then the job is requeued, as --requeue jobs expect, and
# resumes from that checkpoint (without --checkpoint-dir nothing was saved: it is not requeued,
# as it would start again from step 0, each time). USR1, never TERM: Open MPI's mpirun SIGKILLs
# the ranks ~0.25 s after a SIGTERM (measured; no MCA parameter changes it), too soon to finish a
# step. The SIGTERM that SLURM itself sends to every process of the job (at the time limit, or at
# a preemption with a grace time) reaches mpirun too: under Open MPI only the supervisor
# (fault-tolerant.sbatch), which starts mpirun with SIGTERM blocked, saves the ranks on its host
# then; hence the warning, 120 s early. MPICH's mpiexec forwards SIGTERM and waits for the ranks.
MPIPAR_PREEMPTED_EXIT=75   # mpipar.train.survive.PREEMPTED_EXIT
mpipar_preemptible() {
  local pid rc=0 got trapped=0
  "$@" &
  pid=$!
  trap 'trapped=1; kill -USR1 "$pid" 2>/dev/null || true' USR1 TERM
  while :; do   # a trap ends `wait` early: wait again, for CMD's own status
    trapped=0 got=0
    wait "$pid" || got=$?
    if [ "$got" -eq 127 ]; then break; fi   # CMD's status was already taken (the trap came after it)
    rc=$got
    if [ "$trapped" = 0 ]; then break; fi
  done
  trap - USR1 TERM
  if [ "$rc" -eq "$MPIPAR_PREEMPTED_EXIT" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    case " $* " in
      *" --checkpoint-dir"*)
        echo "mpipar job $SLURM_JOB_ID: preempted; its checkpoint is written: requeueing it (scontrol requeue)"
        scontrol requeue "$SLURM_JOB_ID" ||
          echo "mpipar: scontrol requeue $SLURM_JOB_ID failed (a --no-requeue job?): submit it again to resume" >&2 ;;
      *) echo "mpipar job $SLURM_JOB_ID: preempted without --checkpoint-dir (nothing saved): not requeued" >&2 ;;
    esac
  fi
  return "$rc"
}
