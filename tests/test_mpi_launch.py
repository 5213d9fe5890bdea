"""Runs the multi-rank tier (tests/multirank) under mpiexec with 2 and 3 ranks on this machine.

On CPUs the Buffer picks the reference backend, so this exercises the MPI logic; on the GPU machine
the same files run with mpirun and GPUs (scripts/gpu_machine.sh).
"""

import os
import subprocess
import sys

import pytest

from testutil import find_mpiexec

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.mpi
@pytest.mark.parametrize("num_ranks", [2, 3])
def test_multirank_suite(num_ranks, tmp_path):
    mpiexec = find_mpiexec()
    if mpiexec is None:
        pytest.skip("no mpiexec (pip install mpich)")
    root = os.path.dirname(HERE)
    env = dict(os.environ, DEEPEP_CUPY_CACHE_DIR=str(tmp_path / "kernels"), PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    cmd = [mpiexec, "-n", str(num_ranks), sys.executable, "-m", "pytest", "-q", "-x",
           "-p", "no:cacheprovider", os.path.join(HERE, "multirank")]
    if "Open MPI" in subprocess.run([mpiexec, "--version"], capture_output=True, text=True).stdout:
        cmd[1:1] = ["--oversubscribe", "--allow-run-as-root"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=HERE)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{out[-8000:]}"
    assert " passed" in out, out[-4000:]
