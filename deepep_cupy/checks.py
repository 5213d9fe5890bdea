"""Value checks of index inputs on the GPU.

Two mechanisms:

* ``DeviceInputErrors`` (always on, no host cost): the kernels that read ``topk_idx`` anyway (the
  layout kernel, the low-latency dispatch send) check each expert id against [-1, num_experts),
  treat a bad one as -1 and report it into a pinned error record. The host reads the record at
  the start of each call, without synchronising, and raises ``DeepEPInvalid``: at the latest on
  the first call after the faulty launch has finished.
* ``IndexRangeChecker`` (``settings.check_values = True``, for debugging): a blocking check before
  the launch that raises on the very call that passes the bad value. One small kernel
  (cuda_src/checks.cu) reduces into a device scratch record; its last block writes the verdict and
  a sequence number into a pinned host record, which the host polls rather than synchronising the
  stream (a driver synchronisation woke the host ~150 us late on the GPU machine); so a check costs
  about one launch plus a host wait (~20 us). Skipped during CUDA-graph capture.
"""

from __future__ import annotations

from typing import Optional

from . import jit
from .config import settings
from .errors import DeepEPInvalid, DeepEPTimeout

__all__ = ["CHECKS_SPEC", "IndexRangeChecker", "DeviceInputErrors"]

CHECKS_SPEC = jit.KernelSpec.make("checks.cu", ["check_index_range"])


class IndexRangeChecker:
    """Checks int64 arrays against [low, high) on the current device."""

    def __init__(self, jit_options: Optional[jit.JitOptions] = None):
        import cupy
        import numpy as np

        self._kernel = jit.load(CHECKS_SPEC, jit_options)["check_index_range"]
        self._pinned = cupy.cuda.alloc_pinned_memory(24)
        self._record = np.frombuffer(self._pinned, dtype=np.int64, count=3)  # num_bad, example, seq
        self._record[:] = 0
        self._scratch = cupy.zeros(3, dtype=cupy.uint64)   # zeroed once; the kernel keeps it so
        cupy.cuda.Device().synchronize()   # the zeroing is done before any stream launches a check
        self._seq = 0
        sms = cupy.cuda.Device().attributes["MultiProcessorCount"]
        self._max_blocks = 2 * sms

    def __call__(self, values, name: str, low: int, high: int, stream) -> None:
        """Raise ``DeepEPInvalid`` naming ``name`` if any entry of ``values`` (CuPy int64, contiguous)
        is outside [low, high). Waits for ``stream`` to reach and finish the check."""
        import time
        import cupy
        if values.size == 0:
            return
        blocks = max(1, min(self._max_blocks, (values.size + 1023) // 1024))
        record = self._record
        self._seq += 1
        seq = self._seq
        with stream:
            self._kernel((blocks,), (256,), (values, cupy.int64(values.size), cupy.int64(low),
                                             cupy.int64(high), self._scratch, cupy.uint64(self._pinned.ptr),
                                             cupy.uint64(seq)))
        spins, deadline = 0, None
        while record[2] != seq:             # the last block publishes the sequence number
            spins += 1
            if spins % 4096 == 0:
                now = time.monotonic()
                deadline = deadline or now + settings.timeout_seconds
                if spins > (1 << 20):
                    time.sleep(50e-6)       # a long wait (a busy stream): stop burning a core
                if now > deadline:
                    raise DeepEPTimeout(f"{name}: the value check did not finish within "
                                        f"{settings.timeout_seconds} s (is the stream blocked?)")
        num_bad, example = int(record[0]), int(record[1])
        if num_bad:
            raise DeepEPInvalid(f"{name}: expected values in [{low}, {high}), found {example} "
                                f"({num_bad} entries out of range)")


class DeviceInputErrors:
    """The pinned error record that kernels reading ``topk_idx`` report bad expert ids into (phase
    24), and its host-side check. One per ``GpuBackend``; reading it never waits for the GPU. The
    launcher passes ``ptr`` and its rank to the kernel, which writes {2, 24, id, rank}."""

    def __init__(self):
        from .kernel_errors import PinnedErrorRecord
        self.record = PinnedErrorRecord()
        self._num_experts: Optional[int] = None   # of the launches since the last report; -1: mixed

    @property
    def ptr(self) -> int:
        """Address the kernels write to."""
        return self.record.ptr

    def launched(self, num_experts: int) -> None:
        """Note a launch that reports into the record (the message prints its ``num_experts``
        when every launch since the last report used the same one)."""
        if self._num_experts is None:
            self._num_experts = num_experts
        elif self._num_experts != num_experts:
            self._num_experts = -1

    def check(self, what: str) -> None:
        """Raise ``DeepEPInvalid`` if a finished kernel reported a bad expert id (or the error a
        kernel reported); the record is cleared. No synchronisation: work still running reports
        at a later call."""
        if not self.record.record[0]:   # kernels only ever set the code from 0 (first writer wins)
            return
        num_experts = self._num_experts if self._num_experts not in (None, -1) else None
        self._num_experts = None
        self.record.check(what, num_experts=num_experts)
