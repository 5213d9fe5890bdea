"""CPU-only tests of deepep_cupy.arrays: descriptions, DLPack capsules, host imports.

Nothing here needs a GPU: CuPy arrays are built over host pointers with an explicit device id
(CuPy makes no CUDA call for that and the data is never touched), and DLPack capsules come
from NumPy, whose capsules are CPU ones.
"""

import gc
import weakref

import ml_dtypes
import numpy as np
import pytest

from deepep_cupy import arrays as A
from deepep_cupy.arrays import (
    ArrayDesc, DLDataTypeCode, DLDeviceType, Framework, canonical_dtype, describe,
    follow_framework, framework_of, from_cupy, numpy_dtype, raw_storage_dtype,
    read_dlpack_capsule, rewrite_capsule_dtype, to_cupy, to_numpy)
from deepep_cupy.errors import DeepEPInvalid, DeepEPTypeError

cupy = pytest.importorskip("cupy")

BF16 = np.dtype(ml_dtypes.bfloat16)
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------

class Producer:
    """A DLPack producer over a NumPy array that can pose as another dtype / device.

    ``dtype`` rewrites the capsule's dtype code (e.g. uint16 storage exported as bfloat16),
    ``device`` overrides what ``__dlpack_device__`` reports, and ``strict`` makes it reject the
    ``max_version`` keyword like an old producer.
    """

    def __init__(self, arr, dtype=None, device=(1, 0), strict=False):
        self.arr, self.dtype, self.device, self.strict = arr, dtype, device, strict
        self.calls = []

    def __dlpack_device__(self):
        return self.device

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        self.calls.append({"stream": stream, "max_version": max_version})
        if self.strict and max_version is not None:
            raise TypeError("unexpected keyword max_version")
        if stream not in (None, -1):
            raise RuntimeError("host producer: stream must be None")
        cap = self.arr.__dlpack__() if max_version is None else self.arr.__dlpack__(
            max_version=max_version)
        if self.dtype is not None:
            rewrite_capsule_dtype(cap, self.dtype)
        return cap


class CapsuleBox:
    """Hands a prepared capsule to a consumer (np.from_dlpack wants __dlpack__)."""

    def __init__(self, cap):
        self.cap = cap

    def __dlpack_device__(self):
        return (1, 0)

    def __dlpack__(self, **kwargs):
        return self.cap


def host_cupy(arr, dtype=None):
    """A cupy.ndarray over a NumPy array's memory (never dereferenced): no GPU needed."""
    mem = cupy.cuda.UnownedMemory(arr.ctypes.data, arr.nbytes, arr, device_id=0)
    return cupy.ndarray(arr.shape, dtype or arr.dtype, cupy.cuda.MemoryPointer(mem, 0),
                        strides=arr.strides)


def set_device_type(cap, device_type):
    t = A._tensor_struct(cap)[0]
    t.device.device_type = int(device_type)


def shift_byte_offset(cap, nbytes):
    """Move `nbytes` from the data pointer into byte_offset (same first element)."""
    t = A._tensor_struct(cap)[0]
    t.data = t.data - nbytes
    t.byte_offset = t.byte_offset + nbytes


# ------------------------------------------------------------------------------------------
# dtypes
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("given, expected", [
    ("bfloat16", "bfloat16"), ("float8_e4m3fn", "float8_e4m3fn"), ("torch.float8_e4m3fn",
                                                                   "float8_e4m3fn"),
    ("torch.bfloat16", "bfloat16"), ("f4", "float32"), ("int64", "int64"), ("bool", "bool"),
    (np.float16, "float16"), (np.dtype("uint8"), "uint8"), (ml_dtypes.bfloat16, "bfloat16"),
    (BF16, "bfloat16"), (FP8, "float8_e4m3fn"), (np.bool_, "bool"), (np.int32, "int32"),
])
def test_canonical_dtype(given, expected):
    assert canonical_dtype(given) == expected


def test_canonical_dtype_rejects_unknown():
    with pytest.raises(DeepEPTypeError, match="float9"):
        canonical_dtype("float9_e9m9")


def test_numpy_and_storage_dtypes():
    assert numpy_dtype("bfloat16") == BF16
    assert numpy_dtype("float8_e4m3fn") == FP8
    assert numpy_dtype("float8_e5m2") == np.dtype(ml_dtypes.float8_e5m2)
    assert numpy_dtype("int64") == np.dtype(np.int64)
    assert raw_storage_dtype("bfloat16") == np.dtype(np.uint16)
    for name in A.FP8_DTYPES:
        assert raw_storage_dtype(name) == np.dtype(np.uint8)
        assert numpy_dtype(name).itemsize == 1
    for name in ("float32", "int64", "int32", "uint8", "bool", "float16"):
        assert raw_storage_dtype(name) == np.dtype(name)
    assert "float8_e4m3fn" in A.FP8_DTYPES and "bfloat16" not in A.FP8_DTYPES


def test_dlpack_codes_match_dlpack_h():
    assert DLDataTypeCode.kDLBfloat == 4 and DLDataTypeCode.kDLBool == 6
    assert DLDataTypeCode.kDLFloat8_e4m3fn == 10 and DLDataTypeCode.kDLFloat8_e5m2 == 12
    assert DLDataTypeCode.kDLFloat8_e8m0fnu == 14
    assert (DLDeviceType.kDLCPU, DLDeviceType.kDLCUDA, DLDeviceType.kDLCUDAHost,
            DLDeviceType.kDLCUDAManaged) == (1, 2, 3, 13)


# ------------------------------------------------------------------------------------------
# framework_of / describe
# ------------------------------------------------------------------------------------------

ALL_DTYPES = [np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
              np.uint64, np.float16, np.float32, np.float64, np.complex64, BF16, FP8,
              np.dtype(ml_dtypes.float8_e5m2), np.dtype(ml_dtypes.float8_e8m0fnu)]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: np.dtype(d).name)
def test_describe_numpy_dtypes(dtype):
    x = np.zeros((4, 6), dtype=dtype)
    d = describe(x, name="x")
    assert d == ArrayDesc(shape=(4, 6), dtype=np.dtype(dtype).name, device_type="cpu",
                          device_id=0, contiguous=True, framework=Framework.NUMPY,
                          itemsize=np.dtype(dtype).itemsize,
                          nbytes=24 * np.dtype(dtype).itemsize, name="x")
    assert d.ndim == 2 and d.size == 24 and d.device == "cpu:0"


def test_describe_bf16_fp8_names():
    assert describe(np.ones(3, BF16)).dtype == "bfloat16"
    assert describe(np.ones(3, FP8)).dtype == "float8_e4m3fn"
    assert describe(np.ones(3, FP8)).itemsize == 1


def test_describe_views_and_edge_shapes():
    base = np.zeros((8, 16), np.float32)
    assert not describe(base[:, ::2]).contiguous
    assert not describe(base.T).contiguous
    assert describe(base[2:5]).contiguous
    assert describe(base[:, 3:4]).shape == (8, 1)
    empty = describe(np.zeros((0, 7168), BF16), name="recv_x")
    assert empty.shape == (0, 7168) and empty.nbytes == 0 and empty.contiguous
    scalar = describe(np.array(5, np.int64))
    assert scalar.shape == () and scalar.nbytes == 8 and scalar.size == 1
    npscalar = describe(np.float32(1.0))
    assert npscalar.shape == () and npscalar.dtype == "float32"


def test_describe_str_names_argument():
    s = str(describe(np.zeros((2, 3), np.int64), name="topk_idx"))
    assert s.startswith("topk_idx:") and "int64" in s and "[2, 3]" in s and "cpu:0" in s


@pytest.mark.parametrize("bad", [[1, 2], 3, "abc", None, object()])
def test_describe_rejects_non_arrays_naming_argument(bad):
    with pytest.raises(DeepEPTypeError, match=r"topk_idx.*__dlpack__"):
        describe(bad, name="topk_idx")
    with pytest.raises(TypeError):  # DeepEPTypeError is a TypeError too
        framework_of(bad, name="topk_idx")


def test_framework_of_numpy_and_cupy():
    assert framework_of(np.zeros(2)) is Framework.NUMPY
    assert framework_of(np.float32(0)) is Framework.NUMPY
    assert framework_of(host_cupy(np.zeros(2))) is Framework.CUPY
    assert framework_of(Producer(np.zeros(2))) is Framework.DLPACK


def test_framework_of_subclass_uses_base_module():
    class MyArray(np.ndarray):
        pass

    assert framework_of(np.zeros(3).view(MyArray)) is Framework.NUMPY


def test_describe_cupy_without_gpu():
    host = np.zeros((4, 8), np.float32)
    c = host_cupy(host)
    d = describe(c, name="x")
    assert (d.framework, d.device_type, d.device_id, d.shape, d.dtype, d.contiguous) == (
        Framework.CUPY, "cuda", 0, (4, 8), "float32", True)
    assert not describe(c[:, ::2]).contiguous
    assert describe(host_cupy(np.zeros(4, np.uint16), BF16)).dtype == "bfloat16"


# Fake framework objects: describe() reads attributes only, so these exercise the torch and
# jax branches without either library installed.

class _TorchDtype:
    def __init__(self, name):
        self.name = name

    def __str__(self):
        return "torch." + self.name


_TorchDtype.__module__ = "torch"


class _TorchDevice:
    def __init__(self, type_, index):
        self.type, self.index = type_, index


class FakeTorchTensor:
    def __init__(self, shape, dtype, device=("cuda", 1), contiguous=True, itemsize=2):
        self.shape, self.dtype = shape, _TorchDtype(dtype)
        self.device = _TorchDevice(*device)
        self._contig, self._itemsize = contiguous, itemsize

    def is_contiguous(self):
        return self._contig

    def element_size(self):
        return self._itemsize


FakeTorchTensor.__module__ = "torch"


class _JaxDevice:
    def __init__(self, platform, hw_id, id_=7):
        self.platform, self.local_hardware_id, self.id = platform, hw_id, id_


class _Sharding:
    memory_kind = "device"


class FakeJaxArray:
    def __init__(self, shape, dtype, devices):
        self.shape, self.dtype, self._devices = shape, np.dtype(dtype), devices
        self.sharding = _Sharding()

    def devices(self):
        if self._devices is None:
            raise RuntimeError("ConcretizationTypeError: abstract tracer value")
        return set(self._devices)


FakeJaxArray.__module__ = "jaxlib._jax"


def test_describe_torch_like():
    t = FakeTorchTensor((16, 7168), "bfloat16", ("cuda", 1), contiguous=False, itemsize=2)
    assert framework_of(t) is Framework.TORCH
    d = describe(t, name="x")
    assert (d.framework, d.dtype, d.device_type, d.device_id, d.contiguous, d.nbytes) == (
        Framework.TORCH, "bfloat16", "cuda", 1, False, 16 * 7168 * 2)
    f8 = describe(FakeTorchTensor((2, 4), "float8_e4m3fn", ("cpu", None), itemsize=1))
    assert (f8.dtype, f8.device_type, f8.device_id, f8.itemsize) == ("float8_e4m3fn", "cpu", 0, 1)


def test_describe_jax_like():
    j = FakeJaxArray((4, 8), FP8, [_JaxDevice("gpu", 1)])
    assert framework_of(j) is Framework.JAX
    d = describe(j, name="x")
    assert (d.framework, d.dtype, d.device_type, d.device_id, d.contiguous, d.nbytes) == (
        Framework.JAX, "float8_e4m3fn", "cuda", 1, True, 32)
    assert describe(FakeJaxArray((2,), np.float32, [_JaxDevice("cpu", None)])).device_type == "cpu"
    with pytest.raises(DeepEPInvalid, match=r"x:.*sharded over 2 devices"):
        describe(FakeJaxArray((4,), np.float32, [_JaxDevice("gpu", 0), _JaxDevice("gpu", 1)]),
                 name="x")
    with pytest.raises(DeepEPTypeError, match=r"topk_idx:.*jit"):
        describe(FakeJaxArray((4,), np.float32, None), name="topk_idx")


def test_describe_generic_dlpack_producer():
    src = np.zeros((3, 4), np.uint16)
    p = Producer(src, dtype="bfloat16")
    d = describe(p, name="x")
    assert (d.framework, d.dtype, d.shape, d.device_type, d.contiguous) == (
        Framework.DLPACK, "bfloat16", (3, 4), "cpu", True)
    assert not describe(Producer(src[:, ::2])).contiguous
    old = Producer(src, strict=True)
    assert describe(old).dtype == "uint16"
    assert old.calls[-1]["max_version"] is None  # fell back to the old protocol


def test_follow_framework():
    assert follow_framework(None, None) is Framework.CUPY
    assert follow_framework() is Framework.CUPY
    assert follow_framework(None, np.zeros(1)) is Framework.NUMPY
    assert follow_framework((FakeTorchTensor((1,), "uint8"), np.zeros(1))) is Framework.TORCH


# ------------------------------------------------------------------------------------------
# DLPack capsule reader / rewriter
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("versioned", [False, True])
def test_read_capsule_strided_int64(versioned):
    base = np.arange(20, dtype=np.int64)
    x = base[3::2]
    cap = x.__dlpack__(max_version=(1, 0)) if versioned else x.__dlpack__()
    info = read_dlpack_capsule(cap)
    assert info.capsule_name == ("dltensor_versioned" if versioned else "dltensor")
    if versioned:
        assert info.version[0] == 1
    else:
        assert info.version is None and info.flags == 0
    assert info.ptr == x.ctypes.data
    assert info.shape == (9,) and info.strides == (2,) and info.byte_strides == (16,)
    assert info.dtype == "int64" and info.itemsize == 8 and info.size == 9
    assert (info.dtype_code, info.dtype_bits, info.dtype_lanes) == (DLDataTypeCode.kDLInt, 64, 1)
    assert info.device_type == DLDeviceType.kDLCPU and info.device_id == 0
    assert not info.is_c_contiguous and not info.read_only


def test_read_capsule_uint8_2d_and_edges():
    x = np.zeros((5, 12), np.uint8)[1:, 2:10]
    info = read_dlpack_capsule(x.__dlpack__())
    assert info.ptr == x.ctypes.data and info.shape == (4, 8) and info.dtype == "uint8"
    assert info.byte_strides == x.strides and not info.is_c_contiguous
    c = np.zeros((3, 4), np.float32)
    ci = read_dlpack_capsule(c.__dlpack__())
    assert ci.is_c_contiguous and ci.byte_strides == c.strides and ci.dtype == "float32"
    zero_d = read_dlpack_capsule(np.array(1.5).__dlpack__())
    assert zero_d.shape == () and zero_d.strides is None and zero_d.byte_strides == ()
    empty = read_dlpack_capsule(np.zeros((0, 3), np.float16).__dlpack__())
    assert empty.shape == (0, 3) and empty.size == 0 and empty.is_c_contiguous
    assert read_dlpack_capsule(np.zeros(3, bool).__dlpack__()).dtype == "bool"


def test_read_capsule_honours_byte_offset():
    x = np.arange(16, dtype=np.float32)[4:]
    cap = x.__dlpack__()
    shift_byte_offset(cap, 16)
    info = read_dlpack_capsule(cap)
    assert info.byte_offset == 16 and info.data == x.ctypes.data - 16
    assert info.ptr == x.ctypes.data


def test_read_capsule_errors():
    with pytest.raises(DeepEPTypeError, match="PyCapsule"):
        read_dlpack_capsule(np.zeros(3))
    cap = np.zeros(3).__dlpack__()
    np.from_dlpack(CapsuleBox(cap))  # consumes it (renames to used_dltensor)
    with pytest.raises(DeepEPInvalid, match="consumed"):
        read_dlpack_capsule(cap)


def test_rewrite_dtype_uint8_to_fp8_and_back():
    x = np.arange(12, dtype=np.uint8).reshape(3, 4)
    cap = x.__dlpack__()
    assert rewrite_capsule_dtype(cap, "float8_e4m3fn") is cap
    info = read_dlpack_capsule(cap)
    assert (info.dtype_code, info.dtype_bits, info.dtype_lanes) == (10, 8, 1)
    assert info.dtype == "float8_e4m3fn" and info.ptr == x.ctypes.data and info.shape == (3, 4)
    # versioned capsules are rewritten in their own layout
    vcap = x.__dlpack__(max_version=(1, 0))
    rewrite_capsule_dtype(vcap, "float8_e5m2")
    assert read_dlpack_capsule(vcap).dtype == "float8_e5m2"
    # a rewritten capsule is still consumable, as the new dtype
    cap2 = x.__dlpack__()
    rewrite_capsule_dtype(cap2, "int8")
    y = np.from_dlpack(CapsuleBox(cap2))
    assert y.dtype == np.int8 and y.ctypes.data == x.ctypes.data
    np.testing.assert_array_equal(y.view(np.uint8), x)


def test_rewrite_dtype_rejects_width_change():
    cap = np.zeros(4, np.uint8).__dlpack__()
    with pytest.raises(DeepEPTypeError, match="8-bit.*bfloat16"):
        rewrite_capsule_dtype(cap, "bfloat16")
    with pytest.raises(DeepEPTypeError):
        rewrite_capsule_dtype(np.zeros(4, np.uint16).__dlpack__(), "float8_e4m3fn")


def test_unconsumed_capsule_frees_on_its_own():
    x = np.zeros(8)
    ref = weakref.ref(x)
    cap = x.__dlpack__()
    read_dlpack_capsule(cap)
    rewrite_capsule_dtype(cap, "int64")
    del x
    gc.collect()
    assert ref() is not None  # the capsule holds the array
    del cap
    gc.collect()
    assert ref() is None  # NumPy's capsule destructor ran the deleter


# ------------------------------------------------------------------------------------------
# capsule -> CuPy (no GPU: the CuPy array is built over a host pointer and never touched)
# ------------------------------------------------------------------------------------------

def test_cupy_from_capsule_fp8_layout_and_lifetime():
    src = np.empty((6, 8), np.uint8)  # owns its memory (weakref target below)
    src[...] = np.arange(48).reshape(6, 8)
    x = src[1:5, ::2]
    ref = weakref.ref(src)
    cap = x.__dlpack__(max_version=(1, 0))
    rewrite_capsule_dtype(cap, "float8_e4m3fn")  # what JAX would export
    set_device_type(cap, DLDeviceType.kDLCUDA)
    c = A._cupy_from_capsule(cap, None, "x")
    assert isinstance(c, cupy.ndarray)
    assert c.dtype == np.uint8 and c.shape == (4, 4) and c.strides == x.strides
    assert c.data.ptr == x.ctypes.data
    del src, x, cap
    gc.collect()
    assert ref() is not None  # the CuPy view keeps the capsule, which keeps the source
    del c
    gc.collect()
    assert ref() is None  # owner -> capsule destructor -> deleter: nothing leaks


def test_cupy_from_capsule_byte_offset_bf16_and_checks():
    src = np.arange(32, dtype=np.uint16)
    cap = src[8:].__dlpack__()
    rewrite_capsule_dtype(cap, "bfloat16")
    shift_byte_offset(cap, 16)
    set_device_type(cap, DLDeviceType.kDLCUDA)
    c = A._cupy_from_capsule(cap, src, "x")
    assert c.dtype == BF16 and c.shape == (24,) and c.data.ptr == src[8:].ctypes.data
    with pytest.raises(DeepEPInvalid, match=r"x:.*not CUDA"):
        A._cupy_from_capsule(np.zeros(3).__dlpack__(), None, "x")


def test_cupy_over_negative_strides_and_empty():
    src = np.arange(10, dtype=np.float32)
    x = src[::-1]
    c = A._cupy_over(x.ctypes.data, x.shape, x.strides, x.dtype, src, 0)
    assert c.data.ptr == x.ctypes.data and c.strides == (-4,)
    assert c.data.mem.ptr == src.ctypes.data and c.data.mem.size == 40
    e = A._cupy_over(0, (0, 5), None, np.dtype(np.float32), None, 0)
    assert e.shape == (0, 5) and e.size == 0
    assert A._extent((3, 4), (16, 4), 4) == (0, 48)
    assert A._extent((3,), (-8,), 8) == (-16, 8)


# ------------------------------------------------------------------------------------------
# to_cupy / from_cupy without a GPU (CuPy arrays over host pointers; errors)
# ------------------------------------------------------------------------------------------

def test_to_cupy_passes_cupy_through():
    c = host_cupy(np.zeros((2, 3), np.float32))
    assert to_cupy(c) is c
    b = host_cupy(np.zeros(4, np.uint16), BF16)
    assert to_cupy(b) is b and b.dtype == BF16


def test_to_cupy_fp8_typed_cupy_becomes_uint8_view():
    host = np.zeros((2, 8), np.uint8)
    c = host_cupy(host, FP8)
    u = to_cupy(c, name="x")
    assert u.dtype == np.uint8 and u.shape == (2, 8) and u.data.ptr == host.ctypes.data


def test_to_cupy_rejects_host_arrays_naming_argument():
    with pytest.raises(DeepEPInvalid, match=r"^x: numpy float32\[3\] on cpu:0.*host memory"):
        to_cupy(np.zeros(3, np.float32), name="x")
    with pytest.raises(DeepEPInvalid, match=r"topk_weights:.*host memory"):
        to_cupy(FakeTorchTensor((3,), "float32", ("cpu", None), itemsize=4),
                name="topk_weights")
    with pytest.raises(DeepEPTypeError, match=r"x:.*__dlpack__"):
        to_cupy([1.0, 2.0], name="x")


def test_from_cupy_cupy_framework():
    host8 = np.zeros((4, 16), np.uint8)
    u8 = host_cupy(host8)
    out = from_cupy(u8, Framework.CUPY, "float8_e4m3fn")
    assert out.dtype == np.uint8 and out.data.ptr == host8.ctypes.data  # CuPy users get uint8
    host16 = np.zeros((4, 16), np.uint16)
    bf = from_cupy(host_cupy(host16), "cupy", "bfloat16")
    assert bf.dtype == BF16 and bf.data.ptr == host16.ctypes.data
    f32 = host_cupy(np.zeros(3, np.float32))
    assert from_cupy(f32, Framework.CUPY) is f32
    assert from_cupy(f32, Framework.DLPACK) is f32


def test_from_cupy_errors():
    c = host_cupy(np.zeros(3, np.float32))
    with pytest.raises(DeepEPInvalid, match=r"recv_x:.*never NumPy"):
        from_cupy(c, Framework.NUMPY, name="recv_x")
    with pytest.raises(DeepEPTypeError, match=r"recv_x:.*float32.*float8_e4m3fn"):
        from_cupy(c, Framework.TORCH, "float8_e4m3fn", name="recv_x")
    with pytest.raises(DeepEPTypeError, match="unknown framework"):
        from_cupy(c, "tensorflow")
    with pytest.raises(DeepEPTypeError, match="cupy.ndarray"):
        from_cupy(np.zeros(3), Framework.CUPY)


# ------------------------------------------------------------------------------------------
# to_numpy (reference backend)
# ------------------------------------------------------------------------------------------

def test_to_numpy_passes_numpy_through():
    x = np.zeros((3, 4), BF16)
    assert to_numpy(x) is x
    s = to_numpy(np.int64(3))
    assert isinstance(s, np.ndarray) and s.dtype == np.int64


def test_to_numpy_generic_producer_standard_dtype():
    src = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = to_numpy(Producer(src))
    assert out.ctypes.data == src.ctypes.data and out.dtype == np.float32
    np.testing.assert_array_equal(out, src)


@pytest.mark.parametrize("logical, storage", [("bfloat16", np.uint16),
                                              ("float8_e4m3fn", np.uint8),
                                              ("float8_e5m2", np.uint8)])
def test_to_numpy_bf16_fp8_via_capsule_zero_copy(logical, storage):
    src = np.empty((6, 10), storage)  # owns its memory (weakref target below)
    src[...] = (np.arange(60) * 37 % 200).reshape(6, 10)
    view = src[1:, ::3]
    ref = weakref.ref(src)
    out = to_numpy(Producer(view, dtype=logical), name="x")
    assert out.dtype == numpy_dtype(logical)
    assert out.ctypes.data == view.ctypes.data and out.strides == view.strides
    np.testing.assert_array_equal(out.view(storage), view)  # bit-exact
    expected = view.copy()
    del src, view
    gc.collect()
    assert ref() is not None  # kept alive through the capsule
    np.testing.assert_array_equal(out.view(storage), expected)
    del out
    gc.collect()
    assert ref() is None


def test_to_numpy_capsule_path_honours_byte_offset():
    src = np.arange(16, dtype=np.uint16)

    class Shifted(Producer):
        def __dlpack__(self, **kwargs):
            cap = super().__dlpack__(**kwargs)
            shift_byte_offset(cap, 8)
            return cap

    out = to_numpy(Shifted(src[4:], dtype="bfloat16"))
    assert out.ctypes.data == src[4:].ctypes.data and out.shape == (12,)
    np.testing.assert_array_equal(out.view(np.uint16), src[4:])


def test_to_numpy_empty_bf16():
    out = to_numpy(Producer(np.zeros((0, 8), np.uint16), dtype="bfloat16"))
    assert out.shape == (0, 8) and out.dtype == BF16


def test_to_numpy_rejects_gpu_arrays_naming_argument():
    c = host_cupy(np.zeros((2, 2), np.float32))
    with pytest.raises(DeepEPInvalid, match=r"^topk_idx: cupy float32\[2, 2\] on cuda:0.*GPU memory"):
        to_numpy(c, name="topk_idx")
    with pytest.raises(DeepEPInvalid, match=r"x: torch bfloat16.*cuda:1.*reference backend"):
        to_numpy(FakeTorchTensor((2,), "bfloat16", ("cuda", 1)), name="x")
    with pytest.raises(DeepEPInvalid, match=r"x: jax.*cuda:0"):
        to_numpy(FakeJaxArray((2,), np.float32, [_JaxDevice("gpu", 0)]), name="x")
    with pytest.raises(DeepEPTypeError, match=r"x:.*__dlpack__"):
        to_numpy({"a": 1}, name="x")


def test_data_pointer_of_cupy_numpy_and_interface_objects():
    """data_pointer reads a view's own start (offset included) without a GPU call."""
    from types import SimpleNamespace
    host = np.zeros(64, np.uint16)
    base = host.ctypes.data
    c = host_cupy(host, BF16)
    assert A.data_pointer(c) == base
    view = c[3:].reshape(61)                     # a bf16 view starting 6 bytes in
    assert A.data_pointer(view, "x") == base + 6
    assert A.data_pointer(host[5:]) == base + 10
    fake = SimpleNamespace(__cuda_array_interface__={"data": (0x1008, False), "shape": (1,)})
    assert A.data_pointer(fake) == 0x1008
    with pytest.raises(DeepEPTypeError, match="^x: .* exposes no data pointer"):
        A.data_pointer(object(), "x")


def test_module_exports():
    for name in A.__all__:
        obj = getattr(A, name)
        assert obj.__doc__, name
    assert A.__doc__ and "zero-copy" in A.__doc__.lower()
