"""The receive arena: dispatch outputs carved from this rank's symmetric memory.

A dispatch whose outputs (``recv_x``, scales, top-k ids, weights, source index) live in symmetric
memory can be written in place by its senders over NVLink: one copy per row instead of two (see
cuda_src/intranode_direct.cuh). ``ReceiveArena`` hands out such blocks as ordinary CuPy arrays that
the caller owns: a block goes back to the arena when the last array viewing it is garbage
collected, as CuPy's own memory pool does with its blocks.

Stream order makes the reuse safe: a dispatch's kernel runs on the buffer's communication stream
after the caller's stream (``CommStreamScope``), so work the caller queued on a freed block has
finished before the kernel that tells the senders about the block's new use; and senders write a
block only inside that kernel. (As with CuPy's pool, an array used on another stream than the one
current at the call must be kept alive by the caller until that work is done.)

When the arena cannot hold a dispatch's outputs (the caller keeps earlier ones alive), the
dispatch falls back to ordinary memory and its senders go through the staging area: the same
result, two copies per row.
"""

from __future__ import annotations

import bisect
import math
import threading
from typing import Optional

import numpy as np

__all__ = ["ReceiveArena", "ArenaBlock", "aligned", "spec_nbytes"]

ALIGN = 256


def aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to the arena's 256-byte granule (at least one granule)."""
    return max(ALIGN, (int(nbytes) + ALIGN - 1) // ALIGN * ALIGN)


def spec_nbytes(shape, dtype) -> int:
    """Bytes of an array of ``shape`` and ``dtype`` (an output spec of ``ReceiveArena.take``)."""
    return math.prod(int(d) for d in shape) * np.dtype(dtype).itemsize


class ArenaBlock:
    """One allocation: ``offset`` bytes from the arena's start, ``nbytes`` long. Freed when the
    object is garbage collected (arrays viewing it hold it through ``cupy.cuda.UnownedMemory``).

    Its ``__del__`` only appends the extent to the arena's return list: no lock, no weak reference.
    The cyclic collector may run it inside ``ReceiveArena.alloc`` on the same thread (a block in a
    cycle, e.g. an exception's traceback holding a dispatch's arrays), where waiting for the
    arena's lock deadlocked (seen on the GPU machine, Python 3.12, 2026-12-06); and the collector
    clears a weak reference that is itself garbage before ``__del__`` runs (Python 3.11), so a
    block freed by it was lost to the arena for good."""

    __slots__ = ("offset", "nbytes", "ptr", "_returns", "__weakref__")

    def __init__(self, arena: "ReceiveArena", offset: int, nbytes: int):
        self.offset, self.nbytes = offset, nbytes
        self.ptr = arena.base_ptr + offset
        self._returns = arena._returns

    def __del__(self):
        self._returns.append((self.offset, self.nbytes))   # atomic under the GIL; merged by the arena


class ReceiveArena:
    """First-fit allocator over ``[base_ptr, base_ptr + nbytes)`` with coalescing free extents.

    Arguments:
        base_ptr: device address of the arena's first byte (this rank's own mapping).
        nbytes: arena size in bytes. device_id: the GPU it is on.
    """

    def __init__(self, base_ptr: int, nbytes: int, device_id: int):
        self.base_ptr = int(base_ptr)
        self.device_id = int(device_id)
        self.nbytes = int(nbytes) // ALIGN * ALIGN
        self._starts = [0] if self.nbytes else []      # free extents, sorted by start
        self._sizes = [self.nbytes] if self.nbytes else []
        self._lock = threading.Lock()                   # alloc/free may run on several threads
        self._returns: list = []    # (offset, nbytes) of dead blocks (ArenaBlock.__del__), merged under the lock

    def _merge_returns(self) -> None:
        """Give the extents of dead blocks back (with the lock held)."""
        while self._returns:
            self._merge(*self._returns.pop())

    @property
    def free_bytes(self) -> int:
        """Bytes not handed out."""
        with self._lock:
            self._merge_returns()
            return sum(self._sizes)

    @property
    def largest_free(self) -> int:
        """Bytes of the largest free extent: the largest block ``alloc`` can give now."""
        with self._lock:
            self._merge_returns()
            return max(self._sizes, default=0)

    def holds(self, array) -> bool:
        """Whether ``array``'s whole data (contiguous, non-empty; anything with ``.data.ptr``,
        ``.nbytes``, ``.size`` and ``.flags.c_contiguous``, e.g. a CuPy array) lies in the arena."""
        if array.size == 0 or not array.flags.c_contiguous:
            return False
        start = int(array.data.ptr)
        return self.base_ptr <= start and start + array.nbytes <= self.base_ptr + self.nbytes

    def alloc(self, nbytes: int) -> Optional[ArenaBlock]:
        """A block of at least ``nbytes`` (256-byte aligned), or None when no free extent fits."""
        with self._lock:
            self._merge_returns()
            start, need = self._carve(nbytes)
        # the block object is made outside the lock (making it may run the collector)
        return None if start is None else ArenaBlock(self, start, need)

    def _carve(self, nbytes: int) -> tuple:
        """First fit (with the lock held): (offset, aligned size) taken from the free extents, or
        (None, size) when none fits."""
        need = aligned(nbytes)
        sizes = self._sizes
        for i, size in enumerate(sizes):
            if size >= need:
                start = self._starts[i]
                if size == need:
                    del self._starts[i], sizes[i]
                else:
                    self._starts[i] += need
                    sizes[i] -= need
                return start, need
        return None, need

    def free(self, offset: int, nbytes: int) -> None:
        """Return an extent, merging it with its neighbours (dead blocks come back by themselves)."""
        with self._lock:
            self._merge_returns()
            self._merge(offset, nbytes)

    def _merge(self, offset: int, nbytes: int) -> None:
        """Insert the free extent ``[offset, offset + nbytes)`` (with the lock held)."""
        i = bisect.bisect_left(self._starts, offset)
        end = offset + nbytes
        if i < len(self._starts) and self._starts[i] == end:        # merge with the next extent
            nbytes += self._sizes[i]
            del self._starts[i], self._sizes[i]
        if i > 0 and self._starts[i - 1] + self._sizes[i - 1] == offset:   # and with the previous
            self._sizes[i - 1] += nbytes
        else:
            self._starts.insert(i, offset)
            self._sizes.insert(i, nbytes)

    def shrink(self, block: ArenaBlock, nbytes: int) -> None:
        """Give the tail of ``block`` past ``nbytes`` (rounded up to 256) back to the arena."""
        self.shrink_all([(block, nbytes)])

    def shrink_all(self, pairs) -> None:
        """``shrink`` for each ``(block, nbytes)`` of ``pairs`` (None blocks skipped), under one lock."""
        with self._lock:
            self._merge_returns()
            for block, nbytes in pairs:
                if block is None:
                    continue
                keep = aligned(nbytes)
                if keep < block.nbytes:
                    tail = block.nbytes - keep
                    block.nbytes = keep
                    self._merge(block.offset + keep, tail)

    def take(self, specs) -> Optional[list]:
        """One block per entry of ``specs`` (``(shape, dtype)`` or None), each its own allocation so
        that each lives as long as its own array; None (nothing kept) when one does not fit. One
        lock for all (a dispatch takes five blocks on its hot path)."""
        needs = [None if spec is None else spec_nbytes(*spec) for spec in specs]
        carved = []
        with self._lock:
            self._merge_returns()
            for nbytes in needs:
                if nbytes is None:
                    carved.append(None)
                    continue
                start, size = self._carve(nbytes)
                if start is None:     # give back what this call took: nothing is kept
                    for got in carved:
                        if got is not None:
                            self._merge(*got)
                    return None
                carved.append((start, size))
        # the block objects are made outside the lock (making them may run the collector)
        return [None if got is None else ArenaBlock(self, *got) for got in carved]

    def view(self, block: Optional[ArenaBlock], shape, dtype):
        """A CuPy array of ``shape`` over ``block`` (None for None); it keeps the block alive."""
        import cupy
        if block is None:
            return None
        # the device given: no pointer-attribute query per array
        mem = cupy.cuda.UnownedMemory(block.ptr, block.nbytes, block, self.device_id)
        return cupy.ndarray(shape, dtype, cupy.cuda.MemoryPointer(mem, 0))

    def arrays(self, specs) -> Optional[list]:
        """``take`` then ``view``: CuPy arrays for ``specs``, or None when one does not fit."""
        blocks = self.take(specs)
        if blocks is None:
            return None
        return [None if b is None else self.view(b, *spec) for b, spec in zip(blocks, specs)]
