"""Finding what kernels are built against: NVSHMEM, CUDA headers, NVRTC and nvcc.

Every lookup is cached; a missing piece raises ``DeepEPError`` naming what is missing and where it
was looked for.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Optional

from .config import settings
from .errors import DeepEPError

__all__ = ["NvshmemInstall", "CudaHeaders", "nvshmem", "cuda_headers", "nvrtc_version_string",
           "nvcc_path", "nvcc_version_string", "current_gpu_arch", "gpu_count"]


@dataclasses.dataclass(frozen=True)
class NvshmemInstall:
    """An NVSHMEM install: root, include/ and lib/ files, and the header version."""

    root: str
    include_dir: str
    host_lib: str
    device_lib: str
    version: tuple

    @property
    def version_str(self) -> str:
        """``"3.4.5"``."""
        return ".".join(map(str, self.version))

    @property
    def version_int(self) -> int:
        """``30405`` for 3.4.5 (used as a -D define)."""
        return self.version[0] * 10000 + self.version[1] * 100 + self.version[2]


def _header_version(include_dir: Path) -> tuple:
    text = (include_dir / "non_abi" / "nvshmem_version.h").read_text()
    return tuple(int(re.search(rf"#define NVSHMEM_VENDOR_{part}_VERSION\s+(\d+)", text).group(1))
                 for part in ("MAJOR", "MINOR", "PATCH"))


@functools.lru_cache(maxsize=None)
def _nvshmem_cached(home: Optional[str]) -> NvshmemInstall:
    candidates = []
    if home:
        candidates.append(Path(home))
    try:
        from cuda.pathfinder import find_nvidia_header_directory
        inc = find_nvidia_header_directory("nvshmem")
        if inc:
            candidates.append(Path(inc).parent)
    except Exception:  # pathfinder missing or too old: fall back to the paths below
        pass
    import importlib.util
    spec = importlib.util.find_spec("nvidia")
    for loc in (spec.submodule_search_locations if spec else []) or []:
        candidates.append(Path(loc) / "nvshmem")
    for root in candidates:
        inc, lib = root / "include", root / "lib"
        host = lib / "libnvshmem_host.so.3"
        dev = lib / "libnvshmem_device.a"
        if (inc / "nvshmem.h").is_file() and host.is_file():
            return NvshmemInstall(str(root), str(inc), str(host), str(dev), _header_version(inc))
    raise DeepEPError(
        "NVSHMEM not found: need include/nvshmem.h and lib/libnvshmem_host.so.3 under one of "
        f"{[str(c) for c in candidates] or '(no candidates)'}; install the wheel "
        "(pip install nvidia-nvshmem-cu13) or set NVSHMEM_HOME")


def nvshmem() -> NvshmemInstall:
    """The NVSHMEM install kernels compile against and the runtime loads ($NVSHMEM_HOME first)."""
    return _nvshmem_cached(settings.nvshmem_home)


@dataclasses.dataclass(frozen=True)
class CudaHeaders:
    """Include folders NVRTC needs: the CUDA runtime headers and CCCL (libcu++)."""

    cuda_include: str
    cccl_include: str


@functools.lru_cache(maxsize=None)
def cuda_headers() -> CudaHeaders:
    """Locate cuda_runtime.h and cuda/std (CCCL) via cuda.pathfinder, CUDA_PATH or /usr/local/cuda."""
    cuda_cands, cccl_cands = [], []
    try:
        from cuda.pathfinder import find_nvidia_header_directory
        for name, bucket in (("cudart", cuda_cands), ("cccl", cccl_cands)):
            d = find_nvidia_header_directory(name)
            if d:
                bucket.append(Path(d))
    except Exception:
        pass
    for env in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(env):
            cuda_cands.append(Path(os.environ[env]) / "include")
    cuda_cands.append(Path("/usr/local/cuda/include"))
    cuda_inc = next((c for c in cuda_cands if (c / "cuda_runtime.h").is_file()), None)
    if cuda_inc is None:
        raise DeepEPError(f"CUDA headers (cuda_runtime.h) not found in {[str(c) for c in cuda_cands]}; "
                          "install nvidia-cuda-runtime or set CUDA_PATH")
    cccl_cands += [cuda_inc / "cccl", cuda_inc]
    try:
        import cupy
        cccl_cands.append(Path(cupy.__file__).parent / "_core" / "include" / "cupy" / "_cccl" / "libcudacxx")
    except Exception:
        pass
    cccl = next((c for c in cccl_cands if (c / "cuda" / "std" / "cstdint").is_file()), None)
    if cccl is None:
        raise DeepEPError(f"CCCL headers (cuda/std/cstdint) not found in {[str(c) for c in cccl_cands]}")
    return CudaHeaders(str(cuda_inc), str(cccl))


@functools.lru_cache(maxsize=None)
def nvrtc_version_string() -> str:
    """``"nvrtc-13.0"`` from cuda.bindings' NVRTC."""
    try:
        from cuda.bindings import nvrtc
    except ImportError as e:
        raise DeepEPError("cuda.bindings (pip install cuda-bindings) is needed to compile kernels") from e
    res = nvrtc.nvrtcVersion()
    if res[0] != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise DeepEPError(f"NVRTC not loadable: {res[0]} (pip install nvidia-cuda-nvrtc)")
    return f"nvrtc-{res[1]}.{res[2]}"


@functools.lru_cache(maxsize=None)
def nvcc_path() -> str:
    """The nvcc executable: PATH, $CUDA_HOME/bin, /usr/local/cuda/bin."""
    cands = [shutil.which("nvcc")]
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            cands.append(os.path.join(os.environ[env], "bin", "nvcc"))
    cands.append("/usr/local/cuda/bin/nvcc")
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise DeepEPError("nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin): the 'nvcc' JIT "
                      "route needs the CUDA toolkit; use route 'nvrtc' instead")


@functools.lru_cache(maxsize=None)
def nvcc_version_string() -> str:
    """The last line of ``nvcc --version`` (its build id)."""
    out = subprocess.run([nvcc_path(), "--version"], capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1] if out.strip() else "nvcc-unknown"


def gpu_count() -> int:
    """Number of visible CUDA GPUs; 0 where there is no driver or no GPU."""
    try:
        import cupy
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


def current_gpu_arch() -> Optional[str]:
    """``"sm_90"`` for the current GPU, or None with no GPU."""
    if gpu_count() == 0:
        return None
    import cupy
    return f"sm_{cupy.cuda.Device().compute_capability}"
