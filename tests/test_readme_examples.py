"""The README's two examples run as written (under mpiexec -n 2 on the CPU reference backend, or on
GPUs where present), and the README shows exactly the files that run."""

import os
import subprocess
import sys

import pytest

from testutil import find_mpiexec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", ["readme_cupy.py", "readme_jax.py"])
def test_readme_shows_the_example_file(name):
    with open(os.path.join(ROOT, "examples", name)) as f:
        code = f.read().rstrip()
    with open(os.path.join(ROOT, "README.md")) as f:
        assert code in f.read(), f"README.md's copy of examples/{name} differs from the file"


@pytest.mark.mpi
@pytest.mark.parametrize("name", ["readme_cupy.py", "readme_jax.py"])
def test_readme_example_runs(name, tmp_path):
    if name == "readme_jax.py":
        pytest.importorskip("jax", reason="the JAX example needs jax (pip install jax)")
    mpiexec = find_mpiexec()
    if mpiexec is None:
        pytest.skip("no mpiexec (pip install mpich)")
    cmd = [mpiexec, "-n", "2", sys.executable, os.path.join(ROOT, "examples", name)]
    if "Open MPI" in subprocess.run([mpiexec, "--version"], capture_output=True, text=True).stdout:
        cmd[1:1] = ["--oversubscribe"]
    env = dict(os.environ, DEEPEP_CUPY_CACHE_DIR=os.environ.get("DEEPEP_CUPY_CACHE_DIR", str(tmp_path / "k")),
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "rank 0:" in out and "rank 1:" in out, out[-2000:]
