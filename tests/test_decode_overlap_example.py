"""examples/decode_overlap.py (issue #13) runs on the CPU reference backend and passes its own check
against the dense layer: under ``mpiexec -n 2`` (BF16, and FP8 with an odd token count, so the two
micro-batches differ in size) and alone on one rank.

The three runs start together (one fixture) so the file stays within a few seconds; each test then
asserts on its own run."""

import os
import subprocess
import sys

import pytest

from testutil import find_mpiexec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "decode_overlap.py")

RUNS = {   # name: (ranks, extra arguments); ranks 1 runs as plain python3 (the docstring's one-rank form)
    "2_ranks_bf16": (2, []),
    "2_ranks_fp8_odd": (2, ["--fp8", "--num-tokens", "13", "--num-topk", "3"]),
    "1_rank": (1, []),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{name: (returncode, output)} for every run in RUNS, launched in parallel."""
    mpiexec = find_mpiexec()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
               DEEPEP_CUPY_CACHE_DIR=os.environ.get("DEEPEP_CUPY_CACHE_DIR", str(tmp_path_factory.mktemp("k"))))
    procs = {}
    for name, (ranks, extra) in RUNS.items():
        cmd = [sys.executable, EXAMPLE, "--backend", "reference", *extra]
        if ranks > 1:
            if mpiexec is None:
                continue
            launch = [mpiexec, "-n", str(ranks)]
            if "Open MPI" in subprocess.run([mpiexec, "--version"], capture_output=True, text=True).stdout:
                launch.append("--oversubscribe")
            cmd = launch + cmd
        procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       env=env, cwd=ROOT)
    out = {}
    for name, proc in procs.items():
        try:
            text, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            text, _ = proc.communicate()
            text += "\n(timed out after 120 s)"
        out[name] = (proc.returncode, text)
    return out


@pytest.mark.mpi
@pytest.mark.parametrize("name", list(RUNS))
def test_decode_overlap_example_passes(results, name):
    if name not in results:
        pytest.skip("no mpiexec (pip install mpich)")
    rc, out = results[name]
    ranks = RUNS[name][0]
    assert rc == 0, out[-4000:]
    assert "PASSED" in out and "FAILED" not in out, out[-4000:]
    for r in range(ranks):   # one line per rank, with the rows its local experts received
        assert f"rank {r}: " in out and "rows per local expert" in out, out[-4000:]
    assert f"{ranks} rank(s)" in out and "backend reference" in out, out[-2000:]
