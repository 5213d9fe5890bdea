"""The scripts of a shared ``mpiexec -n N`` session (testutil.SESSION_RUNS[N]), one test each.

Not a ``test_*`` file: the single-process tier does not collect it. testutil.MpiSessions passes it
to ``mpiexec -n N python -m pytest tests/session_runs.py [tests/multirank]`` explicitly. Every rank
runs the script in its own pytest process (``testutil.run_script``: the file as ``__main__``, with
its arguments, output captured), as ``mpiexec -n N python3 script args`` would run it on each rank,
but without a new interpreter, MPI and JAX start-up per script. Rank 0 writes a record (every
rank's exit status, every rank's output in rank order) to ``$DEEPEP_CUPY_TEST_RECORDS/<name>.json``;
the tests in the main pytest process (test_jax_cpu.py, test_readme_examples.py, the seed scripts'
``check_under_mpiexec``) make their assertions on those records. Each test here also fails, on every
rank, when the script exited non-zero on any rank.

A script that fails on some ranks only can leave the others in one of its own collectives, waiting
forever (launched alone, the failing process would exit and mpiexec would end the job). So the ranks
meet after each script with a deadline (``ARRIVE_S``); a rank whose peers do not come prints its
output and aborts the session, which the checking tests then report with the session's output.

By hand: ``mpiexec -n 2 python -m pytest -q tests/session_runs.py`` (no records without the variable).
"""

import json
import os
import sys
import time

import pytest

MPI = pytest.importorskip("mpi4py.MPI")

from testutil import NEEDS_JAX, SESSION_RUNS, run_script, scripts_in_process  # noqa: E402

SIZE = MPI.COMM_WORLD.Get_size()
RUNS = SESSION_RUNS.get(SIZE, {}) if scripts_in_process() else {}   # with GPUs: launches of their own
ARRIVE_S = 180.0   # after a rank finished a script, how long its peers may take to finish it too


def _all_arrive(comm, seconds) -> bool:
    """Whether every rank reaches this point within ``seconds`` (a non-blocking barrier, polled)."""
    req = comm.Ibarrier()
    deadline = time.monotonic() + seconds
    while not req.Test():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.mark.skipif(SIZE < 2, reason="needs at least 2 MPI ranks (run under mpiexec -n 2 or 3)")
@pytest.mark.parametrize("name", sorted(RUNS) or ["none"])
def test_script_under_mpiexec(name):
    if name == "none":
        pytest.skip(f"no session runs for {SIZE} ranks here (with GPUs the scripts run in their own processes)")
    if name in NEEDS_JAX:
        pytest.importorskip("jax", reason="the JAX examples need jax (pip install jax)")
    import deepep_cupy
    comm = MPI.COMM_WORLD
    path, args = RUNS[name]
    saved = deepep_cupy.settings.timeout_seconds
    deepep_cupy.settings.timeout_seconds = 60.0   # a hang here fails in a minute, not 100 s
    try:
        rc, out = run_script(path, args)
    finally:
        deepep_cupy.settings.timeout_seconds = saved
    records = os.environ.get("DEEPEP_CUPY_TEST_RECORDS")
    if not _all_arrive(comm, ARRIVE_S):
        note = (f"rank {comm.Get_rank()}: {path} {' '.join(args)} exited {rc} here, and the other ranks did not "
                f"finish it within {ARRIVE_S:.0f} s; aborting the session. This rank's output:\n{out}\n")
        if records:   # pytest holds this process's stdout: the note goes where the checking test looks
            with open(os.path.join(records, f"{name}.aborted.rank{comm.Get_rank()}.txt"), "w") as f:
                f.write(note)
        sys.__stderr__.write(note)
        comm.Abort(1)
    codes, outputs = comm.allgather(rc), comm.allgather(out)
    record = {"ranks": SIZE, "script": path, "args": list(args), "returncodes": codes,
              "output": "".join(outputs)}
    if records and comm.Get_rank() == 0:
        with open(os.path.join(records, f"{name}.json"), "w") as f:
            json.dump(record, f)
    comm.Barrier()    # the record exists before any rank goes on
    assert all(c == 0 for c in codes), f"{path} {' '.join(args)} exit status per rank {codes}:\n{record['output'][-6000:]}"
