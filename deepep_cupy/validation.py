"""Argument checks run before any launch. Each failure names the argument, what was expected and
what was received, and raises ``DeepEPInvalid`` (a ValueError) or ``DeepEPTypeError`` (a TypeError).
Nothing here touches array data except the value checks (``check_index_range``, ``check_finite``,
``check_same_values``), which read a few numbers back (``expect_aligned`` reads only the data
pointer). On the GPU reading values means a device reduction and a host wait, so ``Buffer`` runs the
value checks there only with ``settings.check_values`` (outside CUDA-graph capture); on the
reference backend (numpy) they always run.

``HandleRegistry`` remembers which ``Buffer`` returned a handle, so a handle from another buffer (or
from one since destroyed) is refused instead of driving kernels over memory it does not describe."""

from __future__ import annotations

import numbers
import weakref
from typing import Iterable, Optional, Sequence, Union

from . import arrays
from .errors import DeepEPInvalid, DeepEPTypeError

__all__ = ["expect_array", "expect_int", "expect_bool", "expect_optional_array", "expect_aligned",
           "expect_row_bytes", "expect_writable", "expect_stream_args", "check_index_range", "check_same_rows",
           "check_finite", "check_same_values", "HandleRegistry", "VECTOR_ALIGNMENT", "MAX_HT_TOPK"]

# The kernels move rows of x, recv_x, biases and outputs with 16-byte loads and stores (int4); such a
# load on a pointer that is not a multiple of 16 is a misaligned-address fault, which leaves the
# CUDA context unusable for the rest of the process.
VECTOR_ALIGNMENT = 16

# Top-k columns the high-throughput GPU kernels take (one warp lane per column). Enforced on every
# backend, so code that passes on the reference backend does not fail on the GPU (issue #15).
MAX_HT_TOPK = 32

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


def expect_row_bytes(desc: "arrays.ArrayDesc", name: str, multiple: int = VECTOR_ALIGNMENT) -> None:
    """A row of the 2-D array ``desc`` (``hidden * itemsize`` bytes) must be a multiple of
    ``multiple`` bytes: the GPU kernels move rows with 16-byte accesses. Checked on every backend
    (a bf16 hidden of 100 passes on numpy but cannot run on the GPU).

    Raises:
        DeepEPInvalid: naming ``name``, the hidden size and the dtype.
    """
    if (desc.shape[1] * desc.itemsize) % multiple:
        raise DeepEPInvalid(f"{name}: a row must be a multiple of {multiple} bytes, got hidden {desc.shape[1]} "
                            f"of {desc.dtype}")


def expect_writable(x, name: str) -> None:
    """``x`` is an output the call writes in place (``out=``): it must be mutable. JAX arrays are
    immutable (writing through a view of one would change a value JAX assumes never changes), and
    a read-only NumPy array refuses the write after the exchange, where the peers have already
    taken part; both are refused here, before anything is sent.

    Raises:
        DeepEPInvalid: naming ``name`` and what to do instead.
    """
    fw = arrays.framework_of(x, name)
    if fw is arrays.Framework.JAX:
        raise DeepEPInvalid(f"{name}: JAX arrays are immutable, so the result cannot be written into one; "
                            f"leave {name}=None and use the returned array")
    flags = getattr(x, "flags", None)
    if fw is arrays.Framework.NUMPY and flags is not None and not flags.writeable:
        raise DeepEPInvalid(f"{name}: this NumPy array is read-only (flags.writeable is False); pass a "
                            f"writable array, or leave {name}=None and use the returned array")


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


def check_finite(values, name: str, xp, where=None) -> None:
    """Every entry of the float array ``values`` must be finite (no NaN, no +-inf): a NaN gate
    weight would spread into every channel of its token's combined output. Reads one flag back,
    and on failure the first bad entry (on the GPU: a reduction and a host wait; see the module
    docstring for when ``Buffer`` calls it there).

    Arguments:
        xp: the array module of ``values`` (numpy or cupy).
        where: optional bool mask broadcastable to ``values``: only these entries are read by the
            kernels, so only they are checked (a weight in a ``-1`` top-k slot is never used).
    Raises:
        DeepEPInvalid: naming ``name``, the first bad value and its index.
    """
    if values.size == 0:
        return
    bad = ~xp.isfinite(values)
    if where is not None:
        bad &= where
    if not bool(bad.any()):
        return
    first = xp.argwhere(bad)[0]
    pos = tuple(int(i) for i in (first.get() if hasattr(first, "get") else first))
    value = float(values[pos].item())
    raise DeepEPInvalid(f"{name}: expected finite values, found {value} at index {pos} "
                        f"({int(bad.sum().item())} entries not finite)")


def check_same_values(given, expected, name: str, xp, what: str, hint: str = "") -> None:
    """``given`` must equal ``expected`` entry by entry (shapes already checked): for inputs that
    must be derived from others, e.g. ``get_dispatch_layout`` outputs passed to ``dispatch``. Reads
    one flag back, and on failure the first differing entry.

    Arguments:
        xp: the array module of both (numpy or cupy).
        what: what ``given`` must agree with, for the message (e.g. "topk_idx and num_experts=8").
        hint: advice appended to the message.
    Raises:
        DeepEPInvalid: naming ``name``, the first differing entry, and ``what``.
    """
    differ = given != expected
    if not bool(differ.any()):
        return
    first = xp.argwhere(differ)[0]
    pos = tuple(int(i) for i in (first.get() if hasattr(first, "get") else first))
    got, want = given[pos].item(), expected[pos].item()
    raise DeepEPInvalid(f"{name}: does not match {what}: entry {pos} is {got}, expected {want} "
                        f"({int(differ.sum().item())} entries differ)" + (f"; {hint}" if hint else ""))


def expect_stream_args(previous_event, async_finish, allocate_on_comm_stream, event_type) -> None:
    """DeepEP's stream arguments: ``previous_event`` an ``event_type`` (``EventOverlap``) or None,
    the two flags bools, and ``allocate_on_comm_stream`` only with a ``previous_event`` (the
    caller's work must be captured in an event first). The same rules on every backend."""
    if previous_event is not None and not isinstance(previous_event, event_type):
        raise DeepEPTypeError(f"previous_event: expected an {event_type.__name__} or None, got "
                              f"{type(previous_event).__name__}")
    expect_bool(async_finish, "async_finish")
    expect_bool(allocate_on_comm_stream, "allocate_on_comm_stream")
    if allocate_on_comm_stream and previous_event is None:
        raise DeepEPTypeError("allocate_on_comm_stream: needs previous_event (the caller's work "
                              "must be captured in an event first)")


# id(handle) -> (weak reference to the handle, the HandleRegistry that returned it). Handles are
# frozen dataclasses, some holding arrays (not hashable), so they are keyed by identity; an entry
# goes when its handle is collected. It keeps the registry (a flag) alive, not the Buffer.
_HANDLE_OWNERS: dict = {}


def _forget_handle(key: int):
    return lambda _ref: _HANDLE_OWNERS.pop(key, None)


class HandleRegistry:
    """The handles one ``Buffer``'s dispatches returned (held weakly, by identity).

    ``add`` notes a handle before it is returned; ``check`` refuses any other: a handle of another
    buffer describes another buffer's memory and routing (on the GPU its kernels would read and
    write at offsets that mean nothing here), and one of a destroyed buffer describes memory that
    is gone. Costs a dict insert per dispatch and a dict look-up per use.
    """

    def __init__(self, owner: str = "Buffer"):
        self.owner = owner
        self.closed = False

    def add(self, handle):
        """Note ``handle`` as this buffer's; returns it."""
        key = id(handle)
        _HANDLE_OWNERS[key] = (weakref.ref(handle, _forget_handle(key)), self)
        return handle

    def close(self) -> None:
        """The buffer was destroyed: its handles are refused everywhere, with that reason."""
        self.closed = True

    def check(self, handle, name: str = "handle") -> None:
        """Raise ``DeepEPInvalid`` naming ``name`` unless this registry's buffer returned ``handle``."""
        entry = _HANDLE_OWNERS.get(id(handle))
        if entry is not None and entry[0]() is handle:
            if entry[1] is self:
                return
            other = entry[1]
            why = (f"by {other.owner}, which was destroyed since" if other.closed
                   else f"by another buffer ({other.owner})")
        else:
            why = "by no Buffer's dispatch (a copy or a hand-made handle?)"
        raise DeepEPInvalid(f"{name}: this {type(handle).__name__} was made {why}; pass the handle that "
                            f"this buffer's dispatch returned")


def _fmt_shape(shape) -> str:
    return "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
