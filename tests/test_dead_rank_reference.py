"""A rank that dies, on the reference backend: every surviving rank raises ``DeepEPTimeout`` naming
it within the timeout (+ 5 s), destroys its Buffer and exits; nothing hangs (issue #12).

Launches ``mpiexec -disable-auto-cleanup -n N tests/multirank/dead_rank_worker.py OP ...`` at 2 and
4 ranks for each operation; the last rank dies. Not in tests/multirank: a killed rank would take
the collective pytest run there down with it. The five launches of one rank count run at once
(the survivors mostly sleep through the timeout). Results come from the files the survivors write,
not from mpiexec's exit status (non-zero: a rank died). Needs MPICH's mpiexec (hydra): without
``-disable-auto-cleanup`` it kills every rank as soon as one dies.
"""

import concurrent.futures
import json
import os
import signal
import subprocess
import sys

import pytest

from testutil import find_mpiexec

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "multirank", "dead_rank_worker.py")
# operation of the worker -> the phase the survivors must name: the Buffer's cross-rank agreement
# before the call (issue #15; the worker's survivors call get_dispatch_layout first for "dispatch"),
# or the backend's exchange when the rank dies inside the call
PHASES = {"dispatch": "get_dispatch_layout agreement", "dispatch_mid": "dispatch exchange",
          "combine": "combine agreement", "low_latency_dispatch": "low_latency_dispatch agreement",
          "low_latency_combine": "low_latency_combine agreement"}
OPS = tuple(PHASES)
TIMEOUT_S = 3.0
SLACK_S = 5.0          # the acceptance bound: timeout + 5 s
LAUNCH_LIMIT_S = 90    # a launch that takes longer has hung


def _hydra_mpiexec():
    """MPICH's mpiexec, or skip: only hydra has ``-disable-auto-cleanup``."""
    mpiexec = find_mpiexec()
    if mpiexec is None:
        pytest.skip("no mpiexec (pip install mpich)")
    try:
        version = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"{mpiexec} --version failed: {e}")
    if "HYDRA" not in version:
        pytest.skip(f"{mpiexec} is not MPICH's hydra (needs -disable-auto-cleanup to keep survivors alive)")
    return mpiexec


def _launch(mpiexec, num_ranks, op, out_dir):
    """Run one worker group; returns (op, output, timed_out)."""
    os.makedirs(out_dir)
    root = os.path.dirname(HERE)
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    cmd = [mpiexec, "-disable-auto-cleanup", "-n", str(num_ranks), sys.executable, WORKER, op,
           str(TIMEOUT_S), out_dir]
    # own process group: a hung launch is killed with every rank (killing mpiexec alone can
    # leave them running)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=HERE, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=LAUNCH_LIMIT_S)
        return op, out, False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        try:
            out, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:  # something outside the group holds the pipe
            out = ""
        return op, out, True


@pytest.mark.mpi
@pytest.mark.parametrize("num_ranks", [2, 4])
def test_survivors_raise_timeout_naming_the_dead_rank(num_ranks, tmp_path):
    mpiexec = _hydra_mpiexec()
    dead = num_ranks - 1
    with concurrent.futures.ThreadPoolExecutor(len(OPS)) as pool:
        runs = list(pool.map(lambda op: _launch(mpiexec, num_ranks, op, str(tmp_path / op)), OPS))
    problems = []
    for op, output, hung in runs:
        tail = output[-3000:]
        if hung:
            problems.append(f"{op}: mpiexec still running after {LAUNCH_LIMIT_S} s:\n{tail}")
            continue
        for rank in range(dead):
            path = tmp_path / op / f"rank{rank}.json"
            if not path.exists():
                problems.append(f"{op}: rank {rank} wrote no result (died or hung in the call):\n{tail}")
                continue
            res = json.loads(path.read_text())
            where = f"{op}: rank {rank}"
            if res["error"] != "DeepEPTimeout":
                problems.append(f"{where}: expected DeepEPTimeout, got {res['error']}: {res['message']}")
            elif (f"rank {rank}: {PHASES[op]} timed out" not in res["message"]
                  or f"rank {dead} sent nothing" not in res["message"]):
                problems.append(f"{where}: the message does not name the phase and dead rank {dead}: "
                                f"{res['message']}")
            if not TIMEOUT_S - 0.1 <= res["seconds"] <= TIMEOUT_S + SLACK_S:
                problems.append(f"{where}: raised after {res['seconds']:.1f} s (timeout {TIMEOUT_S} s)")
            if not res["destroyed"]:
                problems.append(f"{where}: Buffer.destroy() did not return")
    assert not problems, "\n".join(problems)
