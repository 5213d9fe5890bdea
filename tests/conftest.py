"""Shared test helpers: GPU detection (skips with a reason), MPI communicator, collective asserts.

Tiers: tests/*.py run on any CPU machine; tests/multirank/ run under ``mpiexec -n N`` (launched by
tests/test_mpi_launch.py on CPUs, directly with mpirun on the GPU machine); tests/gpu/ need GPUs and
skip elsewhere.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
