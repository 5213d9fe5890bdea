"""The JIT on the CPU: every kernel compiles for sm_90 through the path users hit (NVRTC, and the
nvcc device-link route), the disk cache hits and misses when it should, errors carry the log."""

import shutil
from pathlib import Path

import pytest

import deepep_cupy as ep
from deepep_cupy import jit, kernels
from deepep_cupy.config import settings
from deepep_cupy.errors import DeepEPCompileError, DeepEPInvalid

from kernel_builds import get as built, left_out

ROUTES = ["nvrtc", "nvcc"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(settings, "cache_dir", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.kernel_build
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("spec", kernels.all_specs(), ids=lambda s: f"{s.source}{dict(s.defines)}")
def test_every_kernel_compiles_for_sm90(spec, route):
    """Every kernel for sm_90 on both routes. The compiles run on a thread pool from the end of
    collection on, each once, into one fresh cache for the run (tests/kernel_builds.py)."""
    why = left_out(spec, route)
    if why:
        pytest.skip(why)
    compiled = built(spec, route)
    blob = Path(compiled.cubin_path).read_bytes()
    assert blob[:4] == b"\x7fELF", "a cubin is an ELF file"
    assert not compiled.from_cache and compiled.compile_seconds > 0
    for name in spec.kernels:
        assert name.encode() in blob, f"entry point {name} missing from the cubin"
    if route == "nvrtc" and not compiled.resources:
        # some NVRTC builds (seen with the GPU machine's) print no ptxas -v report; nvcc always does
        pytest.skip("this NVRTC printed no ptxas -v report; the nvcc case checks registers and spills")
    for name in spec.kernels:
        res = compiled.resources.get(name)
        assert res is not None, f"no ptxas report for {name}: {compiled.resources}"
        assert res["spill_store_bytes"] == 0 and res["spill_load_bytes"] == 0, res
        if not spec.uses_nvshmem:   # our own kernels keep no local-memory arrays
            assert res["stack_bytes"] == 0, (name, res)


def _script(name):
    """scripts/<name>.py loaded as a module (the scripts are not a package)."""
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script,names", [
    ("bench_nvlink_write", ("probe_stores", "probe_tma")),
    ("bench_copy_paths", ("scatter_regs16", "scatter_regs16_pf", "scatter_regs8", "scatter_regs16_flat", "scatter_tma")),
])
def test_probe_kernels_compile_for_sm90(cache, script, names):
    """The probe scripts' kernels (NVLink stores vs TMA; the dispatch's row scatter with register
    copies vs TMA rings) build for sm_90 with no stack or spills."""
    probe = _script(script)
    compiled = jit.build(probe.probe_spec(), jit.JitOptions(arch="sm_90", route="nvrtc"))
    blob = Path(compiled.cubin_path).read_bytes()
    for name in names:
        assert name.encode() in blob, name
    for res in compiled.resources.values():
        assert res["stack_bytes"] == 0 and res["spill_store_bytes"] == 0, res


def test_copy_probe_tma_variants_fit_shared_memory():
    """bench_copy_paths' TMA rings: every (producers, stages) fits the opt-in shared memory, with a
    ring of at least two rows (the ring refills one row behind)."""
    probe = _script("bench_copy_paths")
    assert probe.tma_variants(14336) == [(1, 15), (2, 8), (4, 4), (8, 2)]
    for row in (14336, 7168, 2048):
        for producers, stages in probe.tma_variants(row):
            assert stages >= 2 and producers * stages * row <= probe.MAX_DYNAMIC_SMEM


def test_cache_hit_and_source_edit_recompiles(cache, tmp_path, monkeypatch):
    src = tmp_path / "cuda_src"
    shutil.copytree(jit.cuda_src_dir(), src)
    # a small kernel of its own that includes a shared header: the cache logic is the same for every
    # source, and this test then costs three small compiles instead of three of layout.cu
    (src / "cache_probe.cu").write_text('#include "common/utils.cuh"\n'
                                        'extern "C" __global__ void probe(int* p) { p[0] = DEEPEP_NUM_RANKS; }\n')
    monkeypatch.setattr(settings, "cuda_src_dir", str(src))
    spec = jit.KernelSpec.make("cache_probe.cu", ["probe"], {"DEEPEP_NUM_RANKS": 4})
    opts = jit.JitOptions(arch="sm_90")
    first = jit.build(spec, opts)
    second = jit.build(spec, opts)
    assert not first.from_cache and second.from_cache
    assert second.cubin_path == first.cubin_path
    # editing an included header (not the .cu itself) changes the key
    header = src / "common" / "utils.cuh"
    header.write_text(header.read_text() + "\n// edited\n")
    third = jit.build(spec, opts)
    assert not third.from_cache and third.key != first.key
    # other defines are another instance
    other = jit.build(jit.KernelSpec.make("cache_probe.cu", ["probe"], {"DEEPEP_NUM_RANKS": 8}), opts)
    assert other.key != third.key


def test_compile_error_carries_log_with_file_and_line(cache, tmp_path, monkeypatch):
    src = tmp_path / "cuda_src"
    shutil.copytree(jit.cuda_src_dir(), src)
    (src / "broken.cu").write_text('#include "common/utils.cuh"\n'
                                   'extern "C" __global__ void k(int* p) {\n'
                                   '    p[0] = undefined_name;\n}\n')
    monkeypatch.setattr(settings, "cuda_src_dir", str(src))
    with pytest.raises(DeepEPCompileError) as info:
        jit.build(jit.KernelSpec.make("broken.cu", ["k"]), jit.JitOptions(arch="sm_90"))
    text = str(info.value)
    assert "broken.cu(3)" in text and "undefined_name" in text, text


def test_jit_options_validation():
    with pytest.raises(DeepEPInvalid, match="route"):
        jit.JitOptions(route="clang")
    with pytest.raises(DeepEPInvalid, match="arch"):
        jit.JitOptions(arch="hopper").resolved_arch()
    with pytest.raises(DeepEPInvalid, match="source"):
        jit.build(jit.KernelSpec.make("nope.cu", ["k"]), jit.JitOptions(arch="sm_90"))


def test_ptxas_report_parser():
    text = ("ptxas info    : Compiling entry function 'k1' for 'sm_90'\n"
            "ptxas info    : Function properties for k1\n"
            "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
            "ptxas info    : Used 40 registers, used 1 barriers\n")
    assert jit.parse_ptxas_report(text) == {"k1": {"stack_bytes": 8, "spill_store_bytes": 4,
                                                   "spill_load_bytes": 4, "registers": 40}}


def test_public_names_have_docstrings():
    for name in ep.__all__:
        if name.startswith("__"):
            continue
        obj = getattr(ep, name)
        assert (obj.__doc__ or "").strip(), f"deepep_cupy.{name} has no docstring"
    for attr in dir(ep.Buffer):
        if not attr.startswith("_"):
            assert (getattr(ep.Buffer, attr).__doc__ or "").strip(), f"Buffer.{attr} has no docstring"


def test_build_set_builds_each_pair_once_and_reports_progress(cache):
    """BuildSet: duplicates built once, results by (spec, options), a '[k/N] compiled' line per
    kernel compiled; a second set over the same cache hits it and says nothing."""
    opts = jit.JitOptions(arch="sm_90")
    a = jit.KernelSpec.make("layout.cu", ["get_dispatch_layout"], {"DEEPEP_NUM_RANKS": 2, "DEEPEP_RANKS_PER_NODE": 2})
    b = kernels.CHECKS_SPEC
    lines = []
    with jit.BuildSet([(a, opts), (b, opts), (a, opts)], workers=2, report=lines.append) as builds:
        assert len(builds.jobs) == 2
        first = builds.results()
    assert [c.spec for c in first] == [a, b] and not any(c.from_cache for c in first)
    assert builds.result(a, opts).cubin_path == first[0].cubin_path
    done = sorted(line for line in lines if " compiled " in line)
    assert [line[:15] for line in done] == ["[1/2] compiled ", "[2/2] compiled "], lines
    assert any("compiled layout.cu [DEEPEP_NUM_RANKS=2 DEEPEP_RANKS_PER_NODE=2] (nvrtc, sm_90) in " in line
               for line in done), lines
    lines.clear()
    again = jit.build_many([(a, opts), (b, opts)], report=lines.append)
    assert all(c.from_cache for c in again) and [c.cubin_path for c in again] == [c.cubin_path for c in first]
    assert lines == []   # cache hits are silent


def test_long_compile_says_what_it_compiles_and_how_long(cache, monkeypatch):
    import time
    real = jit._compile_nvrtc

    def slow(*args):
        time.sleep(0.5)
        return real(*args)

    monkeypatch.setattr(jit, "_compile_nvrtc", slow)
    monkeypatch.setattr(jit, "PROGRESS_AFTER_S", 0.05)
    spec = jit.KernelSpec.make("layout.cu", ["get_dispatch_layout"], {"DEEPEP_NUM_RANKS": 4, "DEEPEP_RANKS_PER_NODE": 4})
    messages = []
    jit.build(spec, jit.JitOptions(arch="sm_90"), report=messages.append)
    what = "layout.cu [DEEPEP_NUM_RANKS=4 DEEPEP_RANKS_PER_NODE=4] (nvrtc, sm_90)"
    assert len(messages) == 2, messages
    assert messages[0].startswith(f"compiling {what}: first use, cached afterwards in {cache}"), messages
    assert messages[1].startswith(f"compiled {what} in "), messages
    messages.clear()
    jit.build(spec, jit.JitOptions(arch="sm_90"), report=messages.append)
    assert messages == []   # a cache hit says nothing


def test_progress_goes_to_stderr_on_rank_0_without_logging_setup(monkeypatch, capsys):
    """With no logging configured, a long compile's progress line goes to stderr, on one rank."""
    import logging
    monkeypatch.setattr(jit, "log", logging.Logger("deepep_cupy.jit.unconfigured"))  # no handler anywhere
    cases = [({}, "deepep_cupy: compiling x.cu (nvrtc, sm_90)"),
             ({"PMI_RANK": "0"}, "deepep_cupy [rank 0]: compiling x.cu (nvrtc, sm_90)"),
             ({"PMI_RANK": "1"}, ""),
             ({"DEEPEP_CUPY_JIT_PROGRESS": "0"}, ""),
             ({"PMI_RANK": "1", "DEEPEP_CUPY_JIT_PROGRESS": "all"}, "deepep_cupy [rank 1]: compiling x.cu (nvrtc, sm_90)")]
    for env, want in cases:
        for var in jit._MPI_RANK_VARS + ("DEEPEP_CUPY_JIT_PROGRESS",):
            monkeypatch.delenv(var, raising=False)
        for var, value in env.items():
            monkeypatch.setenv(var, value)
        jit._report("compiling x.cu (nvrtc, sm_90)")
        assert capsys.readouterr().err.strip() == want, env
