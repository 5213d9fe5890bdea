"""Zero-copy array interop: describe, import and export arrays of CuPy, JAX, PyTorch and NumPy.

Design
------
Every public entry point of deepep_cupy takes "any GPU array that speaks DLPack" and hands
back arrays of the caller's own framework. This module is the one place that knows how:

* :func:`describe` reads shape, dtype, device and contiguity from an array's attributes
  (never its data, never a GPU call), so every argument is validated before any launch.
  The result, :class:`ArrayDesc`, carries the argument's name so error messages can say
  which argument was wrong.
* :func:`to_cupy` turns an input into a ``cupy.ndarray`` over the *same memory*: the
  kernels see CuPy arrays only.
* :func:`from_cupy` turns a CuPy result into an array of the caller's framework, again
  over the same memory, with the caller's logical dtype.
* :func:`to_numpy` is the host-side twin of :func:`to_cupy`, used by the CPU reference
  backend, and :func:`from_numpy` the twin of :func:`from_cupy`: the reference backend's
  results in the caller's framework (NumPy stays NumPy at no cost; JAX and PyTorch CPU arrays
  through DLPack or ``torch.from_numpy``, bfloat16 and FP8 included).

Dtypes: CuPy 14 computes on ``bfloat16`` (through ml_dtypes) but has no FP8 support, so
inside deepep_cupy an FP8 (``float8_e4m3fn`` and the other 8-bit float formats) array is
carried as raw ``uint8`` storage of the same shape; BF16 stays a CuPy ``bfloat16`` array
(:func:`raw_storage_dtype` gives its ``uint16`` storage for kernels that want raw bits).
The logical dtype travels beside the storage (in :class:`ArrayDesc` and as the ``dtype``
argument of :func:`from_cupy`), and outputs get it back.

How each route works
--------------------
* CuPy in: passed through (an ml_dtypes FP8-typed CuPy array becomes a ``uint8`` view).
* PyTorch in: ``x.detach()`` (a view), FP8 reinterpreted as ``torch.uint8`` (a view),
  then ``cupy.from_dlpack``.
* JAX (and any other DLPack producer) in: ``cupy.from_dlpack`` for the dtypes CuPy
  imports (bool, integers, float16/32/64, bfloat16, complex). For the others (JAX FP8)
  this module asks the producer for a capsule itself (consumer stream protocol:
  ``__dlpack__(stream=<CuPy's current stream>, max_version=(1, 0))``, falling back to
  fewer keywords for older producers), reads the ``DLManagedTensor`` /
  ``DLManagedTensorVersioned`` with ctypes, and wraps ``data + byte_offset`` in a
  ``cupy.cuda.UnownedMemory`` whose owner keeps the capsule and the source array alive.
  Lifetime: the capsule is *not* consumed (its name stays ``dltensor``), so when the last
  CuPy view dies, the owner dies, the capsule dies, and the producer's own capsule
  destructor calls the DLPack deleter exactly once. No leak, no use-after-free, and no
  deleter call from this module. If a JAX build cannot export FP8 through DLPack at all,
  the fallback waits for the array (``block_until_ready``) and wraps
  ``unsafe_buffer_pointer()`` the same way, with the JAX array as owner (still zero-copy).
* CuPy out: the array itself; **FP8 results stay ``uint8`` storage for CuPy users**
  (CuPy has no FP8 dtype it can compute with); BF16 results are CuPy ``bfloat16``.
* PyTorch out: ``torch.from_dlpack``; FP8 is imported as ``uint8`` and reinterpreted
  with ``.view(torch.float8_e4m3fn)`` (a view).
* JAX out: ``jax.dlpack.from_dlpack``. FP8: CuPy's own capsule is requested, the dtype
  field of the ``DLTensor`` inside it is rewritten from ``(kDLUInt, 8, 1)`` to
  ``(kDLFloat8_e4m3fn, 8, 1)`` and the capsule is handed to JAX through a small object
  exposing ``__dlpack__``/``__dlpack_device__``. If JAX rejects it, the uint8 array is
  imported zero-copy and bit-cast with ``jax.lax.bitcast_convert_type`` (a copy), with a
  one-time warning.
* NumPy out: refused; the GPU backend never returns host arrays.

Zero-copy guarantees
--------------------
============  ======================================  ==========================================
framework     in (to_cupy)                            out (from_cupy)
============  ======================================  ==========================================
CuPy          all dtypes                              all dtypes (FP8 comes back as uint8)
PyTorch       all dtypes, any strides                 all dtypes, any strides
JAX           all dtypes (FP8 via the capsule path)   float/int/bf16: zero-copy when the data
                                                      pointer meets XLA's alignment and the
                                                      array is dense row-major; 64-bit dtypes
                                                      need ``jax_enable_x64`` (JAX otherwise
                                                      canonicalises to 32 bits, a copy). FP8:
                                                      zero-copy when jaxlib imports the FP8
                                                      DLPack code, else a warned copy.
============  ======================================  ==========================================

Checked on the GPU machine (CuPy 14.2, PyTorch 2.11, jax 0.11.2, H200) by
tests/gpu/test_arrays_gpu.py: every cell above is zero-copy there, JAX FP8 included in both
directions (jaxlib exports and imports ``kDLFloat8_e4m3fn``), and the capsule path frees
JAX buffers when the CuPy view dies.

Whenever JAX's result of :func:`from_cupy` does not sit on the CuPy pointer, a one-time
``ZeroCopyWarning`` says so. Streams: imports use the DLPack consumer-stream protocol, so
the producer's pending work is ordered before CuPy's current stream (CuPy's own
``from_dlpack`` does this for the common route); exports are requested by JAX and PyTorch
with their own stream, which CuPy orders after its current stream.
"""

from __future__ import annotations

import ctypes
import enum
import math
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np

from .errors import DeepEPInvalid, DeepEPTypeError

try:  # ml_dtypes gives NumPy (and CuPy) the bfloat16 / float8 dtypes.
    import ml_dtypes as _ml_dtypes
except ImportError:  # pragma: no cover - ml_dtypes is a dependency; keep import-time safe
    _ml_dtypes = None

__all__ = [
    "Framework",
    "ArrayDesc",
    "DLPackInfo",
    "DLDeviceType",
    "DLDataTypeCode",
    "ZeroCopyWarning",
    "FP8_DTYPES",
    "framework_of",
    "follow_framework",
    "describe",
    "data_pointer",
    "canonical_dtype",
    "numpy_dtype",
    "raw_storage_dtype",
    "to_cupy",
    "from_cupy",
    "to_numpy",
    "from_numpy",
    "read_dlpack_capsule",
    "rewrite_capsule_dtype",
]


# --------------------------------------------------------------------------------------------
# Enums and dtype tables
# --------------------------------------------------------------------------------------------

class Framework(enum.Enum):
    """The array library an argument came from; outputs are returned in the same one.

    ``DLPACK`` stands for any other object with ``__dlpack__``/``__dlpack_device__``;
    such callers get CuPy arrays back.
    """

    CUPY = "cupy"
    JAX = "jax"
    TORCH = "torch"
    NUMPY = "numpy"
    DLPACK = "dlpack"


class DLDeviceType(enum.IntEnum):
    """DLPack device types used here (``DLDeviceType`` of dlpack.h)."""

    kDLCPU = 1
    kDLCUDA = 2
    kDLCUDAHost = 3
    kDLCUDAManaged = 13


class DLDataTypeCode(enum.IntEnum):
    """DLPack dtype codes (``DLDataTypeCode`` of dlpack.h v1.1)."""

    kDLInt = 0
    kDLUInt = 1
    kDLFloat = 2
    kDLOpaqueHandle = 3
    kDLBfloat = 4
    kDLComplex = 5
    kDLBool = 6
    kDLFloat8_e3m4 = 7
    kDLFloat8_e4m3 = 8
    kDLFloat8_e4m3b11fnuz = 9
    kDLFloat8_e4m3fn = 10
    kDLFloat8_e4m3fnuz = 11
    kDLFloat8_e5m2 = 12
    kDLFloat8_e5m2fnuz = 13
    kDLFloat8_e8m0fnu = 14


class ZeroCopyWarning(UserWarning):
    """An array had to be copied (or the host had to wait) where zero-copy was expected."""


_C = DLDataTypeCode
# (code, bits) <-> canonical dtype name. lanes is always 1.
_DL_TO_NAME: dict[tuple[int, int], str] = {
    (_C.kDLBool, 8): "bool",
    (_C.kDLInt, 8): "int8",
    (_C.kDLInt, 16): "int16",
    (_C.kDLInt, 32): "int32",
    (_C.kDLInt, 64): "int64",
    (_C.kDLUInt, 8): "uint8",
    (_C.kDLUInt, 16): "uint16",
    (_C.kDLUInt, 32): "uint32",
    (_C.kDLUInt, 64): "uint64",
    (_C.kDLFloat, 16): "float16",
    (_C.kDLFloat, 32): "float32",
    (_C.kDLFloat, 64): "float64",
    (_C.kDLBfloat, 16): "bfloat16",
    (_C.kDLComplex, 64): "complex64",
    (_C.kDLComplex, 128): "complex128",
    (_C.kDLFloat8_e3m4, 8): "float8_e3m4",
    (_C.kDLFloat8_e4m3, 8): "float8_e4m3",
    (_C.kDLFloat8_e4m3b11fnuz, 8): "float8_e4m3b11fnuz",
    (_C.kDLFloat8_e4m3fn, 8): "float8_e4m3fn",
    (_C.kDLFloat8_e4m3fnuz, 8): "float8_e4m3fnuz",
    (_C.kDLFloat8_e5m2, 8): "float8_e5m2",
    (_C.kDLFloat8_e5m2fnuz, 8): "float8_e5m2fnuz",
    (_C.kDLFloat8_e8m0fnu, 8): "float8_e8m0fnu",
}
_NAME_TO_DL: dict[str, tuple[int, int]] = {v: k for k, v in _DL_TO_NAME.items()}

#: The 8-bit float dtypes; all are carried as ``uint8`` storage inside deepep_cupy.
FP8_DTYPES: frozenset[str] = frozenset(n for n in _NAME_TO_DL if n.startswith("float8_"))
# Dtype names that only ml_dtypes gives NumPy.
_ML_DTYPE_NAMES: frozenset[str] = FP8_DTYPES | {"bfloat16"}
# Dtypes that cupy.from_dlpack imports (CuPy 14 with ml_dtypes and NumPy >= 2.1.2).
_CUPY_DLPACK_DTYPES: frozenset[str] = frozenset(
    n for n in _NAME_TO_DL if not n.startswith("float8_"))
# Dtypes that numpy.from_dlpack imports.
_NUMPY_DLPACK_DTYPES: frozenset[str] = _CUPY_DLPACK_DTYPES - {"bfloat16"}

_HOST_MEMORY_KINDS = frozenset({"pinned_host", "unpinned_host"})


# --------------------------------------------------------------------------------------------
# dtype helpers
# --------------------------------------------------------------------------------------------

_CANONICAL_CACHE: dict = {}


def canonical_dtype(dtype: Any) -> str:
    """Return the canonical name of a dtype from any framework (memoised: every call validates
    several arrays, and the lookup through NumPy costs microseconds each time).

    Arguments:
        dtype: a string (``"bfloat16"``, ``"torch.float8_e4m3fn"``, ``"f4"``), a NumPy/CuPy/JAX
            dtype or scalar type (ml_dtypes included), or a ``torch.dtype``.

    Returns:
        The NumPy-style name: ``'bfloat16'``, ``'float8_e4m3fn'``, ``'float16'``,
        ``'float32'``, ``'float64'``, ``'int8'``, ``'int32'``, ``'int64'``, ``'uint8'``,
        ``'bool'``, ...

    Raises:
        DeepEPTypeError: the dtype is not recognised.
    """
    try:
        return _CANONICAL_CACHE[dtype]
    except (KeyError, TypeError):   # TypeError: an unhashable object
        pass
    name = _canonical_dtype(dtype)
    try:
        if len(_CANONICAL_CACHE) < 256:
            _CANONICAL_CACHE[dtype] = name
    except TypeError:
        pass
    return name


def _canonical_dtype(dtype: Any) -> str:
    if isinstance(dtype, str):
        s = dtype[len("torch."):] if dtype.startswith("torch.") else dtype
        if s in _ML_DTYPE_NAMES:
            return s
        try:
            return np.dtype(s).name
        except TypeError:
            raise DeepEPTypeError(f"unknown dtype {dtype!r}") from None
    if type(dtype).__module__.split(".")[0] == "torch":
        s = str(dtype)
        return s[len("torch."):] if s.startswith("torch.") else s
    try:
        return np.dtype(dtype).name
    except TypeError:
        raise DeepEPTypeError(f"unknown dtype {dtype!r}") from None


def numpy_dtype(dtype: Any) -> np.dtype:
    """Return the ``numpy.dtype`` of a dtype name (ml_dtypes types for bfloat16 and FP8).

    Arguments:
        dtype: anything :func:`canonical_dtype` accepts.

    Returns:
        ``numpy.dtype``; for example ``numpy_dtype("float8_e4m3fn")`` is
        ``dtype(ml_dtypes.float8_e4m3fn)``. CuPy accepts the same object.
    """
    name = canonical_dtype(dtype)
    if name in _ML_DTYPE_NAMES:
        if _ml_dtypes is None:
            raise DeepEPTypeError(f"dtype {name} needs the ml_dtypes package (pip install ml_dtypes)")
        return np.dtype(getattr(_ml_dtypes, name))
    return np.dtype(name)


def raw_storage_dtype(dtype: Any) -> np.dtype:
    """Return the plain integer dtype that holds the bits of ``dtype``, for kernel launchers.

    ``bfloat16`` -> ``uint16``; every FP8 dtype -> ``uint8``; any other dtype -> itself.

    Returns:
        ``numpy.dtype`` (also accepted by CuPy).
    """
    name = canonical_dtype(dtype)
    if name == "bfloat16":
        return np.dtype(np.uint16)
    if name in FP8_DTYPES:
        return np.dtype(np.uint8)
    return numpy_dtype(name)


def _cupy_storage_dtype(name: str) -> np.dtype:
    """The dtype a CuPy array carries for logical dtype ``name`` (bf16 stays, FP8 -> uint8)."""
    if name in FP8_DTYPES:
        return np.dtype(np.uint8)
    return numpy_dtype(name)


# --------------------------------------------------------------------------------------------
# Framework detection and ArrayDesc
# --------------------------------------------------------------------------------------------

_MODULE_ROOTS = {
    "cupy": Framework.CUPY,
    "cupyx": Framework.CUPY,
    "jax": Framework.JAX,
    "jaxlib": Framework.JAX,
    "torch": Framework.TORCH,
    "numpy": Framework.NUMPY,
}


# type -> Framework, filled by framework_of (each call validates several arrays of a few types)
_FRAMEWORK_BY_TYPE: dict = {}


def _type_name(x: Any) -> str:
    t = type(x)
    return f"{t.__module__}.{t.__qualname__}"


def framework_of(x: Any, name: str = "array") -> Framework:
    """Return the framework of ``x`` from the module of its type (or a base class).

    Never imports jax or torch: a JAX or PyTorch array can only exist once its framework is
    imported.

    Arguments:
        x: the array.
        name: the argument's name, for the error message.

    Returns:
        :class:`Framework`; ``Framework.DLPACK`` for other objects with ``__dlpack__`` and
        ``__dlpack_device__``.

    Raises:
        DeepEPTypeError: ``x`` is not an array and has no ``__dlpack__``.
    """
    t = type(x)
    fw = _FRAMEWORK_BY_TYPE.get(t)
    if fw is not None:
        return fw
    for cls in t.__mro__:
        root = (getattr(cls, "__module__", None) or "").split(".")[0]
        fw = _MODULE_ROOTS.get(root)
        if fw is not None:
            if len(_FRAMEWORK_BY_TYPE) < 256:   # a type's module never changes: remember it
                _FRAMEWORK_BY_TYPE[t] = fw
            return fw
    if hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__"):
        return Framework.DLPACK
    raise DeepEPTypeError(
        f"{name}: expected an array with __dlpack__ (CuPy, JAX, PyTorch or NumPy), "
        f"got {_type_name(x)}")


def follow_framework(*arrays: Any) -> Framework:
    """Return the framework outputs should use: that of the first array that is not ``None``.

    ``Framework.CUPY`` when every argument is ``None`` (no input array to follow). Tuples such
    as an FP8 ``(x, scales)`` pair follow their first element.
    """
    for a in arrays:
        while isinstance(a, (tuple, list)) and a:
            a = a[0]
        if a is not None and not isinstance(a, (tuple, list)):
            return framework_of(a)
    return Framework.CUPY


@dataclass(frozen=True)
class ArrayDesc:
    """What deepep_cupy needs to know about an array, read without touching its data.

    Attributes:
        shape: tuple of ints.
        dtype: canonical dtype name (see :func:`canonical_dtype`), the *logical* dtype:
            ``'float8_e4m3fn'`` for a PyTorch/JAX FP8 array, ``'uint8'`` for CuPy storage.
        device_type: ``'cuda'`` or ``'cpu'`` (another framework-reported string for
            other devices, which every check rejects).
        device_id: device ordinal on this host (0 for host memory).
        contiguous: C-contiguous (row-major, dense).
        framework: the :class:`Framework` the array came from.
        itemsize: bytes per element.
        nbytes: ``prod(shape) * itemsize``.
        name: the argument's name, used in messages.
    """

    shape: tuple
    dtype: str
    device_type: str
    device_id: int
    contiguous: bool
    framework: Framework
    itemsize: int
    nbytes: int
    name: str = "array"

    @property
    def ndim(self) -> int:
        """Number of dimensions."""
        return len(self.shape)

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def device(self) -> str:
        """``'cuda:0'``-style device string."""
        return f"{self.device_type}:{self.device_id}"

    def __str__(self) -> str:
        layout = "C-contiguous" if self.contiguous else "strided"
        return (f"{self.name}: {self.framework.value} {self.dtype}{list(self.shape)} "
                f"on {self.device} ({layout})")


def _make_desc(x_shape, dtype_name, device_type, device_id, contiguous, fw, itemsize, name):
    shape = tuple(map(int, x_shape))
    itemsize = int(itemsize)
    # the frozen dataclass's __init__ sets its 9 fields one object.__setattr__ at a time (about
    # half of describe's cost, paid for every array of every call): fill its __dict__ at once
    desc = object.__new__(ArrayDesc)
    desc.__dict__.update(shape=shape, dtype=dtype_name, device_type=device_type, device_id=int(device_id),
                         contiguous=bool(contiguous), framework=fw, itemsize=itemsize,
                         nbytes=math.prod(shape) * itemsize, name=name)
    return desc


def describe(x: Any, name: str = "array") -> ArrayDesc:
    """Describe an array without touching its data and without a GPU call.

    Arguments:
        x: a CuPy, JAX, PyTorch or NumPy array (NumPy scalars too), or any other object with
            ``__dlpack__``/``__dlpack_device__`` (read through a DLPack capsule requested with
            ``stream=-1``, i.e. no synchronisation).
        name: the argument's name; it appears in :class:`ArrayDesc` and in every error.

    Returns:
        :class:`ArrayDesc`.

    Raises:
        DeepEPTypeError: ``x`` is not an array, or is a traced JAX value.
        DeepEPInvalid: ``x`` is a JAX array sharded over several devices.
    """
    fw = framework_of(x, name)
    try:
        if fw is Framework.NUMPY or fw is Framework.CUPY:
            if fw is Framework.CUPY:
                device_type, device_id = "cuda", x.data.device_id
            else:
                device_type, device_id = "cpu", 0
            return _make_desc(x.shape, canonical_dtype(x.dtype), device_type, device_id,
                              x.flags.c_contiguous, fw, x.dtype.itemsize, name)
        if fw is Framework.TORCH:
            dev = x.device
            device_id = dev.index if dev.index is not None else 0
            return _make_desc(x.shape, canonical_dtype(x.dtype), dev.type, device_id,
                              x.is_contiguous(), fw, x.element_size(), name)
        if fw is Framework.JAX:
            return _describe_jax(x, name)
    except AttributeError as e:
        raise DeepEPTypeError(
            f"{name}: {_type_name(x)} is not a dense array ({e})") from None
    return _describe_dlpack(x, name)


def _describe_jax(x: Any, name: str) -> ArrayDesc:
    try:
        devices = x.devices()
    except Exception as e:  # a Tracer under jit/vmap/grad has no devices
        raise DeepEPTypeError(
            f"{name}: a traced or abstract JAX value ({_type_name(x)}); deepep_cupy needs "
            f"concrete arrays, so call it outside jax.jit / vmap / grad ({e})") from None
    if len(devices) != 1:
        raise DeepEPInvalid(
            f"{name}: JAX array sharded over {len(devices)} devices; pass a single-device "
            f"array (for example x.addressable_shards[i].data)")
    (dev,) = tuple(devices)
    platform = str(getattr(dev, "platform", "")).lower()
    device_type = {"gpu": "cuda", "cuda": "cuda", "cpu": "cpu"}.get(platform, platform)
    memory_kind = getattr(getattr(x, "sharding", None), "memory_kind", None)
    if memory_kind in _HOST_MEMORY_KINDS:
        device_type = "cpu"
    device_id = getattr(dev, "local_hardware_id", None)
    if device_id is None:
        device_id = 0 if device_type == "cpu" else dev.id
    # A single-device jax.Array is a dense row-major buffer (default layout).
    return _make_desc(x.shape, canonical_dtype(x.dtype), device_type, device_id, True,
                      Framework.JAX, np.dtype(x.dtype).itemsize, name)


def _describe_dlpack(x: Any, name: str) -> ArrayDesc:
    dev_type, dev_id = x.__dlpack_device__()
    stream = None if int(dev_type) in (DLDeviceType.kDLCPU, DLDeviceType.kDLCUDAHost) else -1
    try:
        capsule = _request_capsule(x, stream)
        info = read_dlpack_capsule(capsule)
    except (BufferError, TypeError, ValueError) as e:
        raise DeepEPTypeError(f"{name}: could not read {_type_name(x)} through DLPack: {e}") from None
    if info.dtype is None:
        raise DeepEPTypeError(
            f"{name}: unsupported DLPack dtype (code={info.dtype_code}, bits={info.dtype_bits}, "
            f"lanes={info.dtype_lanes})")
    device_type = {DLDeviceType.kDLCPU: "cpu", DLDeviceType.kDLCUDAHost: "cpu",
                   DLDeviceType.kDLCUDA: "cuda", DLDeviceType.kDLCUDAManaged: "cuda"
                   }.get(info.device_type, f"dlpack-device-{info.device_type}")
    return _make_desc(info.shape, info.dtype, device_type, info.device_id,
                      info.is_c_contiguous, Framework.DLPACK, info.itemsize, name)


def data_pointer(x: Any, name: str = "array") -> int:
    """The address of the first element of ``x`` (device or host), without touching its data.

    Arguments:
        x: a ``cupy.ndarray`` (``x.data.ptr``: a view's own start, offset included), a NumPy array,
            or any object with ``__array_interface__`` or ``__cuda_array_interface__``.
        name: the argument's name, for the error message.

    Raises:
        DeepEPTypeError: ``x`` exposes no data pointer.
    """
    iface = getattr(x, "__array_interface__", None)      # NumPy (x.data is a memoryview there)
    if iface is None:
        ptr = getattr(getattr(x, "data", None), "ptr", None)   # CuPy: a MemoryPointer
        if ptr is not None:
            return int(ptr)
        iface = getattr(x, "__cuda_array_interface__", None)
    if iface is None or "data" not in iface:
        raise DeepEPTypeError(f"{name}: {_type_name(x)} exposes no data pointer")
    return int(iface["data"][0] or 0)


# --------------------------------------------------------------------------------------------
# DLPack capsules through ctypes
# --------------------------------------------------------------------------------------------

class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p)]


class _DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class _DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [("version", _DLPackVersion), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p), ("flags", ctypes.c_uint64),
                ("dl_tensor", _DLTensor)]


_CAPSULE = b"dltensor"
_CAPSULE_VERSIONED = b"dltensor_versioned"
_DLPACK_FLAG_READ_ONLY = 1
_DLPACK_FLAG_IS_COPIED = 2
_MAX_DLPACK_MAJOR = 1

# Private prototypes (never mutate the shared ctypes.pythonapi function objects).
_PyCapsule_GetName = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(
    ("PyCapsule_GetName", ctypes.pythonapi))
_PyCapsule_GetPointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi))


@dataclass(frozen=True)
class DLPackInfo:
    """The contents of a DLPack capsule, read without consuming it.

    Attributes:
        capsule_name: ``'dltensor'`` or ``'dltensor_versioned'``.
        version: ``(major, minor)`` of a versioned capsule, else ``None``.
        flags: the versioned capsule's flags (bit 0 read-only, bit 1 is-copied), else 0.
        data: ``DLTensor.data`` (the base pointer, before ``byte_offset``).
        byte_offset: ``DLTensor.byte_offset``.
        device_type: ``DLDeviceType`` code (1 CPU, 2 CUDA, 3 CUDA host, 13 CUDA managed).
        device_id: device ordinal.
        dtype_code, dtype_bits, dtype_lanes: ``DLDataType``.
        shape: tuple of ints.
        strides: tuple of element strides, or ``None`` (compact row-major).
    """

    capsule_name: str
    version: Optional[tuple]
    flags: int
    data: int
    byte_offset: int
    device_type: int
    device_id: int
    dtype_code: int
    dtype_bits: int
    dtype_lanes: int
    shape: tuple
    strides: Optional[tuple]

    @property
    def ptr(self) -> int:
        """Address of the first element: ``data + byte_offset``."""
        return self.data + self.byte_offset

    @property
    def read_only(self) -> bool:
        """True when the producer marked the tensor read-only (versioned capsules only)."""
        return bool(self.flags & _DLPACK_FLAG_READ_ONLY)

    @property
    def dtype(self) -> Optional[str]:
        """Canonical dtype name, or ``None`` for a DLPack dtype this module does not know."""
        if self.dtype_lanes != 1:
            return None
        return _DL_TO_NAME.get((self.dtype_code, self.dtype_bits))

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return (self.dtype_bits * self.dtype_lanes + 7) // 8

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def byte_strides(self) -> tuple:
        """Strides in bytes (computed for a compact row-major tensor when strides is None)."""
        if self.strides is not None:
            return tuple(s * self.itemsize for s in self.strides)
        out, step = [], self.itemsize
        for n in reversed(self.shape):
            out.append(step)
            step *= max(n, 1)
        return tuple(reversed(out))

    @property
    def is_c_contiguous(self) -> bool:
        """Dense row-major (size-1 dimensions may have any stride, as in NumPy)."""
        if self.strides is None or self.size == 0:
            return True
        expected = 1
        for n, s in zip(reversed(self.shape), reversed(self.strides)):
            if n != 1 and s != expected:
                return False
            expected *= n
        return True


def _is_capsule(obj: Any) -> bool:
    return type(obj).__name__ == "PyCapsule"


def _tensor_struct(capsule: Any) -> tuple:
    """Return ``(DLTensor struct view, capsule name, version, flags)`` of a live capsule."""
    if not _is_capsule(capsule):
        raise DeepEPTypeError(f"expected a DLPack PyCapsule, got {_type_name(capsule)}")
    name = _PyCapsule_GetName(capsule)
    if name == _CAPSULE:
        addr = _PyCapsule_GetPointer(capsule, _CAPSULE)
        managed = _DLManagedTensor.from_address(addr)
        return managed.dl_tensor, name.decode(), None, 0
    if name == _CAPSULE_VERSIONED:
        addr = _PyCapsule_GetPointer(capsule, _CAPSULE_VERSIONED)
        managed = _DLManagedTensorVersioned.from_address(addr)
        version = (int(managed.version.major), int(managed.version.minor))
        if version[0] > _MAX_DLPACK_MAJOR:
            raise BufferError(
                f"DLPack capsule of version {version[0]}.{version[1]}; this reader "
                f"understands major version {_MAX_DLPACK_MAJOR}")
        return managed.dl_tensor, name.decode(), version, int(managed.flags)
    if name is not None and name.startswith(b"used_"):
        raise DeepEPInvalid("this DLPack capsule was already consumed; a capsule can be used once")
    raise DeepEPTypeError(f"not a DLPack capsule (capsule name {name!r})")


def read_dlpack_capsule(capsule: Any) -> DLPackInfo:
    """Read a DLPack capsule (legacy ``dltensor`` or ``dltensor_versioned``) without consuming it.

    Works for any device type (the data is never dereferenced), so it is tested on NumPy's
    CPU capsules. The capsule keeps ownership: its own destructor frees the tensor.

    Arguments:
        capsule: the PyCapsule returned by ``x.__dlpack__(...)``.

    Returns:
        :class:`DLPackInfo`.

    Raises:
        DeepEPTypeError: not a DLPack capsule. DeepEPInvalid: already consumed.
        BufferError: a versioned capsule of an unknown major version.
    """
    t, cname, version, flags = _tensor_struct(capsule)
    ndim = int(t.ndim)
    if ndim < 0:
        raise DeepEPInvalid(f"DLPack tensor with negative ndim {ndim}")
    if ndim and not t.shape:
        raise DeepEPInvalid("DLPack tensor without a shape array")
    shape = tuple(int(t.shape[i]) for i in range(ndim))
    strides = tuple(int(t.strides[i]) for i in range(ndim)) if (ndim and t.strides) else None
    return DLPackInfo(
        capsule_name=cname, version=version, flags=flags, data=int(t.data or 0),
        byte_offset=int(t.byte_offset), device_type=int(t.device.device_type),
        device_id=int(t.device.device_id), dtype_code=int(t.dtype.code),
        dtype_bits=int(t.dtype.bits), dtype_lanes=int(t.dtype.lanes), shape=shape,
        strides=strides)


def rewrite_capsule_dtype(capsule: Any, dtype: Any) -> Any:
    """Rewrite, in place, the dtype of the ``DLTensor`` inside an unconsumed capsule.

    Used to hand CuPy's ``uint8`` FP8 storage to JAX as ``float8_e4m3fn``. The new dtype
    must have the same number of bits, so shape, strides and size stay valid.

    Arguments:
        capsule: an unconsumed DLPack PyCapsule (owned by the caller, not shared).
        dtype: the new dtype (anything :func:`canonical_dtype` accepts).

    Returns:
        The same capsule.
    """
    name = canonical_dtype(dtype)
    if name not in _NAME_TO_DL:
        raise DeepEPTypeError(f"dtype {name} has no DLPack code")
    code, bits = _NAME_TO_DL[name]
    t, _, _, _ = _tensor_struct(capsule)
    old_bits = int(t.dtype.bits) * int(t.dtype.lanes)
    if old_bits != bits:
        raise DeepEPTypeError(
            f"cannot retype a {old_bits}-bit DLPack tensor as {name} ({bits} bits)")
    t.dtype.code = code
    t.dtype.bits = bits
    t.dtype.lanes = 1
    return capsule


def _request_capsule(x: Any, stream: Optional[int]) -> Any:
    """Ask ``x`` for a capsule, newest protocol first, falling back for older producers."""
    if stream is None:
        attempts = ({"max_version": (1, 0)}, {})
    else:
        attempts = ({"stream": stream, "max_version": (1, 0)}, {"stream": stream})
    last: Optional[BaseException] = None
    for kwargs in attempts:
        try:
            return x.__dlpack__(**kwargs)
        except TypeError as e:  # the producer does not know a keyword
            last = e
    raise last  # type: ignore[misc]


class _CapsuleOwner:
    """Keeps an unconsumed capsule (and its source) alive while CuPy/NumPy views exist.

    When this object dies the capsule dies, and the producer's capsule destructor calls the
    DLPack deleter (the capsule was never renamed, so it still counts as unconsumed).
    """

    __slots__ = ("capsule", "source", "__weakref__")

    def __init__(self, capsule: Any, source: Any) -> None:
        self.capsule = capsule
        self.source = source


class _HostView:
    """Exposes host memory to NumPy through ``__array_interface__`` while owning it."""

    def __init__(self, ptr: int, shape: tuple, byte_strides: Optional[tuple], storage: np.dtype,
                 read_only: bool, owner: Any) -> None:
        self.owner = owner
        self.__array_interface__ = {
            "version": 3, "data": (ptr, bool(read_only)), "shape": tuple(shape),
            "typestr": storage.str, "strides": byte_strides,
        }


def _extent(shape: tuple, byte_strides: Optional[tuple], itemsize: int) -> tuple:
    """(lowest, highest+1) byte offsets touched by a strided array, relative to its start."""
    if math.prod(shape) == 0:
        return 0, 0
    if byte_strides is None:
        return 0, math.prod(shape) * itemsize
    lo = sum(min(0, (n - 1) * s) for n, s in zip(shape, byte_strides))
    hi = sum(max(0, (n - 1) * s) for n, s in zip(shape, byte_strides)) + itemsize
    return lo, hi


def _cupy_over(ptr: int, shape: tuple, byte_strides: Optional[tuple], dtype: np.dtype,
               owner: Any, device_id: int):
    """A ``cupy.ndarray`` over existing device memory at ``ptr``; ``owner`` keeps it alive.

    Makes no CUDA call (the device id is given), so it can be unit-tested on any machine.
    """
    import cupy

    lo, hi = _extent(shape, byte_strides, dtype.itemsize)
    base = ptr + lo if hi > lo else ptr
    mem = cupy.cuda.UnownedMemory(base, hi - lo, owner, device_id=int(device_id))
    memptr = cupy.cuda.MemoryPointer(mem, -lo if hi > lo else 0)
    strides = None if byte_strides is None else tuple(byte_strides)
    return cupy.ndarray(tuple(shape), dtype, memptr, strides=strides)


def _cupy_from_capsule(capsule: Any, source: Any, name: str):
    """Wrap a CUDA capsule's memory in a CuPy array without consuming the capsule."""
    info = read_dlpack_capsule(capsule)
    if info.device_type not in (DLDeviceType.kDLCUDA, DLDeviceType.kDLCUDAManaged):
        raise DeepEPInvalid(
            f"{name}: DLPack producer gave device type {info.device_type}, not CUDA memory")
    if info.dtype is None:
        raise DeepEPTypeError(
            f"{name}: unsupported DLPack dtype (code={info.dtype_code}, bits={info.dtype_bits}, "
            f"lanes={info.dtype_lanes})")
    device_id = info.device_id
    if info.device_type == DLDeviceType.kDLCUDAManaged and info.ptr:
        import cupy
        device_id = cupy.cuda.runtime.pointerGetAttributes(info.ptr).device
    return _cupy_over(info.ptr, info.shape, info.byte_strides if info.strides else None,
                      _cupy_storage_dtype(info.dtype), _CapsuleOwner(capsule, source), device_id)


def _consumer_stream_ptr() -> int:
    """CuPy's current stream as a DLPack ``stream`` value (never 0: 1 legacy, 2 per-thread)."""
    import cupy

    ptr = int(cupy.cuda.get_current_stream().ptr)
    if ptr == 0:
        try:
            from cupy_backends.cuda.stream import get_default_stream_ptr
            ptr = int(get_default_stream_ptr())
        except Exception:  # pragma: no cover - private CuPy helper moved
            ptr = 1
    return ptr


# --------------------------------------------------------------------------------------------
# Inputs: to_cupy / to_numpy
# --------------------------------------------------------------------------------------------

def to_cupy(x: Any, name: str = "array"):
    """Return a ``cupy.ndarray`` over the same GPU memory as ``x`` (zero-copy).

    Arguments:
        x: a CUDA array of CuPy, JAX or PyTorch (or another DLPack producer).
        name: the argument's name, for error messages.

    Returns:
        ``cupy.ndarray`` with the same shape and strides: bfloat16 as CuPy ``bfloat16``,
        every FP8 dtype as ``uint8`` storage, other dtypes as themselves. The array keeps the
        source memory alive. Producer work pending on the producer's stream is ordered before
        CuPy's current stream (DLPack consumer-stream protocol).

    Raises:
        DeepEPTypeError: not an array, or a dtype CuPy cannot carry.
        DeepEPInvalid: host memory (the GPU backend needs device arrays).
    """
    import cupy

    fw = framework_of(x, name)
    if fw is Framework.CUPY:
        if not isinstance(x, cupy.ndarray):
            raise DeepEPTypeError(f"{name}: expected a cupy.ndarray, got {_type_name(x)}")
        if canonical_dtype(x.dtype) in FP8_DTYPES:
            return x.view(np.uint8)
        return x
    desc = describe(x, name)
    if desc.device_type != "cuda":
        raise DeepEPInvalid(
            f"{desc} is in host memory; the GPU backend needs a CUDA array (move it to the "
            f"GPU first, or use backend='reference')")
    if fw is Framework.TORCH:
        x = x.detach()
        if desc.dtype in FP8_DTYPES:
            import torch
            x = x.view(torch.uint8)
        return _cupy_from_dlpack(x, desc)
    if desc.dtype in _CUPY_DLPACK_DTYPES:
        return _cupy_from_dlpack(x, desc)
    return _cupy_via_capsule(x, desc)


def _cupy_from_dlpack(x: Any, desc: ArrayDesc):
    import cupy

    try:
        return cupy.from_dlpack(x)
    except (TypeError, BufferError, NotImplementedError) as e:
        raise DeepEPTypeError(f"{desc}: CuPy could not import it through DLPack: {e}") from e


def _cupy_via_capsule(x: Any, desc: ArrayDesc):
    """Import a dtype CuPy's from_dlpack rejects (JAX FP8) by reading the capsule ourselves."""
    import cupy

    with cupy.cuda.Device(desc.device_id):
        stream = _consumer_stream_ptr()
        try:
            capsule = _request_capsule(x, stream)
        except Exception as e:
            if desc.framework is Framework.JAX:
                return _cupy_from_jax_pointer(x, desc, e)
            raise DeepEPTypeError(f"{desc}: the producer could not export it through DLPack: {e}") from e
        return _cupy_from_capsule(capsule, x, desc.name)


def _cupy_from_jax_pointer(x: Any, desc: ArrayDesc, why: BaseException):
    """Fallback for a jaxlib that cannot export a dtype through DLPack: wrap its buffer."""
    _warn_once(
        "jax-export-" + desc.dtype,
        f"jaxlib cannot export {desc.dtype} through DLPack ({why}); deepep_cupy waits for the "
        f"array (block_until_ready) and wraps its buffer pointer instead (still zero-copy)")
    x.block_until_ready()
    return _cupy_over(int(x.unsafe_buffer_pointer()), desc.shape, None,
                      _cupy_storage_dtype(desc.dtype), x, desc.device_id)


def to_numpy(x: Any, name: str = "array") -> np.ndarray:
    """Return a NumPy array over the same host memory as ``x``, for the CPU reference backend.

    Arguments:
        x: a NumPy array, or a host (CPU) array of PyTorch, JAX or another DLPack producer.
        name: the argument's name, for error messages.

    Returns:
        ``numpy.ndarray`` sharing memory with ``x``; bfloat16 and FP8 come back with the
        ml_dtypes dtypes. Arrays from JAX are marked read-only (JAX arrays are immutable).

    Raises:
        DeepEPInvalid: ``x`` is in GPU memory (the reference backend computes on the host).
        DeepEPTypeError: not an array, or an unsupported dtype.
    """
    fw = framework_of(x, name)
    if fw is Framework.NUMPY:
        return x if isinstance(x, np.ndarray) else np.asarray(x)
    desc = describe(x, name)
    if desc.device_type != "cpu":
        raise DeepEPInvalid(
            f"{desc} is in GPU memory, but the reference backend computes on the host and "
            f"takes host arrays: copy it to the host first (cupy.asnumpy(x), "
            f"jax.device_get(x), x.cpu()), or use backend='gpu'")
    if fw is Framework.TORCH:
        x = x.detach()
        if desc.dtype in _ML_DTYPE_NAMES:
            import torch
            storage = torch.int16 if desc.dtype == "bfloat16" else torch.uint8
            return np.from_dlpack(x.view(storage)).view(numpy_dtype(desc.dtype))
        return np.from_dlpack(x)
    if desc.dtype in _NUMPY_DLPACK_DTYPES:
        out = np.from_dlpack(x)
    else:
        out = _numpy_via_capsule(x, desc)
    if fw is Framework.JAX and out.flags.writeable:
        out = out.view()
        out.flags.writeable = False
    return out


def _numpy_via_capsule(x: Any, desc: ArrayDesc) -> np.ndarray:
    """Import a host array whose dtype NumPy's DLPack rejects (bfloat16, FP8)."""
    try:
        capsule = _request_capsule(x, None)
    except Exception as e:
        raise DeepEPTypeError(f"{desc}: the producer could not export it through DLPack: {e}") from e
    return _numpy_from_capsule(capsule, x, desc.name)


def _numpy_from_capsule(capsule: Any, source: Any, name: str) -> np.ndarray:
    info = read_dlpack_capsule(capsule)
    if info.device_type not in (DLDeviceType.kDLCPU, DLDeviceType.kDLCUDAHost):
        raise DeepEPInvalid(f"{name}: DLPack producer gave device type {info.device_type}, "
                            f"not host memory")
    if info.dtype is None:
        raise DeepEPTypeError(
            f"{name}: unsupported DLPack dtype (code={info.dtype_code}, bits={info.dtype_bits}, "
            f"lanes={info.dtype_lanes})")
    storage = raw_storage_dtype(info.dtype)
    view = _HostView(info.ptr, info.shape, info.byte_strides if info.strides else None, storage,
                     info.read_only, _CapsuleOwner(capsule, source))
    out = np.asarray(view)
    logical = numpy_dtype(info.dtype)
    return out if logical == storage else out.view(logical)


# --------------------------------------------------------------------------------------------
# Outputs: from_cupy
# --------------------------------------------------------------------------------------------

def _as_framework(framework, name: str) -> "Framework":
    """``framework`` as a ``Framework`` (a member or its value); DeepEPTypeError naming ``name``."""
    try:
        return framework if isinstance(framework, Framework) else Framework(framework)
    except ValueError:
        raise DeepEPTypeError(f"{name}: unknown framework {framework!r}") from None


def from_cupy(arr: Any, framework: Union[Framework, str], dtype: Any = None,
              name: str = "output") -> Any:
    """Return ``arr`` as an array of ``framework`` over the same memory, with dtype ``dtype``.

    Arguments:
        arr: a ``cupy.ndarray`` (FP8 data as ``uint8`` storage, BF16 as ``bfloat16`` or
            ``uint16`` storage).
        framework: :class:`Framework` (or its value, e.g. ``"torch"``) of the caller.
        dtype: the logical dtype of the result; ``None`` keeps ``arr.dtype``. It must have the
            itemsize of ``arr.dtype``.
        name: the output's name, for messages.

    Returns:
        * ``Framework.CUPY`` / ``Framework.DLPACK``: a ``cupy.ndarray``; FP8 stays ``uint8``
          storage (CuPy users get uint8 for FP8), bfloat16 is CuPy ``bfloat16``.
        * ``Framework.TORCH``: a ``torch.Tensor`` (FP8 as ``torch.float8_e4m3fn`` etc.), zero-copy.
        * ``Framework.JAX``: a ``jax.Array``; zero-copy where the module docstring says so,
          otherwise a one-time :class:`ZeroCopyWarning`.

    Raises:
        DeepEPInvalid: ``Framework.NUMPY`` (the GPU backend never returns host arrays).
        DeepEPTypeError: ``arr`` is not a CuPy array, or ``dtype`` does not fit its storage.
    """
    import cupy

    if not isinstance(arr, cupy.ndarray):
        raise DeepEPTypeError(f"{name}: from_cupy expects a cupy.ndarray, got {_type_name(arr)}")
    fw = _as_framework(framework, name)
    logical = canonical_dtype(arr.dtype if dtype is None else dtype)
    storage = _cupy_storage_dtype(logical)
    if arr.dtype.itemsize != storage.itemsize:
        raise DeepEPTypeError(
            f"{name}: cannot present {arr.dtype.name} storage ({arr.dtype.itemsize} bytes per "
            f"element) as {logical} ({storage.itemsize} bytes)")
    if arr.dtype != storage:
        arr = arr.view(storage)
    if fw is Framework.NUMPY:
        raise DeepEPInvalid(
            f"{name}: the GPU backend returns device arrays, never NumPy; NumPy results come "
            f"from backend='reference'")
    if fw in (Framework.CUPY, Framework.DLPACK):
        return arr
    if fw is Framework.TORCH:
        return _torch_from_cupy(arr, logical, name)
    return _jax_from_cupy(arr, logical, name)


def _torch_from_cupy(arr: Any, logical: str, name: str):
    import torch

    out = torch.from_dlpack(arr)
    if logical in FP8_DTYPES:
        tdtype = getattr(torch, logical, None)
        if tdtype is None:
            raise DeepEPTypeError(f"{name}: this PyTorch has no torch.{logical}")
        out = out.view(tdtype)
    return out


class _RetypedExporter:
    """Exports a CuPy array through DLPack under another dtype code of the same width.

    JAX's ``from_dlpack`` calls ``__dlpack_device__`` and then ``__dlpack__(stream=...)``; the
    capsule is CuPy's own (CuPy orders JAX's stream after its current stream), with the dtype
    field rewritten. Ownership of the capsule passes to the consumer as usual.
    """

    def __init__(self, arr: Any, dtype: str) -> None:
        self._arr = arr
        self._dtype = dtype

    def __dlpack_device__(self):
        return self._arr.__dlpack_device__()

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        kwargs: dict = {"stream": stream}
        if max_version is not None:
            kwargs["max_version"] = max_version
        if dl_device is not None:
            kwargs["dl_device"] = dl_device
        if copy is not None:
            kwargs["copy"] = copy
        return rewrite_capsule_dtype(self._arr.__dlpack__(**kwargs), self._dtype)


def _jax_from_cupy(arr: Any, logical: str, name: str):
    import jax
    import jax.dlpack

    if logical in FP8_DTYPES:
        try:
            out = jax.dlpack.from_dlpack(_RetypedExporter(arr, logical))
        except Exception as e:
            _warn_once(
                "jax-import-" + logical,
                f"this jaxlib rejects {logical} DLPack tensors ({e}); deepep_cupy returns a "
                f"bit-cast copy of the uint8 storage instead of a zero-copy view")
            storage = jax.dlpack.from_dlpack(arr)
            return jax.lax.bitcast_convert_type(storage, numpy_dtype(logical))
    else:
        out = jax.dlpack.from_dlpack(arr)
    if arr.size:
        try:
            same = int(out.unsafe_buffer_pointer()) == int(arr.data.ptr)
        except Exception:  # pragma: no cover - no pointer to compare on this backend
            same = True
        if not same:
            _warn_once(
                f"jax-copy-{logical}",
                f"{name}: JAX copied a {logical} result instead of viewing it (an unaligned "
                f"pointer, or a 64-bit dtype without jax_enable_x64)")
    return out


_warned: set = set()


def _warn_once(key: str, message: str) -> None:
    """Emit ``message`` as a :class:`ZeroCopyWarning` the first time ``key`` is seen."""
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, ZeroCopyWarning, stacklevel=3)


# --------------------------------------------------------------------------------------------
# Outputs of the reference backend: from_numpy
# --------------------------------------------------------------------------------------------

def from_numpy(arr: Any, framework: Union[Framework, str], dtype: Any = None,
               name: str = "output") -> Any:
    """Return the host array ``arr`` as an array of ``framework``: the reference backend's
    results in the caller's framework (the host-side twin of :func:`from_cupy`).

    Arguments:
        arr: a ``numpy.ndarray`` (bfloat16 and FP8 with their ml_dtypes dtypes, or as raw
            ``uint16``/``uint8`` storage when ``dtype`` names the logical dtype).
        framework: :class:`Framework` (or its value, e.g. ``"jax"``) of the caller.
        dtype: the logical dtype of the result; ``None`` keeps ``arr.dtype``. It must have the
            itemsize of ``arr.dtype``.
        name: the output's name, for messages.

    Returns:
        * ``Framework.NUMPY`` / ``Framework.DLPACK``: ``arr`` itself (NumPy speaks DLPack): no
          copy, no cost.
        * ``Framework.TORCH``: a CPU ``torch.Tensor`` over ``arr``'s memory (bfloat16 and FP8
          through their integer storage, then ``.view(torch.<dtype>)``); a read-only ``arr`` is
          copied first, since tensors are writable.
        * ``Framework.JAX``: a CPU ``jax.Array`` through DLPack (bfloat16 and FP8 through a
          capsule whose dtype code is rewritten, as :func:`from_cupy` does), zero-copy where
          jaxlib takes the buffer as it is; otherwise (a read-only array, a jaxlib that refuses
          the dtype) a copy. 64-bit dtypes become 32-bit unless ``jax_enable_x64`` is on: JAX's
          own canonicalisation.

    Raises:
        DeepEPInvalid: ``Framework.CUPY`` (CuPy arrays live on the GPU; the reference backend
            computes on host arrays and is never handed one).
        DeepEPTypeError: ``arr`` is not a NumPy array, or ``dtype`` does not fit its storage.
    """
    if not isinstance(arr, np.ndarray):
        raise DeepEPTypeError(f"{name}: from_numpy expects a numpy.ndarray, got {_type_name(arr)}")
    fw = _as_framework(framework, name)
    logical = canonical_dtype(arr.dtype if dtype is None else dtype)
    want = numpy_dtype(logical)
    if arr.dtype != want:
        if arr.dtype.itemsize != want.itemsize:
            raise DeepEPTypeError(
                f"{name}: cannot present {arr.dtype.name} storage ({arr.dtype.itemsize} bytes per "
                f"element) as {logical} ({want.itemsize} bytes)")
        arr = arr.view(want)
    if fw in (Framework.NUMPY, Framework.DLPACK):
        return arr
    if fw is Framework.CUPY:
        raise DeepEPInvalid(f"{name}: CuPy arrays live on the GPU; the reference backend returns "
                            f"host arrays (NumPy, or the caller's JAX / PyTorch CPU arrays)")
    if fw is Framework.TORCH:
        return _torch_from_numpy(arr, logical, name)
    return _jax_from_numpy(arr, logical)


def _torch_from_numpy(arr: np.ndarray, logical: str, name: str):
    import torch

    # torch.from_numpy refuses negative strides and warns on read-only memory: copy those
    if not arr.flags.writeable or any(s < 0 for s in arr.strides):
        arr = np.array(arr, copy=True, order="C")
    if logical not in _ML_DTYPE_NAMES:
        return torch.from_numpy(arr)
    tdtype = getattr(torch, logical, None)
    if tdtype is None:
        raise DeepEPTypeError(f"{name}: this PyTorch has no torch.{logical}")
    # NumPy's ml_dtypes types are unknown to torch: share the bits as integers, then retype
    storage = np.int16 if logical == "bfloat16" else np.uint8
    return torch.from_numpy(arr.view(storage)).view(tdtype)


def _jax_from_numpy(arr: np.ndarray, logical: str):
    import jax
    import jax.dlpack
    import jax.numpy as jnp

    if arr.flags.writeable:   # NumPy cannot export read-only memory through (legacy) DLPack
        try:
            if logical in _NUMPY_DLPACK_DTYPES:
                return jax.dlpack.from_dlpack(arr)
            if logical in _NAME_TO_DL:   # bfloat16, FP8: NumPy exports the raw storage, retyped here
                return jax.dlpack.from_dlpack(_RetypedExporter(arr.view(raw_storage_dtype(logical)), logical))
        except Exception:   # noqa: BLE001 - any refusal (dtype, alignment, version): copy below
            pass
    return jnp.asarray(arr)
