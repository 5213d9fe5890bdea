"""Shared test helpers: GPU detection (skips with a reason), MPI communicator, collective asserts.

Tiers: tests/*.py run on any CPU machine; tests/multirank/ run under ``mpiexec -n N`` (launched by
tests/test_mpi_launch.py on CPUs, directly with mpirun on the GPU machine); tests/gpu/ need GPUs and
skip elsewhere.

Kernel compiles (tests/kernel_builds.py): the tests marked ``kernel_build`` (every kernel for sm_90
on both JIT routes, in test_jit.py) are moved to the end of the run, and their compiles start on a
thread pool as soon as collection ends, so they overlap the rest of the tier.

Multi-rank runs (testutil.MpiSessions): the tests marked ``mpi_session(N, ...)`` check what one
shared ``mpiexec -n N`` pytest session did (tests/multirank, the examples, the seed scripts); the
sessions start when collection ends as well, and those tests wait for them.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import kernel_builds  # noqa: E402
import pytest  # noqa: E402
import testutil  # noqa: E402

if not testutil.launched_by_mpi():
    # The CPU tier's processes (this one, the mpiexec sessions, the dead-rank workers, the examples)
    # share the CI machine's 2 cores with the kernel builds. MPICH: a rank waiting in a blocking MPI
    # call sleeps between polls instead of spinning on sched_yield, so the peer it waits for gets the
    # CPU; OpenBLAS: no thread pool per process (the tests multiply small matrices, and a pool's
    # threads spin while they wait for a core). Neither changes what a test checks.
    os.environ.setdefault("MPIR_CVAR_ENABLE_HEAVY_YIELD", "1")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _phase(item) -> int:
    """Where an item runs: 0 the single-process tests; 1 the checks of the shared mpiexec sessions
    (they wait for them); 2 the tests that launch mpiexec themselves; 3 the compile tests."""
    if item.get_closest_marker("kernel_build"):
        return 3     # by the time they run, most of their kernels are built
    if item.get_closest_marker("mpi_session"):
        return 1
    if item.get_closest_marker("mpi"):
        return 2     # after the sessions: fewer MPI ranks on the CPUs at once
    return 0


def pytest_collection_modifyitems(session, config, items):
    # Stable: the order within a phase stays the usual one. Everything here is CPU-bound on the 2-core
    # CI machine; the sessions and the kernel builds start at collection's end, and running the
    # other MPI launches after the sessions keeps fewer ranks waiting on descheduled peers at once.
    items[:] = sorted(items, key=_phase)


def pytest_collection_finish(session):
    if session.testsfailed:   # a collection error: the run stops here, compile nothing
        return
    pairs = []
    for item in session.items:   # after -k/-m deselection: only what will run
        if item.get_closest_marker("kernel_build") and hasattr(item, "callspec"):
            params = item.callspec.params
            pairs.append((params["spec"], params["route"]))
    if pairs:
        kernel_builds.start(pairs)
    sessions = {}    # rank count -> with tests/multirank
    for item in session.items:
        for mark in item.iter_markers("mpi_session"):
            for n in mark.args:
                sessions[n] = sessions.get(n, False) or bool(mark.kwargs.get("suite"))
    for n, suite in sorted(sessions.items(), reverse=True):   # the larger one takes longer: first
        testutil.SESSIONS.start(n, suite)


@pytest.fixture(scope="session")
def mpi_sessions():
    """testutil.SESSIONS: ``mpi_sessions.result(N)`` waits for the ``mpiexec -n N`` session."""
    return testutil.SESSIONS


def pytest_terminal_summary(terminalreporter):
    line = kernel_builds.summary()
    if line:
        terminalreporter.write_line(line)


def pytest_unconfigure(config):
    kernel_builds.stop()
    testutil.SESSIONS.stop()
