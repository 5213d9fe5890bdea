"""Shared test helpers: GPU detection (skips with a reason), MPI communicator, collective asserts.

Tiers: tests/*.py run on any CPU machine; tests/multirank/ run under ``mpiexec -n N`` (launched by
tests/test_mpi_launch.py on CPUs, directly with mpirun on the GPU machine); tests/gpu/ need GPUs and
skip elsewhere.

Kernel compiles (tests/kernel_builds.py): the tests marked ``kernel_build`` (every kernel for sm_90
on both JIT routes, in test_jit.py) are moved to the end of the run, and their compiles start on a
thread pool as soon as collection ends, so they overlap the rest of the tier.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import kernel_builds  # noqa: E402


def pytest_collection_modifyitems(session, config, items):
    # the compile tests last: by the time they run, most of their kernels are built
    late = [item for item in items if item.get_closest_marker("kernel_build")]
    if late:
        early = [item for item in items if not item.get_closest_marker("kernel_build")]
        items[:] = early + late


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


def pytest_terminal_summary(terminalreporter):
    line = kernel_builds.summary()
    if line:
        terminalreporter.write_line(line)


def pytest_unconfigure(config):
    kernel_builds.stop()
