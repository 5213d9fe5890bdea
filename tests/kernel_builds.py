"""One compile of every kernel per route for the whole test run (imported by conftest.py and
test_jit.py as ``kernel_builds``).

The CPU tier compiles every spec of ``kernels.all_specs()`` for sm_90 on both JIT routes. Done one
test at a time that took minutes on the 2-core CI machine, so conftest.py starts all of them as soon
as collection ends, on a ``jit.BuildSet`` thread pool (NVRTC releases the GIL, nvcc is a
subprocess), longest first, into one cache folder for the run; the compile tests run last
(conftest.py moves them) and only pick up their results, so the other tests run while the kernels
compile. The cache folder is fresh for each run (the tests check real compiles, not cache hits) and
removed at the end. With fewer than 4 CPUs, 5 nvcc-route instances are skipped, with the reason
(``left_out``); ``DEEPEP_CUPY_TEST_KERNELS=all`` compiles them too.
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

    NVRTC (the default route) compiles every spec. In the reduced set, the nvcc route compiles each
    source once per configuration other than the rank count, at its largest rank count (the most
    unrolled, most register-hungry instance), plus every layout.cu variant (cheap; the 128-rank
    one is another code path): what nvcc adds over NVRTC, its front end and, for NVSHMEM kernels,
    ``-rdc`` and the device link with libnvshmem_device.a, does not depend on the rank count, which
    only changes -D constants. That leaves out 5 of 16 nvcc compiles, about 43 s of one core
    (of 172 s for all 32 on the CPU development machine).
    """
    why = route_unavailable(route)
    if why or route != "nvcc" or spec.source == "layout.cu" or full_matrix():
        return why
    defines = dict(spec.defines)
    if "DEEPEP_NUM_RANKS" not in defines:
        return None
    from deepep_cupy import kernels
    others = {k: v for k, v in defines.items() if k != "DEEPEP_NUM_RANKS"}
    largest = max(int(dict(s.defines)["DEEPEP_NUM_RANKS"]) for s in kernels.all_specs()
                  if s.source == spec.source and {k: v for k, v in dict(s.defines).items()
                                                   if k != "DEEPEP_NUM_RANKS"} == others
                  and "DEEPEP_NUM_RANKS" in dict(s.defines))
    if int(defines["DEEPEP_NUM_RANKS"]) == largest:
        return None
    return (f"reduced kernel set (fewer than 4 CPUs): the nvcc route compiles {spec.source} at "
            f"{largest} ranks and NVRTC at every rank count; DEEPEP_CUPY_TEST_KERNELS=all compiles this too")


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
