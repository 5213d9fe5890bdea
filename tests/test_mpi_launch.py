"""Runs the multi-rank tier (tests/multirank) under mpiexec with 2 and 3 ranks on this machine.

On CPUs the Buffer picks the reference backend, so this exercises the MPI logic; on the GPU machine
the same files run with mpirun and GPUs (scripts/gpu_machine.sh).

The launch is the shared ``mpiexec -n N python -m pytest`` session of that rank count
(testutil.MpiSessions, started by conftest.py when collection ends): it runs tests/multirank together
with tests/session_runs.py (the examples and the seed scripts at N ranks), so the CPU tier pays each
rank's interpreter, MPI and JAX start-up once per rank count. The whole session must pass.
"""

import pytest


@pytest.mark.mpi
@pytest.mark.parametrize("num_ranks", [pytest.param(n, marks=pytest.mark.mpi_session(n, suite=True))
                                       for n in (2, 3)])
def test_multirank_suite(num_ranks, mpi_sessions):
    res = mpi_sessions.result(num_ranks, suite=True)
    if res.skip:
        pytest.skip(res.skip)
    assert res.suite, f"the {num_ranks}-rank session was started without tests/multirank: `{res.cmd}`"
    out = res.output
    assert res.returncode == 0, f"{res.cmd} exited {res.returncode}:\n{out[-8000:]}"
    assert " passed" in out, out[-4000:]
