"""One compile of every kernel per route for the whole test run (imported by conftest.py and
test_jit.py as ``kernel_builds``).

The CPU tier compiles every spec of ``kernels.all_specs()`` for sm_90 on both JIT routes. Done one
test at a time that took minutes on the 2-core CI machine, so conftest.py starts all of them as soon
as collection ends, on a ``jit.BuildSet`` thread pool (NVRTC releases the GIL, nvcc is a
subprocess), longest first, into one cache folder for the run; the compile tests run last
(conftest.py moves them) and only pick up their results, so the other tests run while the kernels
compile. The cache folder is fresh for each run (the tests check real compiles, not cache hits) and
removed at the end. With fewer than 4 CPUs a reduced set runs (``left_out`` says which pairs it
skips and why); ``DEEPEP_CUPY_TEST_KERNELS=all`` compiles them too.
"""

from __future__ import annotations

import os
import shutil
import tempfile

ARCH = "sm_90"
_state = {"builds": None, "cache_dir": None}


def route_unavailable(route: str):
    """None if ``route`` can compile here, else why not (the nvcc route needs nvcc)."""
    if route == "nvcc":
        try:
            from deepep_cupy import discovery
            discovery.nvcc_path()
        except Exception as e:  # noqa: BLE001
            return str(e)
    return None


def full_matrix() -> bool:
    """Every spec on both routes (``DEEPEP_CUPY_TEST_KERNELS=all``, or 4 CPUs or more), or the
    reduced nvcc set (``=reduced``, or fewer than 4 CPUs, as on the 2-core CI machine)."""
    mode = os.environ.get("DEEPEP_CUPY_TEST_KERNELS", "").strip().lower()
    if mode in ("all", "reduced"):
        return mode == "all"
    from deepep_cupy import jit
    return jit.default_workers() >= 4


def left_out(spec, route):
    """Why ``(spec, route)`` is not compiled in this run, or None.

    The full matrix compiles every spec on both routes. The reduced set (fewer than 4 CPUs, as on
    the 2-core CI machine, whose CPU tier is bound by these compiles) keeps every source and every
    configuration but the rank count:

    * each kernel at its largest rank count only (the most unrolled, most register-hungry instance;
      the rank count only changes -D constants). The GPU tier compiles the 2- and 4-rank instances
      through the same NVRTC route on every run of the GPU machine. layout.cu keeps all five
      variants (0.2 s each; the 128-rank one is another code path).
    * the nvcc route only for kernels that use NVSHMEM: what nvcc adds over NVRTC is ``-rdc`` and the
      device link with libnvshmem_device.a, which a kernel without NVSHMEM does not have.

    That keeps 14 of the 32 (spec, route) pairs: about 63 s of one core on the CPU development
    machine, against 111 s for the earlier reduced set (21 pairs) and 172 s for all 32.
    """
    why = route_unavailable(route)
    if why or full_matrix():
        return why
    again = "; DEEPEP_CUPY_TEST_KERNELS=all compiles this too"
    if route == "nvcc" and not spec.uses_nvshmem:
        return ("reduced kernel set (fewer than 4 CPUs): no NVSHMEM in this kernel, so the nvcc route adds no "
                "device link to what NVRTC compiles" + again)
    defines = dict(spec.defines)
    if "DEEPEP_NUM_RANKS" not in defines or spec.source == "layout.cu":
        return None
    from deepep_cupy import kernels
    others = {k: v for k, v in defines.items() if k != "DEEPEP_NUM_RANKS"}
    largest = max(int(dict(s.defines)["DEEPEP_NUM_RANKS"]) for s in kernels.all_specs()
                  if s.source == spec.source and {k: v for k, v in dict(s.defines).items()
                                                   if k != "DEEPEP_NUM_RANKS"} == others
                  and "DEEPEP_NUM_RANKS" in dict(s.defines))
    if int(defines["DEEPEP_NUM_RANKS"]) == largest:
        return None
    return (f"reduced kernel set (fewer than 4 CPUs): {spec.source} compiles at {largest} ranks (the same "
            f"source, other -D constants; the GPU tier compiles the rank counts it runs)" + again)


def options(route: str):
    from deepep_cupy import jit
    return jit.JitOptions(arch=ARCH, route=route)


def start(pairs) -> None:
    """Start compiling ``(spec, route)`` pairs (the routes that cannot compile here are left out)."""
    from deepep_cupy import jit
    if _state["builds"] is not None:
        return
    jobs = [(spec, options(route)) for spec, route in pairs if left_out(spec, route) is None]
    _state["cache_dir"] = tempfile.mkdtemp(prefix="deepep_cupy_test_kernels.")
    _state["builds"] = jit.BuildSet(jobs, cache_dir=_state["cache_dir"])


def get(spec, route):
    """The ``CompiledKernel`` of ``spec`` on ``route`` (waits for it; raises its compile error)."""
    builds = _state["builds"]
    if builds is None or (spec, options(route)) not in builds.futures:
        # not started from the collection hook (another way of running the test): build it now
        from deepep_cupy import jit
        if _state["cache_dir"] is None:
            _state["cache_dir"] = tempfile.mkdtemp(prefix="deepep_cupy_test_kernels.")
        return jit.build(spec, options(route), cache_dir=_state["cache_dir"])
    return builds.result(spec, options(route))


def summary():
    """One line for the end of the run, or None where nothing was compiled."""
    builds = _state["builds"]
    if builds is None or not builds.jobs:
        return None
    done = sum(1 for f in builds.futures.values() if f.done() and not f.cancelled())
    return (f"kernel builds: {done} of {len(builds.jobs)} (spec, route) pairs for {ARCH} on {builds.workers} "
            f"thread(s), {builds.wall_seconds():.0f} s from the end of collection to the last one; "
            f"{builds.compiler_seconds():.0f} s of compile time in all")


def stop() -> None:
    """Drop the builds not started, wait for the running ones, remove the cache folder."""
    builds, cache_dir = _state["builds"], _state["cache_dir"]
    if builds is not None:
        builds.close(cancel=True)
    if cache_dir is not None:
        shutil.rmtree(cache_dir, ignore_errors=True)
