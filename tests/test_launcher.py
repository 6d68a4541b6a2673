"""The launcher layer (mpipar.launcher): the right command, environment and hostfile for each MPI
(pure functions, no MPI started), and one clear line for a bad hostfile, an unknown MPI and a
missing mpiexec."""
import os
import stat
import subprocess
import sys

import pytest

from mpipar.errors import ConfigError
from mpipar.launcher import MPIExec, find, find_mpiexec, kind_of, parse_hostfile, srun_command
from mpirun import KIND, MPIEXEC, ROOT

OPEN_MPI = "mpirun (Open MPI) 5.0.11\n\nReport bugs to https://www.open-mpi.org/community/help/\n"
MPICH = "HYDRA build details:\n    Version:                                 5.0.2\n"
IMPI = "Intel(R) MPI Library for Linux* OS, Version 2021.14 Build 20241121 (id: e7829d6)\n"


def test_kind_is_detected_from_the_version_text():
    assert kind_of(OPEN_MPI) == "openmpi" and kind_of(MPICH) == "mpich" and kind_of(IMPI) == "impi"
    assert kind_of("MVAPICH Version: 3.0\nHYDRA build details:") == "mpich"
    with pytest.raises(ConfigError, match="unknown MPI launcher .*Spectrum"):
        kind_of("IBM Spectrum MPI 10.4")


def test_this_pythons_launcher_matches_its_mpi4py():
    from mpi4py import MPI
    assert find().kind == kind_of(MPI.Get_library_version()) == KIND == MPIEXEC.kind


def test_commands_per_implementation():
    argv = ["-m", "mpipar.run", "mlp"]
    o = MPIExec("openmpi", "/x/mpirun").command(4, argv, python="py")
    assert o == ["/x/mpirun", "-np", "4", "--oversubscribe", "--bind-to", "none", "py", *argv]
    assert "--oversubscribe" not in MPIExec("openmpi", "m").command(4, argv, oversubscribe=False)
    m = MPIExec("mpich", "/y/mpiexec").command(8, argv, hostfile="h", python="py", extra=["-v"])
    assert m == ["/y/mpiexec", "-n", "8", "-f", "h", "-bind-to", "none", "-v", "py", *argv]
    assert "--oversubscribe" not in m
    assert MPIExec("impi", "mpiexec").command(2, ["a.py"], python="py") == ["mpiexec", "-n", "2", "py", "a.py"]
    assert MPIExec("openmpi", "m").with_fault_tolerance() == ["--with-ft", "ulfm"]
    with pytest.raises(ConfigError, match="no fault-tolerant launch"):
        MPIExec("mpich", "m").with_fault_tolerance()
    with pytest.raises(ConfigError, match="at least one rank"):
        MPIExec("mpich", "m").command(0, argv)
    assert srun_command(4, ["a.py"], "pmi2", python="py") == ["srun", "--mpi=pmi2", "-n", "4", "--kill-on-bad-exit=1",
                                                               "py", "a.py"]


def test_environment_per_implementation():
    o = MPIExec("openmpi", "m").environment(True, "10.0.0.0/24")
    assert o["OMPI_MCA_mpi_yield_when_idle"] == "1" and o["OMPI_MCA_btl_tcp_if_include"] == "10.0.0.0/24"
    m = MPIExec("mpich", "m").environment(True)
    assert m["MPIR_CVAR_POLLS_BEFORE_YIELD"] == "1000" and not any(k.startswith("OMPI_") for k in m)
    assert "OMPI_MCA_mpi_yield_when_idle" not in MPIExec("openmpi", "m").environment(False)
    assert MPIExec("impi", "m").environment(True)["I_MPI_WAIT_MODE"] == "1"


def test_hostfiles_in_both_formats():
    hosts = [("n1", 4), ("gpu-2.cluster", 2)]
    assert MPIExec("openmpi", "m").hostfile(hosts) == "n1 slots=4\ngpu-2.cluster slots=2\n"
    assert MPIExec("mpich", "m").hostfile(hosts) == "n1:4\ngpu-2.cluster:2\n"
    text = "# comment\nn1 slots=4 max_slots=4\n\ngpu-2.cluster:2\nn3\n"
    assert parse_hostfile(text) == [*hosts, ("n3", 1)]
    for bad in ("n1 slots=x\n", "n1:0\n", "n1 cores=4\n", "# only a comment\n"):
        with pytest.raises(ConfigError, match="hostfile"):
            parse_hostfile(bad)


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "mpipar.launcher", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=ROOT, timeout=60)


def test_bad_input_ends_with_one_line(tmp_path):
    bad = tmp_path / "hosts"
    bad.write_text("node1 slots=4\nnode2 = 3\n")
    p = cli("--np", "2", "--hostfile", str(bad), "--", "-c", "pass")
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0, p.stderr
    assert "hostfile line 2: 'node2 = 3'" in p.stderr
    fake = tmp_path / "mpiexec"   # an MPI mpipar does not know
    fake.write_text("#!/bin/sh\necho 'Acme MPI 1.0'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    p = cli("--which", env={"MPIPAR_MPIEXEC": str(fake)})
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "unknown MPI launcher (Acme MPI 1.0)" in p.stderr
    p = cli("--which", env={"MPIPAR_MPIEXEC": str(tmp_path / "nothing")})
    assert p.returncode == 2 and "is not an executable" in p.stderr and p.stderr.strip().count("\n") == 0
    with pytest.raises(ConfigError, match="no mpiexec or mpirun found"):   # none beside python, none on PATH
        empty = tmp_path / "empty"
        empty.mkdir()
        find_mpiexec({"PATH": str(empty)}, python=str(empty / "python"))


def test_cli_runs_a_job_and_rewrites_the_hostfile(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=2\n")   # Open MPI syntax: rewritten for hydra under MPICH
    p = cli("--np", "2", "--hostfile", str(hosts), "--", "-c",   # one printer: ranks' lines may interleave
            "from mpi4py import MPI; c = MPI.COMM_WORLD; r = c.gather(c.rank); c.rank or print('ranks', r, 'of', c.size)")
    assert p.returncode == 0, p.stderr
    assert "ranks [0, 1] of 2" in p.stdout, p.stdout
    assert f"via {MPIEXEC.name}" in p.stderr


@pytest.mark.smoke
def test_local_sh_runs_an_example():
    p = subprocess.run(["bash", "launch/local.sh", "mlp", "-np", "2", "--epochs", "1", "--steps", "3"],
                       capture_output=True, text=True, cwd=ROOT, timeout=180,
                       env={**os.environ, "MPIPAR_VENV": sys.prefix})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert f"via {MPIEXEC.name}" in p.stderr and "summary: mlp on 2 ranks" in p.stdout
