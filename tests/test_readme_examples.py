"""The README's two examples run as written (under mpiexec -n 2 on the CPU reference backend, or on
GPUs where present), and the README shows exactly the files that run.

Without GPUs the 2-rank runs happen in the shared ``mpiexec -n 2`` session (testutil.SESSION_RUNS,
tests/session_runs.py: every rank runs the file as ``__main__``), and these tests check its records;
with GPUs each is its own launch."""

import os

import pytest

from testutil import launch_script, scripts_in_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", ["readme_cupy.py", "readme_jax.py"])
def test_readme_shows_the_example_file(name):
    with open(os.path.join(ROOT, "examples", name)) as f:
        code = f.read().rstrip()
    with open(os.path.join(ROOT, "README.md")) as f:
        assert code in f.read(), f"README.md's copy of examples/{name} differs from the file"


@pytest.mark.mpi
@pytest.mark.mpi_session(2)
@pytest.mark.parametrize("name", ["readme_cupy.py", "readme_jax.py"])
def test_readme_example_runs(name, mpi_sessions, tmp_path):
    if name == "readme_jax.py":
        pytest.importorskip("jax", reason="the JAX example needs jax (pip install jax)")
    if scripts_in_process():
        rec = mpi_sessions.result(2).record(name[:-3])
        assert rec["script"] == f"examples/{name}" and rec["args"] == [], rec
        codes, out = rec["returncodes"], rec["output"]
    else:   # GPUs: a launch of its own
        rc, out = launch_script(os.path.join("examples", name), (), 2, timeout=300, env={
            "DEEPEP_CUPY_CACHE_DIR": os.environ.get("DEEPEP_CUPY_CACHE_DIR", str(tmp_path / "k"))})
        codes = [rc, rc]
    assert codes == [0, 0], f"mpiexec -n 2 python3 examples/{name}: exit status {codes}:\n{out[-4000:]}"
    assert "rank 0:" in out and "rank 1:" in out, out[-2000:]
