"""tests/gpu/check.py, the GPU check, kept working on machines without a GPU: its CPU mode runs a
pipeline parity check, the GPT cut by Pipeline's trace on pp=2, and the device benchmark and must
print a PASS line for each (on a GPU
machine, tests/gpu/check.sh runs the full check on CUDA)."""
import subprocess
import sys

from mpirun import ROOT


def test_gpu_check_script_runs_in_its_cpu_mode():
    p = subprocess.run([sys.executable, "tests/gpu/check.py", "--device", "cpu", "--only", "mlp,gpt-pp2,bench"],
                       cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("check ")]
    assert len(lines) == 3 and all("PASS" in ln for ln in lines), p.stdout
    assert "train-loss gap to single process" in lines[0] and lines[1].startswith("check gpt-pp2 (2 ranks")
    assert "gpu check: 3 of 3 passed" in p.stdout
