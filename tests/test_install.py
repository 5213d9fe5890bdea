"""What an install gives (issue #15): the CPU-only install's package set, the library without any CUDA
module importable, the MPI library check, and the demo as an entry point with one-line usage errors.

The CPU-only install (requirements-cpu.txt + ``pip install --no-deps .``) is simulated in a
subprocess that refuses to import the CUDA stack (cupy, cuda.*, nvshmem, nvidia.*), so this runs
without network or a second environment. docs/install.md has the fresh-venv measurements.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Python run first in the subprocess: a CPU-only install has none of these packages
BLOCK_CUDA = r'''
import importlib.abc, sys
class _NoCuda(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in ("cupy", "cupyx", "cupy_backends", "cuda", "nvshmem", "nvidia", "fastrlock"):
            raise ModuleNotFoundError(f"No module named {name!r} (CPU-only install)", name=name)
        return None
sys.meta_path.insert(0, _NoCuda())
'''


def _python(code: str, *args, env_extra=None, timeout=240):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OMPI_", "PMI_", "PMIX_", "HYDI_", "MPI_LOCALNRANKS"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(ROOT))


def test_reference_backend_without_any_cuda_package():
    """import deepep_cupy, Buffer(backend="auto") on a world of 1, dispatch/combine and low-latency
    dispatch/combine, with cupy, cuda-bindings and NVSHMEM unimportable."""
    code = BLOCK_CUDA + r'''
import numpy as np, ml_dtypes
from mpi4py import MPI
import deepep_cupy as ep
from deepep_cupy import reference
with ep.Buffer(MPI.COMM_SELF, num_nvl_bytes=8 << 20, backend="auto") as buf:
    assert buf.backend_name == "reference", buf.backend_name
    rng = np.random.default_rng(0)
    topk = np.argsort(rng.random((16, 8)), axis=1)[:, :2].astype(np.int64)
    layout = buf.get_dispatch_layout(topk, 8)
    x = rng.standard_normal((16, 128)).astype(np.float32).astype(ml_dtypes.bfloat16)
    w = rng.random(topk.shape).astype(np.float32)
    recv_x, _, recv_w, _, handle, _ = buf.dispatch(x, topk_idx=topk, topk_weights=w,
        num_tokens_per_rank=layout[0], is_token_in_rank=layout[3], num_tokens_per_expert=layout[2])
    out, out_w, _ = buf.combine(recv_x, handle, topk_weights=recv_w)
    assert np.array_equal(out.view(np.uint16), x.view(np.uint16)) and np.allclose(out_w, w)
ll_bytes = ep.Buffer.get_low_latency_rdma_size_hint(16, 128, 1, 8)
with ep.Buffer(MPI.COMM_SELF, num_rdma_bytes=ll_bytes, low_latency_mode=True) as ll:
    recv, count, handle, _, _ = ll.low_latency_dispatch(x, topk, 16, 8, use_fp8=False)
    assert int(count.sum()) == topk.size
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("cupy", "cuda", "nvshmem"))
assert not loaded, loaded
print("CPU-ONLY OK")
'''
    proc = _python(code)
    assert proc.returncode == 0 and "CPU-ONLY OK" in proc.stdout, proc.stdout + proc.stderr


def test_requirements_cpu_matches_the_core_dependencies():
    """requirements-cpu.txt lists the non-CUDA core dependencies with the same bounds, and is
    closed under their dependencies (``pip install --no-deps`` installs nothing else)."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {re.split(r"[<>=;\s]", d, maxsplit=1)[0]: d.split(";")[0].strip() for d in project["dependencies"]}
    lines = [ln.strip() for ln in (ROOT / "requirements-cpu.txt").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines == [core[name] for name in ("numpy", "ml_dtypes", "mpi4py", "mpich")], lines
    assert project["scripts"]["deepep-cupy-demo"] == "deepep_cupy.demo:main"


def test_mpi_world_check_names_a_mismatched_library(monkeypatch):
    from deepep_cupy import mpienv
    from deepep_cupy.errors import DeepEPError

    class World:
        def Get_size(self):
            return 1

    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        monkeypatch.delenv(var, raising=False)
    mpienv.check_world(World())                       # no launcher: a world of 1 is right
    monkeypatch.setenv("PMI_SIZE", "1")
    mpienv.check_world(World())
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")   # Open MPI started 4, this process sees 1
    from mpi4py import MPI
    with pytest.raises(DeepEPError, match="launcher started 4 ranks but MPI_COMM_WORLD has 1"):
        mpienv.check_world(MPI.COMM_WORLD)
    mpienv.check_world(MPI.COMM_SELF)                  # a communicator of one, on purpose


DEMO = "import sys; from deepep_cupy.demo import main; sys.exit(main(sys.argv[1:]))"


@pytest.mark.parametrize("argv, message", [
    (["--tokens", "abc"], "argument --tokens: invalid int value: 'abc'"),
    (["--hidden", "100"], "--hidden: expected a multiple of 128"),
    (["--topk", "20"], "--topk: expected 1 to 16"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_demo_bad_flags_give_one_line(argv, message, monkeypatch, capsys):
    from deepep_cupy import demo
    for var in demo._LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SystemExit) as info:
        demo.main(argv)
    assert info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("deepep-cupy-demo: error:"), lines
    assert captured.out == ""
    monkeypatch.setenv("PMI_RANK", "1")          # under a launcher, only the first rank says it
    with pytest.raises(SystemExit):
        demo.main(argv)
    assert capsys.readouterr().err == ""


def test_demo_one_rank_without_cuda_prints_settings_block_and_verdict():
    """The demo in one process (no mpiexec), CPU-only: settings, one block, the max-err note."""
    proc = _python(BLOCK_CUDA + DEMO, "--ranks", "1", "--tokens", "32", "--hidden", "256", "--experts", "16")
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "backend:  auto -> reference" in out and "tokens:   32 per rank, hidden 256" in out, out
    assert out.count("[rank 0/1]") == 1 and "max err:" in out, out
    assert out.strip().splitlines()[-1].startswith("DEMO PASSED"), out
