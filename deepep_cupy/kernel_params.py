"""By-value kernel parameter structs whose fields are all 8 bytes wide.

A kernel that takes one ``const XxxParams p`` instead of a long positional list declares the
struct in CUDA with pointers, ``long long`` and ``unsigned long long`` only: no padding, so field i
sits at byte 8 * i and the host can fill it as int64 words. ``ParamStruct`` describes one such
struct on the host (its field names in declaration order) and packs keyword arguments into the
one structured numpy scalar that CuPy passes to the kernel as a single argument.
tests/test_kernel_params.py parses every ``*Params`` struct in cuda_src/ and compares it with its
``ParamStruct``, so the two orders cannot drift.
"""

from __future__ import annotations

import operator
import struct
from typing import Sequence

import numpy as np

__all__ = ["ParamStruct"]

_MASK = (1 << 64) - 1
_MIN = -(1 << 63)


class ParamStruct:
    """One C parameter struct of 8-byte fields: ``name`` (the C struct's name) and ``fields``
    (its field names, in declaration order)."""

    def __init__(self, name: str, fields: Sequence[str]):
        self.name = name
        self.fields = tuple(fields)
        dup = sorted({f for f in self.fields if self.fields.count(f) > 1})
        if not self.fields or dup:
            raise ValueError(f"{name}: fields must be non-empty and unique (repeated: {dup})")
        # one field of int64 words: numpy hands CuPy the raw bytes, which match the C layout
        self.dtype = np.dtype({"names": ["words"], "formats": [(np.int64, (len(self.fields),))]})
        self._names = frozenset(self.fields)
        # every word as an unsigned 64-bit little-endian integer, all packed by one call
        self._struct = struct.Struct(f"<{len(self.fields)}Q")

    @property
    def nbytes(self) -> int:
        """Size of the struct in bytes (8 per field), i.e. of the kernel's parameter."""
        return 8 * len(self.fields)

    def pack(self, **values) -> np.ndarray:
        """Pack one value per field into a structured numpy scalar of shape (1,).

        Arrays (anything with ``.data.ptr``) become their device address, None becomes 0, bools
        0 or 1, negative ints their two's complement; any other value must be an integer in
        [-2**63, 2**64). Raises ValueError naming missing and unknown fields, TypeError naming a
        field whose value is not an integer (a float, say).

        This runs on every kernel launch, so it is written for the host's time: the names are
        checked as one comparison of key sets, plain ints, None, bools and arrays take a short
        path, and the words go into the struct with one ``struct.pack``. A call with any value off
        that path packs again through ``_checked``, which names the culprit."""
        if values.keys() != self._names:
            missing = [f for f in self.fields if f not in values]
            unknown = sorted(set(values) - self._names)
            raise ValueError(f"{self.name}: missing fields {missing}, unknown fields {unknown}")
        words = list(map(values.__getitem__, self.fields))
        for i, v in enumerate(words):
            if type(v) is not int:
                if v is None or v is False:
                    words[i] = 0
                elif v is True:
                    words[i] = 1
                else:
                    try:
                        words[i] = v.data.ptr    # a device array: its address
                    except AttributeError:
                        break                    # numpy integers, bad values
            elif v < 0:
                if v < _MIN:
                    break
                words[i] = v & _MASK             # two's complement
        else:
            try:
                return np.frombuffer(self._struct.pack(*words), dtype=self.dtype)
            except struct.error:    # an int of 2**64 or more, an address that is no 64-bit integer
                pass
        return self._checked(values)

    def _checked(self, values: dict) -> np.ndarray:
        """``pack`` field by field: raises naming the field whose value does not fit."""
        words = [self._word(name, values[name]) for name in self.fields]
        return np.frombuffer(self._struct.pack(*words), dtype=self.dtype)

    def _word(self, name: str, v) -> int:
        if v is None:
            return 0
        data = getattr(v, "data", None)
        ptr = getattr(data, "ptr", None)
        if ptr is not None:
            v = ptr
        try:
            n = operator.index(v)   # int, bool, numpy integers; not floats (silent truncation)
        except TypeError:
            raise TypeError(f"{self.name}.{name}: expected an integer, an array or None, "
                            f"got {type(v).__name__}") from None
        if not _MIN <= n <= _MASK:
            raise ValueError(f"{self.name}.{name}: {n} does not fit 64 bits")
        return n & _MASK

    def __repr__(self) -> str:
        return f"ParamStruct({self.name!r}, {len(self.fields)} fields)"
