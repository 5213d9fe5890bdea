"""Kernel JIT: cuda_src/*.cu -> cubin (NVRTC or nvcc) -> on-disk cache -> CuPy module.

How a kernel goes from source to a launch:

1. ``build(KernelSpec, JitOptions)`` reads ``cuda_src/<name>.cu`` and every ``#include "..."`` it
   pulls from cuda_src/ (transitively), and hashes them with the defines, the flags, the compiler's
   version and, for NVSHMEM kernels, the NVSHMEM header version. That digest names a directory in
   the disk cache (``Settings.cache_dir``). A hit re-reads the (small) cuda_src files to follow their
   includes, re-hashes them only when a file's mtime or size changed, and reads one JSON record.
2. On a miss it compiles to a cubin, with no GPU needed:
     * route ``"nvrtc"`` (default): cuda.bindings' NVRTC, header-only NVSHMEM (every device
       function inlined; NVLink/P2P and CPU-proxy transports, no IBGDA);
     * route ``"nvcc"``: ``nvcc -rdc=true -cubin`` (device code only) plus a device link against
       ``libnvshmem_device.a``; this keeps NVSHMEM's device-initiated InfiniBand (IBGDA) for
       multi-node runs.
   The cubin and a JSON record (kernel names, ptxas resource report, compile time) are written to
   a temporary directory that is renamed into place, so concurrent ranks never see half a file.
   A failed compile raises ``DeepEPCompileError`` with the full log (it carries file:line).
   A compile that runs past ``PROGRESS_AFTER_S`` (1 s) says what it compiles and how long it took
   (``_report``: the ``deepep_cupy.jit`` logger, or stderr on one rank where logging is not set up);
   cache hits are silent. ``build_many``/``BuildSet`` compile several specs at once on threads.
3. ``load(CompiledKernel)`` hands the cubin to ``cupy.RawModule(path=...)``; NVSHMEM kernels are then
   registered with the NVSHMEM runtime (``nvshmemx_cumodule_init``) by the caller.

Kernel entry points are ``extern "C"``; compile-time constants (rank counts, tile sizes) come in as
``-D`` defines, so one JIT instance is made per configuration actually used, and both routes find
kernels by their plain names.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

from . import discovery
from .config import settings
from .errors import DeepEPCompileError, DeepEPInvalid

__all__ = ["JitOptions", "KernelSpec", "CompiledKernel", "build", "build_many", "BuildSet", "load",
           "cuda_src_dir", "ROUTES", "CACHE_SCHEMA"]

log = logging.getLogger(__name__)

ROUTES = ("nvrtc", "nvcc")
CACHE_SCHEMA = 1
_INCLUDE_RE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class JitOptions:
    """How to compile.

    Attributes:
        arch: target like ``"sm_90"``; ``None`` means the current GPU's, or sm_90 with no GPU.
        route: ``"nvrtc"`` (header-only NVSHMEM, fast, no IBGDA) or ``"nvcc"`` (device link with
            ``libnvshmem_device.a``, keeps IBGDA).
        line_info: emit line info (for compute-sanitizer and ncu source views).
        extra_flags: more compiler flags, appended last.
    """

    arch: Optional[str] = None
    route: str = "nvrtc"
    line_info: bool = True
    extra_flags: tuple = ()

    def resolved_arch(self) -> str:
        """The arch string to compile for (``sm_XY``)."""
        if self.arch is not None:
            if not re.fullmatch(r"sm_\d+a?", self.arch):
                raise DeepEPInvalid(f"JitOptions.arch: expected like 'sm_90', got {self.arch!r}")
            return self.arch
        return discovery.current_gpu_arch() or "sm_90"

    def __post_init__(self):
        if self.route not in ROUTES:  # also catches a bad settings.jit_route
            raise DeepEPInvalid(f"JitOptions.route: expected one of {ROUTES}, got {self.route!r}")


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One JIT instance: a source file of cuda_src/, its entry points and its defines.

    Attributes:
        source: file name under cuda_src/, e.g. ``"layout.cu"``.
        kernels: the ``extern "C"`` entry points to look up after loading.
        defines: compile-time constants, passed as ``-DNAME=VALUE``.
        uses_nvshmem: the source calls the NVSHMEM device API (adds its headers; needs
            ``cumodule_init`` after loading).
    """

    source: str
    kernels: tuple
    defines: tuple = ()
    uses_nvshmem: bool = False

    @staticmethod
    def make(source: str, kernels: Sequence[str], defines: Optional[Mapping[str, object]] = None,
             uses_nvshmem: bool = False) -> "KernelSpec":
        """Build a spec with defines given as a mapping (stored sorted, so the key is stable)."""
        items = tuple(sorted((str(k), str(v)) for k, v in (defines or {}).items()))
        return KernelSpec(source, tuple(kernels), items, uses_nvshmem)


@dataclasses.dataclass(frozen=True)
class CompiledKernel:
    """A compiled cubin in the disk cache.

    Attributes:
        spec: what was compiled. cubin_path: the cubin file. key: the cache digest.
        route, arch: how. compile_seconds: 0.0 on a cache hit. from_cache: hit or miss.
        resources: ptxas report per kernel, e.g. ``{"layout": {"registers": 32, "spill_bytes": 0,
            "stack_bytes": 0, ...}}`` (empty where the compiler printed none).
    """

    spec: KernelSpec
    cubin_path: str
    key: str
    route: str
    arch: str
    compile_seconds: float
    from_cache: bool
    resources: dict


def cuda_src_dir() -> Path:
    """Where the kernel sources live: $DEEPEP_CUPY_CUDA_SRC, the repo's cuda_src/, or the copy
    installed inside the package (``deepep_cupy/_cuda_src``)."""
    if settings.cuda_src_dir:
        return Path(settings.cuda_src_dir)
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "cuda_src", here / "_cuda_src"):
        if (cand / "common").is_dir():
            return cand
    raise DeepEPCompileError(f"cuda_src/ not found next to {here} (set DEEPEP_CUPY_CUDA_SRC)")


# ------------------------------------------------------------------------------------------------
# source digest: the file and every cuda_src header it includes, re-checked by mtime on each call
# ------------------------------------------------------------------------------------------------
_digest_memo: dict = {}
_memo_lock = threading.Lock()


def _source_files(root: Path, source: str) -> list:
    seen, order, todo = set(), [], [source]
    while todo:
        rel = todo.pop()
        if rel in seen:
            continue
        path = root / rel
        if not path.is_file():
            if rel == source:
                raise DeepEPInvalid(f"KernelSpec.source: {path} does not exist")
            continue  # a system/NVSHMEM header: versioned separately
        seen.add(rel)
        order.append(rel)
        for inc in _INCLUDE_RE.findall(path.read_text()):
            # includes resolve against cuda_src/ (-I) or the including file's folder
            local = str((Path(rel).parent / inc).as_posix())
            todo.append(local if (root / local).is_file() else inc)
    return sorted(order)


def _source_digest(root: Path, source: str) -> str:
    """sha256 over the source and its cuda_src includes; memoised on (path, mtime, size)."""
    files = _source_files(root, source)
    stamp = tuple((f, os.stat(root / f).st_mtime_ns, os.stat(root / f).st_size) for f in files)
    with _memo_lock:
        hit = _digest_memo.get((str(root), source))
        if hit and hit[0] == stamp:
            return hit[1]
    h = hashlib.sha256()
    for f in files:
        h.update(f.encode() + b"\0" + (root / f).read_bytes() + b"\0")
    digest = h.hexdigest()
    with _memo_lock:
        _digest_memo[(str(root), source)] = (stamp, digest)
    return digest


# ------------------------------------------------------------------------------------------------
# flags
# ------------------------------------------------------------------------------------------------
def _common_flags(spec: KernelSpec, arch: str, opts: JitOptions, root: Path) -> list:
    flags = ["-std=c++17", f"-I{root}"] + [f"-D{k}={v}" for k, v in spec.defines]
    if opts.line_info:
        flags.append("-lineinfo")
    if spec.uses_nvshmem:
        flags.append(f"-I{discovery.nvshmem().include_dir}")
        flags.append(f"-DDEEPEP_NVSHMEM_VERSION={discovery.nvshmem().version_int}")
    return flags


def _nvrtc_flags(spec: KernelSpec, arch: str, opts: JitOptions, root: Path) -> list:
    cuda = discovery.cuda_headers()
    flags = [f"--gpu-architecture={arch}", "-default-device", "--ptxas-options=-v",
             f"-I{cuda.cccl_include}", f"-I{cuda.cuda_include}"]
    flags += _common_flags(spec, arch, opts, root)
    if spec.uses_nvshmem:
        flags.append("-D__NVSHMEM_NUMBA_SUPPORT__")  # header-only: every device function inline
    return flags + list(opts.extra_flags)


def _nvcc_flags(spec: KernelSpec, arch: str, opts: JitOptions, root: Path) -> list:
    flags = [f"-arch={arch}", "-Xptxas=-v"] + _common_flags(spec, arch, opts, root)
    return flags + list(opts.extra_flags)


def _compiler_id(route: str) -> str:
    if route == "nvrtc":
        return discovery.nvrtc_version_string()
    return discovery.nvcc_version_string()


# ------------------------------------------------------------------------------------------------
# compilers
# ------------------------------------------------------------------------------------------------
def _compile_nvrtc(src_path: Path, flags: list) -> tuple:
    from cuda.bindings import nvrtc

    def check(result, what):
        if result[0] != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise DeepEPCompileError(f"NVRTC {what} failed: {result[0]}")
        return result[1] if len(result) > 1 else None

    text = src_path.read_bytes()
    prog = check(nvrtc.nvrtcCreateProgram(text, str(src_path).encode(), 0, [], []), "create")
    try:
        encoded = [f.encode() for f in flags]
        status = nvrtc.nvrtcCompileProgram(prog, len(encoded), encoded)[0]
        size = check(nvrtc.nvrtcGetProgramLogSize(prog), "log size")
        buf = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, buf)
        compile_log = buf.decode(errors="replace").rstrip("\0 \n")
        if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise DeepEPCompileError(
                f"NVRTC failed to compile {src_path} ({status.name}):\n{compile_log}\n"
                f"flags: {' '.join(flags)}")
        size = check(nvrtc.nvrtcGetCUBINSize(prog), "cubin size")
        cubin = b" " * size
        check(nvrtc.nvrtcGetCUBIN(prog, cubin), "get cubin")
        return bytes(cubin), compile_log
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


_tls = threading.local()   # .owner: the BuildSet whose thread this is (its close() kills our nvcc)


def _kill_group(popen) -> None:
    try:
        os.killpg(popen.pid, signal.SIGKILL)
    except (AttributeError, OSError):   # no process groups here, or it has ended
        popen.kill()


def _run(cmd: list, what: str) -> str:
    owner = getattr(_tls, "owner", None)
    if owner is None:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    else:
        # own process group, so that close() can stop nvcc together with its cicc/ptxas children
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) as popen:
            if not owner._track(popen):
                _kill_group(popen)
            stdout, stderr = popen.communicate()
            owner._untrack(popen)
        proc = subprocess.CompletedProcess(cmd, popen.returncode, stdout, stderr)
        if owner.cancelled.is_set():
            raise DeepEPCompileError(f"nvcc {what}: cancelled (BuildSet closed)")
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        raise DeepEPCompileError(f"nvcc failed to {what} (exit {proc.returncode}):\n{out}\n"
                                 f"command: {' '.join(cmd)}")
    return out


def _compile_nvcc(src_path: Path, flags: list, arch: str, uses_nvshmem: bool, workdir: Path) -> tuple:
    nvcc = discovery.nvcc_path()
    cubin_path = workdir / "kernel.cubin"
    if not uses_nvshmem:
        out = _run([nvcc, "-cubin", *flags, str(src_path), "-o", str(cubin_path)], "compile")
        return cubin_path.read_bytes(), out
    device_lib = discovery.nvshmem().device_lib
    if not os.path.isfile(device_lib):
        raise DeepEPCompileError(f"the nvcc route links {device_lib}, which does not exist; "
                                 "use route 'nvrtc' or an NVSHMEM install with its device library")
    # device code only: a relocatable cubin (no host-side cudafe++/gcc pass, which -c would add and
    # which cost a third of the time), then the device link; same cubin as linking a -rdc -c object
    rel = workdir / "kernel.rdc.cubin"
    out = _run([nvcc, "-rdc=true", "-cubin", *flags, str(src_path), "-o", str(rel)], "compile (-rdc)")
    out += "\n" + _run([nvcc, f"-arch={arch}", "-dlink", "-cubin", str(rel),
                        discovery.nvshmem().device_lib, "-o", str(cubin_path)],
                       "device-link with libnvshmem_device.a")
    return cubin_path.read_bytes(), out


_RES_FUNC = re.compile(r"Compiling entry function '([^']+)'|Function properties for (\S+)")
_RES_REGS = re.compile(r"Used (\d+) registers")
_RES_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas_report(text: str) -> dict:
    """Pull registers, stack frame and spills per entry function out of a ptxas ``-v`` log."""
    out, current = {}, None
    for line in text.splitlines():
        m = _RES_FUNC.search(line)
        if m:
            current = m.group(1) or m.group(2)
            out.setdefault(current, {})
            continue
        if current is None:
            continue
        m = _RES_STACK.search(line)
        if m:
            out[current].update(stack_bytes=int(m.group(1)), spill_store_bytes=int(m.group(2)),
                                spill_load_bytes=int(m.group(3)))
        m = _RES_REGS.search(line)
        if m:
            out[current]["registers"] = int(m.group(1))
    return out


# ------------------------------------------------------------------------------------------------
# build + load
# ------------------------------------------------------------------------------------------------
def cache_key(spec: KernelSpec, options: JitOptions, src_dir=None) -> tuple:
    """(digest, arch, flags) for a spec: what the disk cache is keyed on."""
    root = Path(src_dir) if src_dir is not None else cuda_src_dir()
    arch = options.resolved_arch()
    flags = (_nvrtc_flags if options.route == "nvrtc" else _nvcc_flags)(spec, arch, options, root)
    h = hashlib.sha256()
    for part in (f"schema={CACHE_SCHEMA}", options.route, arch, _compiler_id(options.route),
                 _source_digest(root, spec.source), " ".join(flags), repr(spec.kernels)):
        h.update(part.encode() + b"\0")
    if spec.uses_nvshmem:
        nv = discovery.nvshmem()
        h.update(f"nvshmem={nv.version_str}@{nv.root}".encode())
    return h.hexdigest()[:32], arch, flags


def _describe(spec: KernelSpec, route: str, arch: str) -> str:
    defines = " ".join(f"{k}={v}" for k, v in spec.defines)
    return f"{spec.source}{f' [{defines}]' if defines else ''} ({route}, {arch})"


# A compile that takes longer than this prints what it is compiling; faster ones and cache hits say
# nothing (at INFO on the ``deepep_cupy.jit`` logger, they do).
PROGRESS_AFTER_S = 1.0
_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK", "SLURM_PROCID")


def _report(msg: str) -> None:
    """A progress line: to the ``deepep_cupy.jit`` logger at INFO; where logging is not set up at
    all (no handler anywhere), to stderr, on one rank only (every rank compiles the same kernels).
    ``DEEPEP_CUPY_JIT_PROGRESS=0`` silences the stderr line, ``=all`` prints it on every rank."""
    log.info(msg)
    if log.hasHandlers():
        return
    mode = os.environ.get("DEEPEP_CUPY_JIT_PROGRESS", "1").strip().lower()
    if mode in ("0", "off", "no", "false"):
        return
    rank = next((os.environ[v] for v in _MPI_RANK_VARS if os.environ.get(v)), None)
    if mode != "all" and rank not in (None, "0"):
        return
    prefix = "deepep_cupy" if rank is None else f"deepep_cupy [rank {rank}]"
    print(f"{prefix}: {msg}", file=sys.stderr, flush=True)


def build(spec: KernelSpec, options: Optional[JitOptions] = None, *, cache_dir=None,
          src_dir=None, report=None, report_done: bool = True) -> CompiledKernel:
    """Compile ``spec`` (or take it from the disk cache). Needs no GPU. Thread-safe: several
    builds may run at once (NVRTC releases the GIL; nvcc is a subprocess); see ``build_many``.

    Args:
        cache_dir: the disk cache (default ``settings.cache_dir``).
        src_dir: the kernel sources (default ``cuda_src_dir()``).
        report: where progress lines go (default ``_report``: the logger, or stderr).
        report_done: also report the end of a long compile (``BuildSet`` reports it itself,
            with its count).

    A compile that runs past ``PROGRESS_AFTER_S`` says what it is compiling, and how long it took
    once done (``_report``); cache hits are silent.

    Raises:
        DeepEPCompileError: the compiler failed; the message holds its log.
    """
    options = options or JitOptions(route=settings.jit_route)
    root = Path(src_dir) if src_dir is not None else cuda_src_dir()
    cache = Path(cache_dir if cache_dir is not None else settings.cache_dir)
    key, arch, flags = cache_key(spec, options, root)
    stem = Path(spec.source).stem
    final = cache / f"{stem}.{options.route}.{arch}.{key}"
    meta_path = final / "meta.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            return CompiledKernel(spec, str(final / "kernel.cubin"), key, options.route, arch, 0.0,
                                  True, meta.get("resources", {}))
        except (OSError, ValueError):
            log.warning("unreadable cache entry %s; recompiling", final)
    what = _describe(spec, options.route, arch)
    log.debug("compiling %s into %s", what, cache)
    announced = threading.Event()
    report = report or _report

    def announce():
        announced.set()
        report(f"compiling {what}: first use, cached afterwards in {cache}")

    timer = threading.Timer(PROGRESS_AFTER_S, announce)
    timer.daemon = True
    t0 = time.perf_counter()
    timer.start()
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{stem}.", dir=cache))
    try:
        if options.route == "nvrtc":
            cubin, compile_log = _compile_nvrtc(root / spec.source, flags)
        else:
            cubin, compile_log = _compile_nvcc(root / spec.source, flags, arch, spec.uses_nvshmem, tmp)
        seconds = time.perf_counter() - t0
        resources = {k: v for k, v in parse_ptxas_report(compile_log).items() if k in spec.kernels}
        (tmp / "kernel.cubin").write_bytes(cubin)
        (tmp / "meta.json").write_text(json.dumps(
            {"spec": dataclasses.asdict(spec), "route": options.route, "arch": arch, "flags": flags,
             "compile_seconds": seconds, "resources": resources, "log": compile_log}, indent=1))
        for leftover in (tmp / "kernel.o", tmp / "kernel.rdc.cubin"):
            if leftover.exists():
                leftover.unlink()
        try:
            os.replace(tmp, final)  # atomic: another rank may have won the race, which is fine
        except OSError:
            if not meta_path.is_file():
                raise
        timer.cancel()
        if announced.is_set() and report_done:
            report(f"compiled {what} in {seconds:.1f} s")
        else:
            log.info("compiled %s in %.1f s", what, seconds)
        return CompiledKernel(spec, str(final / "kernel.cubin"), key, options.route, arch, seconds,
                              False, resources)
    finally:
        timer.cancel()
        shutil.rmtree(tmp, ignore_errors=True)


def _cost_estimate(job, src_dir: Path) -> float:
    """Rough relative compile cost of a (spec, options) pair, to start the longest first."""
    spec, options = job
    try:
        size = (src_dir / spec.source).stat().st_size
    except OSError:
        size = 0
    return (size + (40_000 if spec.uses_nvshmem else 0)) * (1.5 if options.route == "nvcc" else 1.0)


def default_workers() -> int:
    """Threads for ``build_many``: the CPUs this process may use, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


class BuildSet:
    """Several (spec, options) builds running at once on a thread pool (NVRTC releases the GIL;
    nvcc runs as a subprocess), longest first, each compiled once, with a progress line
    ``[k/N] compiled ... in S s`` per kernel actually compiled (cache hits are silent).

        with jit.BuildSet([(spec, JitOptions(route="nvrtc")), ...]) as builds:
            compiled = builds.result(spec, options)   # waits for that one; raises its error

    Args:
        jobs: (KernelSpec, JitOptions) pairs; duplicates are built once.
        workers: threads (default ``default_workers()``).
        cache_dir, src_dir: as for ``build`` (fixed at construction, so later changes to
            ``settings`` do not reach builds already queued).
        report: where the progress lines go (default: the ``deepep_cupy.jit`` logger, or stderr).
    """

    def __init__(self, jobs, workers: Optional[int] = None, cache_dir=None, src_dir=None, report=None):
        import concurrent.futures

        unique = list(dict.fromkeys((spec, opts or JitOptions(route=settings.jit_route)) for spec, opts in jobs))
        self.cache_dir = str(cache_dir if cache_dir is not None else settings.cache_dir)
        self.src_dir = str(src_dir if src_dir is not None else cuda_src_dir())
        self.jobs = sorted(unique, key=lambda job: _cost_estimate(job, Path(self.src_dir)), reverse=True)
        self.workers = max(1, min(workers or default_workers(), len(self.jobs) or 1))
        self.started = time.perf_counter()
        self.finished_at = None
        self.cancelled = threading.Event()
        self._sink = report or _report
        self._done = 0
        self._procs = set()
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="deepep-jit")
        self.futures = {job: self._pool.submit(self._one, job) for job in self.jobs}

    def _report(self, msg: str) -> None:
        if not self.cancelled.is_set():   # quiet once closed (e.g. after a test run was interrupted)
            self._sink(msg)

    def _track(self, popen) -> bool:
        with self._lock:
            self._procs.add(popen)
            return not self.cancelled.is_set()

    def _untrack(self, popen) -> None:
        with self._lock:
            self._procs.discard(popen)

    def _one(self, job) -> CompiledKernel:
        spec, options = job
        _tls.owner = self
        try:
            compiled = build(spec, options, cache_dir=self.cache_dir, src_dir=self.src_dir,
                             report=self._report, report_done=False)
        finally:
            _tls.owner = None
            with self._lock:
                self._done += 1
                done = self._done
                if done == len(self.jobs):
                    self.finished_at = time.perf_counter()
        if not compiled.from_cache:
            self._report(f"[{done}/{len(self.jobs)}] compiled {_describe(spec, options.route, compiled.arch)} "
                         f"in {compiled.compile_seconds:.1f} s")
        return compiled

    def result(self, spec: KernelSpec, options: Optional[JitOptions] = None) -> CompiledKernel:
        """The build of ``spec`` with ``options`` (waits for it); raises what the build raised."""
        return self.futures[(spec, options or JitOptions(route=settings.jit_route))].result()

    def results(self) -> list:
        """Every build, in the order given (waits); raises the first error."""
        return [f.result() for f in self.futures.values()]

    def compiler_seconds(self) -> float:
        """Summed compile time of the builds finished so far (cache hits count 0)."""
        total = 0.0
        for f in self.futures.values():
            if f.done() and not f.cancelled() and f.exception() is None:
                total += f.result().compile_seconds
        return total

    def wall_seconds(self) -> float:
        """From construction to the last build's end (or to now, while some still run)."""
        return (self.finished_at or time.perf_counter()) - self.started

    def close(self, cancel: bool = True) -> None:
        """Wait for the builds to end. With ``cancel``: drop those not yet started, kill the running
        nvcc processes and stay quiet; an NVRTC compile under way cannot be stopped and is waited for."""
        if cancel:
            self.cancelled.set()
            with self._lock:
                for popen in self._procs:
                    _kill_group(popen)
        self._pool.shutdown(wait=True, cancel_futures=cancel)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close(cancel=exc[0] is not None)


def build_many(jobs, workers: Optional[int] = None, cache_dir=None, report=None) -> list:
    """Compile several (spec, options) pairs at once (``BuildSet``); returns the ``CompiledKernel``
    of each pair in the order given, raising the first compile error. Use it to warm the cache
    for a set of kernels (scripts/warm_cache.py) instead of one ``build`` after another."""
    jobs = [(spec, opts or JitOptions(route=settings.jit_route)) for spec, opts in jobs]
    with BuildSet(jobs, workers=workers, cache_dir=cache_dir, report=report) as builds:
        return [builds.result(spec, opts) for spec, opts in jobs]


class LoadedKernel:
    """A cubin loaded into the current device's context, with its entry points as CuPy kernels."""

    def __init__(self, compiled: CompiledKernel):
        import cupy

        self.compiled = compiled
        t0 = time.perf_counter()
        self.module = cupy.RawModule(path=compiled.cubin_path)
        self.functions = {name: self.module.get_function(name) for name in compiled.spec.kernels}
        self.load_seconds = time.perf_counter() - t0

    @property
    def handle(self) -> int:
        """The ``CUmodule`` pointer (what ``nvshmemx_cumodule_init`` takes)."""
        return int(self.module.module.ptr)

    def __getitem__(self, name: str):
        return self.functions[name]


_loaded: dict = {}


@atexit.register
def _unload_at_exit() -> None:
    # unload modules while CuPy is still whole, rather than in interpreter teardown order
    _loaded.clear()


def load(spec: KernelSpec, options: Optional[JitOptions] = None) -> LoadedKernel:
    """Build (or fetch) ``spec`` and load it on the current device; memoised per device and key."""
    import cupy

    compiled = build(spec, options)
    memo_key = (cupy.cuda.Device().id, compiled.cubin_path)
    mod = _loaded.get(memo_key)
    if mod is None:
        mod = _loaded[memo_key] = LoadedKernel(compiled)
    return mod


def forget_loaded(predicate=None) -> list:
    """Drop memoised modules (all, or those for which ``predicate(LoadedKernel)`` is true) and
    return them; used when the NVSHMEM runtime is finalised, since its modules die with it."""
    dropped = []
    for k in list(_loaded):
        if predicate is None or predicate(_loaded[k]):
            dropped.append(_loaded.pop(k))
    return dropped
