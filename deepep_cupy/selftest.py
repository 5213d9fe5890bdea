"""Runtime self-test on the GPUs: a symmetric-memory exchange between all ranks of a Buffer.

``symmetric_exchange(buf)`` runs cuda_src/selftest.cu: every rank puts a rank-stamped pattern
into its right neighbour's symmetric memory with an NVSHMEM put + signal, waits (bounded) for its
left neighbour's, then stores a second pattern through the neighbour's NVLink mapping
(``nvshmem_ptr``); both are checked on the host. It proves the whole chain (mpi4py -> NVSHMEM ->
JIT module with NVSHMEM device calls -> NVLink) and is what the demo and the GPU tests run first.
"""

from __future__ import annotations

import dataclasses
import time

from . import jit
from .errors import DeepEPError, DeepEPInvalid
from .kernel_errors import ErrorRecordArray

__all__ = ["ExchangeReport", "symmetric_exchange", "SELFTEST_SPEC"]

SELFTEST_SPEC = jit.KernelSpec.make("selftest.cu", ["ring_put_signal", "peer_store"], uses_nvshmem=True)


@dataclasses.dataclass(frozen=True)
class ExchangeReport:
    """What ``symmetric_exchange`` saw on this rank.

    Attributes:
        put_bytes: bytes received by the NVSHMEM put. put_mismatches: wrong bytes among them.
        store_ints: int32 received through NVLink stores. store_mismatches: wrong ones.
        peer_mapped: the right neighbour was reachable with nvshmem_ptr.
        seconds: wall time of the whole check.
    """

    put_bytes: int
    put_mismatches: int
    store_ints: int
    store_mismatches: int
    peer_mapped: bool
    seconds: float

    @property
    def ok(self) -> bool:
        """Everything arrived intact."""
        return self.put_mismatches == 0 and (not self.peer_mapped or self.store_mismatches == 0)


def symmetric_exchange(buf, num_bytes: int = 1 << 20, round_id: int = 1) -> ExchangeReport:
    """Collective: the ring exchange over ``buf``'s symmetric memory (GPU backend only).

    Arguments:
        buf: a ``Buffer`` on the GPU backend. The check allocates its own symmetric scratch
            (collectively) and frees it: the buffer's memory holds the kernels' flags.
        num_bytes: bytes each rank sends (a multiple of 4).
        round_id: signal value for this round; use a larger one on each call.
    Raises:
        DeepEPTimeout: a neighbour never sent (names the rank and the phase).
    """
    import cupy

    backend = buf._live()
    if buf.backend_name != "gpu":
        raise DeepEPInvalid("buf: symmetric_exchange needs the GPU backend")
    if num_bytes % 4 or num_bytes <= 0:
        raise DeepEPInvalid(f"num_bytes: need a positive multiple of 4, got {num_bytes}")
    t0 = time.perf_counter()
    rt = backend.runtime
    sym = rt.alloc(2 * num_bytes + 64)   # collective
    try:
        return _exchange(buf, backend, rt, sym, num_bytes, round_id, t0)
    finally:
        cupy.cuda.Device().synchronize()
        buf.comm.Barrier()
        rt.free(sym)                     # collective


def _exchange(buf, backend, rt, sym, num_bytes, round_id, t0):
    import cupy
    import numpy as np

    module = jit.load(SELFTEST_SPEC, backend.jit_options)
    rt.register_module(module)
    rank, n = buf.rank, buf.num_ranks
    left = (rank + n - 1) % n
    signal = sym[:8].view(cupy.uint64)
    src = sym[64:64 + num_bytes]
    dst = sym[64 + num_bytes:64 + 2 * num_bytes]
    pattern = lambda r: ((np.arange(num_bytes, dtype=np.int64) * 7 + r * 31 + round_id) & 0xFF).astype(np.uint8)
    sym[:64].fill(0)       # fresh symmetric memory is not zeroed: clear the signal word
    src.set(pattern(rank))
    dst.fill(0)
    errors = ErrorRecordArray()
    cupy.cuda.Device().synchronize()
    buf.comm.Barrier()     # every rank has reset its destination before anyone writes into it
    stream = backend.comm_stream
    timeout_ns = int(buf_timeout_seconds() * 1e9)
    with stream:
        module["ring_put_signal"]((1,), (128,), (dst, src, cupy.uint64(num_bytes), signal,
                                                 cupy.uint64(round_id), cupy.uint64(timeout_ns),
                                                 cupy.uint64(errors.ptr)))
    stream.synchronize()
    errors.check("symmetric_exchange")
    put_bad = int((dst.get() != pattern(left)).sum())

    ints = dst.view(cupy.int32)
    ints.fill(0)
    cupy.cuda.Device().synchronize()
    buf.comm.Barrier()
    with stream:
        module["peer_store"]((64,), (256,), (ints, cupy.int32(ints.size), cupy.uint64(errors.ptr)))
    stream.synchronize()
    record = errors.array.get().tolist()
    mapped = record[0] == 0
    buf.comm.Barrier()     # the left neighbour's stores have landed
    rt.barrier()
    store_bad = int((ints.get() != left * 1000003 + np.arange(ints.size, dtype=np.int64)).sum()) if mapped else -1
    if not mapped and n > 1:
        raise DeepEPError(f"rank {rank}: nvshmem_ptr cannot reach rank {(rank + 1) % n}")
    return ExchangeReport(num_bytes, put_bad, int(ints.size), store_bad, mapped, time.perf_counter() - t0)


def buf_timeout_seconds() -> float:
    """The GPU wait timeout in force (``settings.timeout_seconds``)."""
    from .config import settings
    return float(settings.timeout_seconds)
