"""The GPU diagnostics reject bad arguments before touching a GPU (CPU)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script, args, message", [
    ("profile_host.py", ["--iters", "0"], "--iters: at least 1"),
    ("profile_host.py", ["--ops", "dispatch_bf16,combin"], "--ops: unknown 'combin'"),
    ("trace_dispatch.py", ["--iters", "0"], "--iters: at least 1"),
    ("trace_dispatch.py", ["--inputs", "bf16,int8"], "--inputs: expected bf16 and/or fp8, got 'int8'"),
])
def test_bad_arguments_exit_2_with_a_message(script, args, message):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / script)] + args, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
