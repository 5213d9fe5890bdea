"""scripts/gpu_acceptance.sh's time budget and piece names, without a GPU: a piece that no longer
fits in TOTAL_S is listed as not run (instead of starting and being killed by the device call's
limit), and an unknown piece name or a limit that is not a positive number of seconds (``timeout
0`` would run without a limit) stops the script before anything runs."""

import os
import pathlib
import shutil
import subprocess

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "gpu_acceptance.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _run(tmp_path, **env):
    full = dict(os.environ, OUT=str(tmp_path), **env)
    return subprocess.run(["bash", str(SCRIPT)], env=full, capture_output=True, text=True, timeout=60)


def test_pieces_past_the_total_budget_are_listed_as_not_run(tmp_path):
    # 40 s total leaves less than a piece's 45 s minimum once the 30 s reserve is taken
    done = _run(tmp_path, PIECES="tier2 tier4", TOTAL_S="40")
    assert done.returncode == 0, done.stderr
    assert "--- tier2: not run, TOTAL_S=40 spent" in done.stdout
    assert "--- tier4: not run, TOTAL_S=40 spent" in done.stdout
    assert not (tmp_path / "tier2").exists()   # gpu_machine.sh never started


def test_unknown_piece_stops_before_anything_runs(tmp_path):
    # a known piece before it must not run either: the names are checked first
    done = _run(tmp_path, PIECES="tier2 bench", TOTAL_S="580")
    assert done.returncode == 2
    assert "unknown piece bench" in done.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", [dict(TIER4_S="0"), dict(TOTAL_S="abc"), dict(SAN_S="-5"), dict(RACE_S="0")])
def test_a_limit_that_is_not_positive_stops_before_anything_runs(tmp_path, bad):
    done = _run(tmp_path, PIECES="tier2 tier4", **bad)
    name, value = next(iter(bad.items()))
    assert done.returncode == 2
    assert f"{name}={value}: a limit must be a whole number of seconds >= 1" in done.stdout
    assert list(tmp_path.iterdir()) == []
