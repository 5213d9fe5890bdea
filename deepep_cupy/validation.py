"""Argument checks run before any launch. Each failure names the argument, what was expected and
what was received, and raises ``DeepEPInvalid`` (a ValueError) or ``DeepEPTypeError`` (a TypeError).
Nothing here touches array data except ``check_index_range``, which reads two numbers
(``expect_aligned`` reads only the data pointer)."""

from __future__ import annotations

import numbers
from typing import Iterable, Optional, Sequence, Union

from . import arrays
from .errors import DeepEPInvalid, DeepEPTypeError

__all__ = ["expect_array", "expect_int", "expect_bool", "expect_optional_array", "expect_aligned",
           "check_index_range", "check_same_rows", "VECTOR_ALIGNMENT"]

# The kernels move rows of x, recv_x, biases and outputs with 16-byte loads and stores (int4); such a
# load on a pointer that is not a multiple of 16 is a misaligned-address fault, which leaves the
# CUDA context unusable for the rest of the process.
VECTOR_ALIGNMENT = 16

DTypeSpec = Union[str, Sequence[str]]


def expect_int(value, name: str, *, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    """``value`` must be an int (not a bool) within [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise DeepEPTypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise DeepEPInvalid(f"{name}: expected >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise DeepEPInvalid(f"{name}: expected <= {maximum}, got {value}")
    return value


def expect_bool(value, name: str) -> bool:
    """``value`` must be a bool."""
    if not isinstance(value, bool):
        raise DeepEPTypeError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")
    return value


def expect_array(x, name: str, *, dtype: Optional[DTypeSpec] = None, ndim: Optional[int] = None,
                 shape: Optional[Sequence[Optional[int]]] = None,
                 device: Optional[tuple] = None) -> "arrays.ArrayDesc":
    """Check an array's type, dtype, rank, shape (None = any extent), device and C-contiguity.

    Arguments:
        device: ``("cuda", id)`` for the buffer's GPU, ``("cpu", None)`` for the reference backend.
    Returns:
        its ``ArrayDesc``.
    """
    if x is None:
        raise DeepEPTypeError(f"{name}: expected an array, got None")
    desc = arrays.describe(x, name=name)
    if dtype is not None:
        allowed = (dtype,) if isinstance(dtype, str) else tuple(dtype)
        if desc.dtype not in allowed:
            want = allowed[0] if len(allowed) == 1 else " or ".join(allowed)
            raise DeepEPTypeError(f"{name}: expected dtype {want}, got {desc.dtype}")
    if shape is not None:
        ndim = len(shape)
    if ndim is not None and len(desc.shape) != ndim:
        raise DeepEPInvalid(f"{name}: expected {ndim} dimensions, got shape {tuple(desc.shape)}")
    if shape is not None:
        for axis, (want, got) in enumerate(zip(shape, desc.shape)):
            if want is not None and want != got:
                raise DeepEPInvalid(f"{name}: expected shape {_fmt_shape(shape)}, got {tuple(desc.shape)} "
                                    f"(axis {axis})")
    if device is not None:
        kind, ident = device
        if desc.device_type != kind or (ident is not None and desc.device_id != ident):
            where = f"{kind}:{ident}" if ident is not None else kind
            raise DeepEPInvalid(f"{name}: expected an array on {where}, got one on "
                                f"{desc.device_type}:{desc.device_id}")
    if not desc.contiguous:
        raise DeepEPInvalid(f"{name}: expected a C-contiguous array, got strides that are not "
                            f"(shape {tuple(desc.shape)}); pass a contiguous copy")
    return desc


def expect_optional_array(x, name: str, **kw):
    """Like ``expect_array`` but ``None`` passes (and returns None)."""
    return None if x is None else expect_array(x, name, **kw)


def expect_aligned(x, name: str, alignment: int = VECTOR_ALIGNMENT) -> None:
    """The data pointer of ``x`` (see ``arrays.data_pointer``) must be a multiple of ``alignment``
    bytes; a view that starts mid-row (say ``flat[1:].reshape(...)``) is the usual way to miss it.

    Raises:
        DeepEPInvalid: naming ``name``, the pointer and the alignment.
    """
    ptr = arrays.data_pointer(x, name)
    if ptr % alignment:
        what = "16-byte loads and stores" if alignment == VECTOR_ALIGNMENT else f"{alignment}-byte accesses"
        raise DeepEPInvalid(f"{name}: data pointer {ptr:#x} is not {alignment}-byte aligned (a view that "
                            f"starts mid-row?); the kernels access it with {what}: pass a copy")


def check_same_rows(descs: Iterable[tuple], what: str = "token") -> None:
    """Every (name, ArrayDesc) must have the same first extent."""
    descs = [(n, d) for n, d in descs if d is not None]
    if not descs:
        return
    first_name, first = descs[0]
    for name, d in descs[1:]:
        if d.shape[0] != first.shape[0]:
            raise DeepEPInvalid(f"{name}: expected {first.shape[0]} {what} rows like {first_name}, "
                                f"got {d.shape[0]}")


def check_index_range(values, name: str, low: int, high: int, xp) -> None:
    """All entries of ``values`` must lie in [low, high). Reads min and max back to the host.

    Arguments:
        xp: the array module of ``values`` (numpy or cupy).
    """
    if values.size == 0:
        return
    lo_hi = xp.stack((values.min(), values.max()))
    lo, hi = (int(v) for v in (lo_hi.get() if hasattr(lo_hi, "get") else lo_hi))
    if lo < low or hi >= high:
        bad = lo if lo < low else hi
        raise DeepEPInvalid(f"{name}: expected values in [{low}, {high}), found {bad}")


def _fmt_shape(shape) -> str:
    return "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
