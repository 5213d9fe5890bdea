"""GPU value checks before a launch (cuda_src/checks.cu): index arrays must lie in range.

One small kernel reduces into a device scratch record; its last block writes the verdict and a
sequence number into a pinned host record, which the host polls rather than synchronising the
stream (a driver synchronisation woke the host ~150 us late on the GPU machine); so a check costs
about one launch. Skipped during CUDA-graph capture and when
``settings.check_values`` is off (the production setting once inputs are trusted).
"""

from __future__ import annotations

from typing import Optional

from . import jit
from .config import settings
from .errors import DeepEPInvalid, DeepEPTimeout

__all__ = ["CHECKS_SPEC", "IndexRangeChecker"]

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
