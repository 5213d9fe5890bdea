"""A rank that dies, on the GPU backend: every surviving rank raises ``DeepEPTimeout`` naming it
within the timeout (+ 5 s), destroys its Buffer (whose teardown barrier gives up) and exits;
nothing hangs (issue #12). The reference backend's counterpart: tests/test_dead_rank_reference.py.

Launches ``tests/gpu/dead_rank_gpu_worker.py`` at 2 and 4 ranks for each operation, one group at a
time (they share the GPUs); the last rank dies. The launcher is ``$DEEPEP_MPIRUN`` (set by
scripts/gpu_machine.sh, with its ranks sharing a GPU under CUDA MPS) or mpiexec on PATH; it is told
to keep the survivors alive when a rank dies (Open MPI: MCA options; MPICH: -disable-auto-cleanup).
Results come from the files the survivors write. Skips without a GPU.
"""

import json
import os
import shlex
import subprocess
import sys

import pytest

from testutil import find_mpiexec, gpu_count, gpu_skip_reason

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "gpu", "dead_rank_gpu_worker.py")
# operation -> words the survivors' message must contain (besides "rank <dead>")
PHASES = {"dispatch": "dispatch", "dispatch_mid": "dispatch", "combine": "combine",
          "low_latency_dispatch": "low-latency dispatch", "low_latency_combine": "low-latency combine"}
TIMEOUT_S = 3.0
SLACK_S = 5.0
LAUNCH_LIMIT_S = 150

pytestmark = pytest.mark.skipif(gpu_skip_reason() is not None, reason=str(gpu_skip_reason()))


def _launcher():
    text = os.environ.get("DEEPEP_MPIRUN") or find_mpiexec()
    if not text:
        pytest.skip("no mpirun / mpiexec")
    cmd = shlex.split(text)
    version = subprocess.run([cmd[0], "--version"], capture_output=True, text=True, timeout=30).stdout
    if "HYDRA" in version:
        return cmd + ["-disable-auto-cleanup"]
    if "Open MPI" in version or "OpenRTE" in version:
        return cmd + ["--mca", "orte_abort_on_non_zero_status", "0", "--mca", "orte_allowed_exit_without_sync", "1"]
    pytest.skip(f"unknown MPI launcher {cmd[0]}: {version[:80]!r}")


@pytest.mark.parametrize("num_ranks", [2, 4])
@pytest.mark.parametrize("op", list(PHASES))
def test_gpu_survivors_raise_timeout_naming_the_dead_rank(num_ranks, op, tmp_path):
    if num_ranks > gpu_count() and not os.environ.get("DEEPEP_CUPY_SHARE_GPUS"):
        pytest.skip(f"{num_ranks} ranks on {gpu_count()} GPU(s) need CUDA MPS (scripts/gpu_machine.sh)")
    root = os.path.dirname(HERE)
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    cmd = _launcher() + ["-n", str(num_ranks), sys.executable, WORKER, op, str(TIMEOUT_S), str(tmp_path)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_LIMIT_S, env=env, cwd=HERE)
        tail = (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"") + (e.stderr or b"")
        tail = (out.decode(errors="replace") if isinstance(out, bytes) else out)[-3000:]
        pytest.fail(f"{op} at {num_ranks} ranks: still running after {LAUNCH_LIMIT_S} s:\n{tail}")
    dead = num_ranks - 1
    problems = []
    for rank in range(dead):
        path = tmp_path / f"rank{rank}.json"
        if not path.exists():
            problems.append(f"rank {rank} wrote no result (died or hung in the call)")
            continue
        res = json.loads(path.read_text())
        if res["error"] != "DeepEPTimeout":
            problems.append(f"rank {rank}: expected DeepEPTimeout, got {res['error']}: {res['message']}")
        elif PHASES[op] not in res["message"] or f"rank {dead}" not in res["message"]:
            problems.append(f"rank {rank}: the message names neither the phase nor dead rank {dead}: {res['message']}")
        if not res["seconds"] <= TIMEOUT_S + SLACK_S:
            problems.append(f"rank {rank}: raised after {res['seconds']:.1f} s (timeout {TIMEOUT_S} s)")
        if not res["destroyed"]:
            problems.append(f"rank {rank}: Buffer.destroy() did not return")
    assert not problems, f"{op} at {num_ranks} ranks:\n" + "\n".join(problems) + f"\n--- output:\n{tail}"
