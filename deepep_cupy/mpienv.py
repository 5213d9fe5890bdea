"""The MPI library under mpi4py: a clear error when there is none, and a check that the library
mpi4py loaded is the launcher's.

``pip install deepep_cupy`` brings the ``mpich`` wheel, so mpi4py finds ``libmpi.so.12`` in the
environment's ``lib/`` (mpi4py 4 looks there before the system's libraries). On a cluster whose own
MPI launches the job (Open MPI's ``mpirun``, Cray's ``srun``), mpi4py must load that MPI instead:
``MPI4PY_LIBMPI=/path/to/libmpi.so`` (or ``pip uninstall mpich``). Loading the wrong one does not
fail; every rank silently becomes rank 0 of a world of 1, which ``check_world`` turns into an error.
docs/install.md, "MPI".

Also the two pieces every host-side exchange with peers shares (the reference backend's and the
cross-rank agreement's): ``private_comm`` (a duplicate communicator that reports errors, and an
id that tells its messages from those left on a freed one) and ``poll_until`` (the bounded wait: spin,
yield, sleep, give up).
"""

from __future__ import annotations

import os

from .errors import DeepEPError

__all__ = ["import_mpi", "launcher_world_size", "check_world", "private_comm", "poll_until"]

CHANNEL_ID_BYTES = 8

# what launchers export: MPICH's hydra and Intel MPI (PMI_SIZE), Open MPI (OMPI_COMM_WORLD_SIZE)
_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def import_mpi():
    """``mpi4py.MPI``, or ``DeepEPError`` saying how to get an MPI library (mpi4py's own error
    lists the files it tried)."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise DeepEPError("mpi4py is not installed: pip install mpi4py mpich") from e
    except RuntimeError as e:  # mpi4py 4: "cannot load MPI library" + every dlopen error
        raise DeepEPError(
            "mpi4py found no MPI library. pip install mpich (deepep_cupy depends on it; a "
            "'pip install --no-deps' skipped it), or point MPI4PY_LIBMPI at your MPI's libmpi.so. "
            f"mpi4py said: {' | '.join(str(e).splitlines())}") from e
    return MPI


def launcher_world_size():
    """The rank count the launcher (mpiexec/mpirun) announced in the environment, or None."""
    for var in _SIZE_VARS:
        value = os.environ.get(var, "").strip()
        if value.isdigit():
            return int(value)
    return None


def check_world(comm) -> None:
    """Raise ``DeepEPError`` where a launcher started several ranks but ``comm`` (a world
    communicator) has one: mpi4py loaded another MPI than the launcher's, for example the mpich
    wheel's under Open MPI's mpirun, so each process runs alone."""
    launched = launcher_world_size()
    if launched is None or launched <= 1 or comm.Get_size() != 1:
        return
    try:
        from mpi4py import MPI
        lib = MPI.Get_library_version().splitlines()[0].strip()
        if comm != MPI.COMM_WORLD:
            return  # a sub-communicator of one rank is legitimate
    except Exception:  # noqa: BLE001 - only for the message
        lib = "unknown"
    raise DeepEPError(
        f"the launcher started {launched} ranks but MPI_COMM_WORLD has 1: mpi4py loaded a "
        f"different MPI library ({lib}) than the launcher's. Use the mpiexec of that library "
        "(pip's mpich puts one next to the python executable), or set MPI4PY_LIBMPI to the "
        "launcher's libmpi.so (see docs/install.md, MPI)")


def private_comm(comm) -> tuple:
    """Collective: ``(duplicate of comm, its largest tag, channel id)`` for a channel whose
    point-to-point messages must never meet the caller's (an any-tag receive of theirs would take
    ours). MPI errors come back as exceptions, so a dead peer becomes a DeepEPTimeout, not an abort.
    MPI guarantees tags up to 32767; Open MPI attaches ``TAG_UB`` to ``COMM_WORLD`` only, so a
    duplicate may answer None.

    The channel id (``CHANNEL_ID_BYTES`` random bytes, the same on every rank) goes with each of the
    channel's messages, and receivers drop messages whose id is not theirs. Why: a message a peer
    sent on a communicator that was then freed before anyone received it (the receiver never made
    that call: a timeout, a dead or lagging rank) is not lost. MPI reuses the freed communicator's
    context for a later ``Dup`` and delivers the old message to a receive there with the same source
    and tag (seen with MPICH, 2026-12-06), where it would pass for that channel's own."""
    from mpi4py import MPI

    dup = comm.Dup()
    dup.Set_errhandler(MPI.ERRORS_RETURN)
    tag_ub = dup.Get_attr(MPI.TAG_UB) or MPI.COMM_WORLD.Get_attr(MPI.TAG_UB) or 32767
    channel = dup.bcast(os.urandom(CHANNEL_ID_BYTES) if dup.Get_rank() == 0 else None, root=0)
    return dup, int(tag_ub), channel


def poll_until(step, timeout: float, spin_s: float = 200e-6, yield_s: float = 5e-3) -> bool:
    """Call ``step()`` until it returns True (then True) or ``timeout`` seconds pass (False).

    The host-side wait of every exchange with peers: busy polling for ``spin_s`` (peers are usually
    just behind), then ``sched_yield`` until ``yield_s`` (ranks may outnumber cores on a CPU
    machine), then sleeps of at most 1 ms. Exceptions of ``step`` propagate."""
    import time

    if step():
        return True
    start = time.monotonic()
    while True:
        for _ in range(16):
            if step():
                return True
        waited = time.monotonic() - start
        if waited > timeout:
            return False
        if waited < spin_s:
            continue
        if waited < yield_s:
            os.sched_yield()
        else:
            time.sleep(min(1e-3, waited / 100))
