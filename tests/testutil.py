"""Helpers for the test tiers (imported by tests as ``testutil``)."""

import functools
import os
import shutil
import sys


@functools.lru_cache(maxsize=None)
def gpu_count() -> int:
    """Visible CUDA GPUs (0 with no driver)."""
    try:
        import cupy
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


def gpu_skip_reason(min_gpus: int = 1):
    """None if the GPU tier can run here, else why not."""
    n = gpu_count()
    if n < min_gpus:
        return f"needs {min_gpus} CUDA GPU(s), found {n}"
    return None


def world():
    """MPI.COMM_WORLD (imports mpi4py lazily)."""
    from mpi4py import MPI
    return MPI.COMM_WORLD


def assert_all_ranks(comm, ok: bool, message: str = "") -> None:
    """Collective assert: every rank learns whether any rank failed, so none hangs in a later
    collective; each failing rank's message is reported."""
    msgs = comm.allgather(None if ok else message)
    bad = [(r, m) for r, m in enumerate(msgs) if m is not None]
    assert not bad, "; ".join(f"rank {r}: {m}" for r, m in bad)


def find_mpiexec():
    """mpiexec next to this interpreter (pip mpich) or on PATH; None if there is none."""
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.path.isfile(here):
        return here
    return shutil.which("mpiexec") or shutil.which("mpirun")
