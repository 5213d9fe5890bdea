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
     * route ``"nvcc"``: ``nvcc -rdc`` plus a device link against ``libnvshmem_device.a``; this keeps
       NVSHMEM's device-initiated InfiniBand (IBGDA) for multi-node runs.
   The cubin and a JSON record (kernel names, ptxas resource report, compile time) are written to
   a temporary directory that is renamed into place, so concurrent ranks never see half a file.
   A failed compile raises ``DeepEPCompileError`` with the full log (it carries file:line).
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
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

from . import discovery
from .config import settings
from .errors import DeepEPCompileError, DeepEPInvalid

__all__ = ["JitOptions", "KernelSpec", "CompiledKernel", "build", "load", "cuda_src_dir",
           "ROUTES", "CACHE_SCHEMA"]

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


def _run(cmd: list, what: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
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
    obj = workdir / "kernel.o"
    out = _run([nvcc, "-rdc=true", "-c", *flags, str(src_path), "-o", str(obj)], "compile (-rdc)")
    out += "\n" + _run([nvcc, f"-arch={arch}", "-dlink", "-cubin", str(obj),
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
def cache_key(spec: KernelSpec, options: JitOptions) -> tuple:
    """(digest, arch, flags) for a spec: what the disk cache is keyed on."""
    root = cuda_src_dir()
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


def build(spec: KernelSpec, options: Optional[JitOptions] = None) -> CompiledKernel:
    """Compile ``spec`` (or take it from the disk cache). Needs no GPU.

    Raises:
        DeepEPCompileError: the compiler failed; the message holds its log.
    """
    options = options or JitOptions(route=settings.jit_route)
    root = cuda_src_dir()
    key, arch, flags = cache_key(spec, options)
    stem = Path(spec.source).stem
    final = Path(settings.cache_dir) / f"{stem}.{options.route}.{arch}.{key}"
    meta_path = final / "meta.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            return CompiledKernel(spec, str(final / "kernel.cubin"), key, options.route, arch, 0.0,
                                  True, meta.get("resources", {}))
        except (OSError, ValueError):
            log.warning("unreadable cache entry %s; recompiling", final)
    t0 = time.perf_counter()
    log.info("compiling %s (%s, %s, %d defines)...", spec.source, options.route, arch, len(spec.defines))
    Path(settings.cache_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{stem}.", dir=settings.cache_dir))
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
        for leftover in tmp.glob("kernel.o"):
            leftover.unlink()
        try:
            os.replace(tmp, final)  # atomic: another rank may have won the race, which is fine
        except OSError:
            if not meta_path.is_file():
                raise
        log.info("compiled %s in %.1f s", spec.source, seconds)
        return CompiledKernel(spec, str(final / "kernel.cubin"), key, options.route, arch, seconds,
                              False, resources)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
