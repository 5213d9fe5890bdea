"""GPU value checks before a launch (cuda_src/checks.cu): index arrays must lie in range.

One small kernel writes into a pinned host record and the stream is synchronised: about a launch
and a round trip, instead of CuPy's min/max reductions. Skipped during CUDA-graph capture and when
``settings.check_values`` is off (the production setting once inputs are trusted).
"""

from __future__ import annotations

from typing import Optional

from . import jit
from .errors import DeepEPInvalid

__all__ = ["CHECKS_SPEC", "IndexRangeChecker"]

CHECKS_SPEC = jit.KernelSpec.make("checks.cu", ["check_index_range"])


class IndexRangeChecker:
    """Checks int64 arrays against [low, high) on the current device."""

    def __init__(self, jit_options: Optional[jit.JitOptions] = None):
        import cupy
        import numpy as np

        self._kernel = jit.load(CHECKS_SPEC, jit_options)["check_index_range"]
        self._pinned = cupy.cuda.alloc_pinned_memory(16)
        self._record = np.frombuffer(self._pinned, dtype=np.int64, count=2)
        self._record[:] = 0
        sms = cupy.cuda.Device().attributes["MultiProcessorCount"]
        self._max_blocks = 2 * sms

    def __call__(self, values, name: str, low: int, high: int, stream) -> None:
        """Raise ``DeepEPInvalid`` naming ``name`` if any entry of ``values`` (CuPy int64, contiguous)
        is outside [low, high). Synchronises ``stream``."""
        import cupy
        if values.size == 0:
            return
        blocks = max(1, min(self._max_blocks, (values.size + 255) // 256))
        with stream:
            self._kernel((blocks,), (256,), (values, cupy.int64(values.size), cupy.int64(low),
                                             cupy.int64(high), cupy.uint64(self._pinned.ptr)))
        stream.synchronize()
        num_bad, example = int(self._record[0]), int(self._record[1])
        if num_bad:
            self._record[:] = 0
            raise DeepEPInvalid(f"{name}: expected values in [{low}, {high}), found {example} "
                                f"({num_bad} entries out of range)")
