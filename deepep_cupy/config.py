"""Settings and the high-throughput kernel configuration.

``settings`` holds the package's own process-wide knobs (cache folder, timeouts, value checks). Each
attribute is typed and documented; an environment variable is only its fallback default, read once
at import, here and nowhere else. (Other environment variables the package touches belong to other
tools' conventions: ``CUDA_PATH``/``CUDA_HOME`` in discovery.py and ``NVSHMEM_SYMMETRIC_SIZE`` in
runtime/nvshmem.py.) Change a setting in code with ``deepep_cupy.settings.<name> = value``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional, Union

from .errors import DeepEPInvalid

__all__ = ["Settings", "settings", "Config", "tuned_config"]


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return raw.strip().lower() not in ("0", "false", "no", "off", "")


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return default if raw is None else int(raw)


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return default if raw is None else float(raw)


def _env_agreement(name: str, default):
    """True / False / "auto" from the environment ("auto", or a boolean word)."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    raw = raw.strip().lower()
    return "auto" if raw == "auto" else raw not in ("0", "false", "no", "off", "")


@dataclasses.dataclass
class Settings:
    """Process-wide settings.

    Attributes:
        cache_dir: where compiled kernels are kept ($DEEPEP_CUPY_CACHE_DIR, default
            ~/.cache/deepep_cupy/kernels).
        cuda_src_dir: override of the kernel-source folder ($DEEPEP_CUPY_CUDA_SRC); None = built in.
        jit_route: default compile route, "nvrtc" or "nvcc" ($DEEPEP_CUPY_JIT_ROUTE); used wherever
            no ``JitOptions`` is given.
        timeout_seconds: how long a GPU wait loop spins before it gives up with an exception naming
            the rank and the phase ($DEEPEP_CUPY_TIMEOUT_S, default 100 s, like DeepEP's).
        check_values: add the blocking host-side check of expert ids before each launch that reads
            ``topk_idx`` (get_dispatch_layout, dispatch without a handle, low_latency_dispatch), which
            raises ``DeepEPInvalid`` on the very call that passes a bad id; for debugging: it costs one
            small device reduction and a host wait (~20 us) per call, and is skipped during
            CUDA-graph capture ($DEEPEP_CUPY_CHECK_VALUES, default off). Without it nothing waits:
            the kernels that read ``topk_idx`` always check the ids themselves (an id outside
            [-1, num_experts) is treated as -1) and report through an error record, which the next
            call on the buffer raises as ``DeepEPInvalid``, like timeouts.
        nvshmem_home: NVSHMEM install to use instead of the pip wheel ($NVSHMEM_HOME).
        num_sms: SMs of the high-throughput kernels when no Config is passed (set by
            ``Buffer.set_num_sms``); None = the tuned table.
        tuned_configs_path: the tuned defaults per rank count (JSON written by
            scripts/tune_intranode.py; $DEEPEP_CUPY_TUNED_CONFIGS).
        ll_combine_reduce_warps: warps of each 16-warp block of the fused low-latency combine that
            reduce tokens while the others send; 0 = every warp sends, then reduces
            ($DEEPEP_CUPY_LL_REDUCE_WARPS, default 4).
        ll_combine_tma: the low-latency combine sends rows to NVLink peers with TMA bulk stores
            instead of 16-byte stores from registers ($DEEPEP_CUPY_LL_COMBINE_TMA, default off;
            an experiment until measured).
        share_gpus: let more ranks than GPUs run on a node, for tests on a machine with fewer GPUs
            under CUDA MPS; kernels that wait on peers then take only their share of the SMs
            ($DEEPEP_CUPY_SHARE_GPUS, default off).
        check_agreement: before each collective call (layout, dispatch, combine, the low-latency
            calls, clean_low_latency_buffer) the ranks exchange the call's signature (shapes,
            dtypes, options) or the error their own checks raised, so every rank raises the same
            ``DeepEPInvalid`` naming the argument and the ranks instead of waiting for the timeout
            or computing a wrong result (``agreement.py``). ``True``: every call; ``False``: none;
            ``"auto"`` (default): the reference backend's calls, not the GPU's (a host round trip
            per call: +39 to +58 us of host time on the GPU machine, 2026-12-06, against 80 to 375
            us for the calls themselves; ``scripts/bench_agreement.py``). Skipped on one rank and during CUDA
            graph capture; every rank must use the same value ($DEEPEP_CUPY_CHECK_AGREEMENT:
            1/0/auto).
        check_each_call: after every dispatch, combine, layout and low-latency call (and hook),
            wait for the GPU and raise what its kernels reported (``Buffer.check``), so an error
            surfaces on the call that caused it instead of the next one; for debugging: it
            serialises the host with the GPU; skipped while a stream captures a CUDA graph
            ($DEEPEP_CUPY_CHECK_EACH_CALL, default off).
        intranode_dispatch: "direct" (default): a receiver whose outputs fit its symmetric receive
            arena has them written in place by its senders, one copy per row; "staged": the
            earlier kernel, every remote row through the receiver's staging area, two copies
            ($DEEPEP_CUPY_INTRANODE_DISPATCH; kept to compare the two).
        intranode_copy: how the direct dispatch moves rows: "registers" (default): a warp a token,
            16-byte loads and stores; "tma": TMA bulk copies through shared memory, a few producer
            warps a block over a balanced token range, while the other warps move the scales and
            top-k data (level with registers, not faster yet: docs/performance.md); "tma-grid": the
            same with each producer's rows strided over the whole grid (the split the copy probe
            found fastest; docs/intranode.md); "registers8": the register path with 8 loads a lane
            in flight instead of 16 at 2 ranks (the same code at more ranks)
            ($DEEPEP_CUPY_INTRANODE_COPY).
        intranode_notify: how a fresh direct dispatch (no handle, no num_worst_tokens) learns its
            receive layout: "fused" (default): the data kernel exchanges the counts itself, in the
            same round trip that tells each sender where its rows go (no notify kernel); "kernel":
            the notify kernel first, as the staged path does (kept to compare). Only the register
            copy paths fuse; every rank must use the same value ($DEEPEP_CUPY_INTRANODE_NOTIFY).
    """

    cache_dir: str = dataclasses.field(default_factory=lambda: os.environ.get(
        "DEEPEP_CUPY_CACHE_DIR", str(Path.home() / ".cache" / "deepep_cupy" / "kernels")))
    cuda_src_dir: Optional[str] = dataclasses.field(
        default_factory=lambda: os.environ.get("DEEPEP_CUPY_CUDA_SRC"))
    jit_route: str = dataclasses.field(
        default_factory=lambda: os.environ.get("DEEPEP_CUPY_JIT_ROUTE", "nvrtc"))
    timeout_seconds: float = dataclasses.field(
        default_factory=lambda: _env_float("DEEPEP_CUPY_TIMEOUT_S", 100.0))
    check_values: bool = dataclasses.field(
        default_factory=lambda: _env_bool("DEEPEP_CUPY_CHECK_VALUES", False))
    nvshmem_home: Optional[str] = dataclasses.field(
        default_factory=lambda: os.environ.get("NVSHMEM_HOME"))
    num_sms: Optional[int] = None
    tuned_configs_path: str = dataclasses.field(default_factory=lambda: os.environ.get(
        "DEEPEP_CUPY_TUNED_CONFIGS", str(Path(__file__).with_name("tuned_configs.json"))))
    ll_combine_reduce_warps: int = dataclasses.field(
        default_factory=lambda: _env_int("DEEPEP_CUPY_LL_REDUCE_WARPS", 4))
    ll_combine_tma: bool = dataclasses.field(
        default_factory=lambda: _env_bool("DEEPEP_CUPY_LL_COMBINE_TMA", False))
    share_gpus: bool = dataclasses.field(default_factory=lambda: _env_bool("DEEPEP_CUPY_SHARE_GPUS", False))
    check_agreement: Union[bool, str] = dataclasses.field(
        default_factory=lambda: _env_agreement("DEEPEP_CUPY_CHECK_AGREEMENT", "auto"))
    check_each_call: bool = dataclasses.field(
        default_factory=lambda: _env_bool("DEEPEP_CUPY_CHECK_EACH_CALL", False))
    intranode_dispatch: str = dataclasses.field(
        default_factory=lambda: os.environ.get("DEEPEP_CUPY_INTRANODE_DISPATCH", "direct"))
    intranode_copy: str = dataclasses.field(
        default_factory=lambda: os.environ.get("DEEPEP_CUPY_INTRANODE_COPY", "registers"))
    intranode_notify: str = dataclasses.field(
        default_factory=lambda: os.environ.get("DEEPEP_CUPY_INTRANODE_NOTIFY", "fused"))

    @property
    def timeout_ns(self) -> int:
        """``timeout_seconds`` as the kernels' uint64 nanosecond deadline, saturated (a timeout past
        2^64 ns is a wait without end, not a value the parameter packer must refuse)."""
        return min(int(self.timeout_seconds * 1e9), (1 << 64) - 1)


settings = Settings()


@dataclasses.dataclass(frozen=True)
class Config:
    """SM budget and chunking of the high-throughput kernels (DeepEP's ``Config``).

    Arguments:
        num_sms: SMs the intranode kernels occupy: their grid size, every block both sending and
            receiving (even, as DeepEP requires, so configs carry over).
        num_max_nvl_chunked_send_tokens, num_max_nvl_chunked_recv_tokens,
        num_max_rdma_chunked_send_tokens, num_max_rdma_chunked_recv_tokens: DeepEP's chunk
            sizes, kept for API parity; the intranode kernels publish fixed 32-token chunks and
            read none of them.
    """

    num_sms: int = 20
    num_max_nvl_chunked_send_tokens: int = 6
    num_max_nvl_chunked_recv_tokens: int = 256
    num_max_rdma_chunked_send_tokens: int = 6
    num_max_rdma_chunked_recv_tokens: int = 256

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise DeepEPInvalid(f"Config.{f.name}: expected a positive int, got {v!r}")
        if self.num_sms % 2:
            raise DeepEPInvalid(f"Config.num_sms: expected an even number, got {self.num_sms}")


_TUNED_CACHE: dict = {}      # path -> (when last checked, the file's mtime, the parsed table)
_TUNED_RECHECK_S = 1.0       # how often a path's mtime is looked at again


def _tuned_table(path: str) -> dict:
    """The tuned table at ``path``, parsed once per file version. A dispatch or combine without a
    config asks for it on every call, so the file's mtime is looked at most once a second (a stat
    per call cost ~10 % of a jitted step's Python, docs/performance.md); a re-tune written by
    ``scripts/tune_intranode.py --write`` is seen within that second, another path at once."""
    import json
    import time
    now = time.monotonic()
    hit = _TUNED_CACHE.get(path)
    if hit is not None and now - hit[0] < _TUNED_RECHECK_S:
        return hit[2]
    try:
        mtime = Path(path).stat().st_mtime_ns
    except OSError:
        mtime, table = None, {}
    else:
        if hit is not None and hit[1] == mtime:
            table = hit[2]
        else:
            try:
                table = json.loads(Path(path).read_text())
            except (OSError, ValueError):
                table = {}
    if len(_TUNED_CACHE) > 16:
        _TUNED_CACHE.clear()
    _TUNED_CACHE[path] = (now, mtime, table)
    return table


def tuned_config(kind: str, num_ranks: int) -> Config:
    """The default Config for ``kind`` ("dispatch" or "combine") on ``num_ranks`` ranks: the tuned
    table's entry for that rank count (or the nearest smaller one), with ``settings.num_sms``
    overriding the SM count when set."""
    table = _tuned_table(settings.tuned_configs_path).get(kind, {})
    known = sorted(int(k) for k in table)
    pick = max((k for k in known if k <= num_ranks), default=known[0] if known else None)
    entry = dict(table.get(str(pick), {})) if pick is not None else {}
    fields = {f.name for f in dataclasses.fields(Config)}
    cfg = Config(**{k: v for k, v in entry.items() if k in fields})
    if settings.num_sms is not None:
        cfg = dataclasses.replace(cfg, num_sms=settings.num_sms)
    return cfg
