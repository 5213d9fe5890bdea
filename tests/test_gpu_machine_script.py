"""scripts/gpu_machine.sh's per-file summary of the GPU tier (``tier_file_summary``): counts per test
file and rank from each rank's ``pytest -v`` log, also for a log cut off by the time limit (no
final summary line), which is what a device call that runs out of time leaves."""

import os
import pathlib
import shutil
import subprocess

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "gpu_machine.sh"

COMPLETE = """\
============================= test session starts ==============================
tests/gpu/test_a_gpu.py::test_one PASSED                                 [ 10%]
tests/gpu/test_a_gpu.py::test_two[x-1] PASSED                            [ 20%]
tests/gpu/test_a_gpu.py::test_two[x-2] FAILED                            [ 30%]
tests/gpu/test_b_gpu.py::test_skipped SKIPPED (no GPU)                   [ 40%]
tests/gpu/test_b_gpu.py::test_err ERROR                                  [ 50%]
tests/multirank/test_c.py::test_c[a b] PASSED                            [100%]
FAILED tests/gpu/test_a_gpu.py::test_two[x-2] - AssertionError: 1 != 2
=================== 3 passed, 1 failed, 1 skipped, 1 error in 2.00s ===================
"""

CUT = """\
============================= test session starts ==============================
tests/gpu/test_a_gpu.py::test_one PASSED                                 [ 10%]
tests/gpu/test_a_gpu.py::test_two[x-1] PASSED                            [ 20%]
tests/gpu/test_b_gpu.py::test_skipped SKIPPED (no GPU)                   [ 40%]
tests/gpu/test_b_gpu.py::test_slow """


def _function(name):
    body = SCRIPT.read_text()
    start = body.index(f"{name}() {{")
    return body[start:body.index("\n}\n", start) + 3]


def _summary(tmp_path, logs):
    body = SCRIPT.read_text()
    start = body.index("tier_file_summary() {")
    end = body.index("\n}\n", start) + 3
    paths = []
    for name, text in logs.items():
        path = tmp_path / name
        path.write_text(text)
        paths.append(str(path))
    out = subprocess.run(["bash", "-c", body[start:end] + '\ntier_file_summary "$@"', "summary"] + paths,
                         capture_output=True, text=True, check=True)
    return [line.split() for line in out.stdout.splitlines()]


@pytest.mark.skipif(shutil.which("awk") is None or shutil.which("bash") is None, reason="needs bash and awk")
def test_counts_per_file_and_rank_also_for_a_cut_log(tmp_path):
    rows = _summary(tmp_path, {"gpu_tests_rank0.log": COMPLETE, "gpu_tests_rank1.log": CUT})
    # rank, file, passed, failed, skipped, errors (the words between are labels)
    got = [(r[1], r[2], int(r[3]), int(r[5]), int(r[7]), int(r[9])) for r in rows]
    assert got == [
        ("0", "tests/gpu/test_a_gpu.py", 2, 1, 0, 0),
        ("0", "tests/gpu/test_b_gpu.py", 0, 0, 1, 1),
        ("0", "tests/multirank/test_c.py", 1, 0, 0, 0),
        ("1", "tests/gpu/test_a_gpu.py", 2, 0, 0, 0),
        ("1", "tests/gpu/test_b_gpu.py", 0, 0, 1, 0),   # the test running at the cut counts nowhere
    ]


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("grep") is None, reason="needs bash and grep")
@pytest.mark.parametrize("logs,finished", [
    ({"r0.log": COMPLETE, "r1.log": COMPLETE}, True),    # a timeout then hit the shutdown only
    ({"r0.log": COMPLETE, "r1.log": CUT}, False),        # a rank was still testing: cut
    ({}, False),                                         # no logs: nothing finished
])
def test_all_ranks_finished_tells_a_cut_run_from_a_slow_shutdown(tmp_path, logs, finished):
    paths = []
    for name, text in logs.items():
        (tmp_path / name).write_text(text)
        paths.append(str(tmp_path / name))
    rc = subprocess.run(["bash", "-c", _function("all_ranks_finished") + '\nall_ranks_finished "$@"', "check"] + paths,
                        capture_output=True, text=True, env={**os.environ, "NUM_RANKS": "2"}).returncode
    assert (rc == 0) is finished


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("grep") is None, reason="needs bash and grep")
def test_all_ranks_finished_needs_a_log_for_every_rank(tmp_path):
    """A rank that never wrote its log does not make a cut run read as finished."""
    (tmp_path / "r0.log").write_text(COMPLETE)
    run = lambda n: subprocess.run(   # noqa: E731
        ["bash", "-c", _function("all_ranks_finished") + '\nall_ranks_finished "$@"', "check", str(tmp_path / "r0.log")],
        capture_output=True, text=True, env={**os.environ, "NUM_RANKS": n}).returncode
    assert run("2") != 0 and run("1") == 0
