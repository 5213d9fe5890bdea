"""GPU tests of deepep_cupy.arrays: zero-copy in and out of CuPy, PyTorch and JAX.

Skipped (with the reason) when CuPy sees no GPU; the PyTorch and JAX tests are skipped when
that framework is missing or has no CUDA backend. Zero-copy is checked by data-pointer
equality (``cupy.ndarray.data.ptr``, ``torch.Tensor.data_ptr()``,
``jax.Array.unsafe_buffer_pointer()``), contents bit-exactly through integer views.
"""

import gc
import os
import warnings

import numpy as np
import pytest

# JAX must not grab 75% of the GPU that CuPy and PyTorch share in this process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

cupy = pytest.importorskip("cupy")


def _gpu_count():
    try:
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no driver, no device
        return 0


if _gpu_count() == 0:
    pytest.skip("no CUDA GPU visible to CuPy", allow_module_level=True)


from deepep_cupy import arrays as A  # noqa: E402
from deepep_cupy.arrays import (  # noqa: E402
    Framework, ZeroCopyWarning, describe, from_cupy, numpy_dtype, to_cupy, to_numpy)
from deepep_cupy.errors import DeepEPInvalid  # noqa: E402

DTYPES = ["float32", "int64", "bfloat16", "float8_e4m3fn"]
SHAPE = (6, 256)
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_INT = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}  # torch.from_numpy-friendly


def host_bits(dtype, shape=SHAPE, seed=0):
    """A host array of `dtype` with arbitrary (seeded) bit patterns."""
    dt = numpy_dtype(dtype)
    raw = np.random.default_rng(seed).integers(0, 256, size=int(np.prod(shape)) * dt.itemsize,
                                               dtype=np.uint8)
    if dtype == "float32":  # keep floats finite, so nothing depends on NaN payloads
        raw = raw.reshape(-1, 4)
        raw[:, 3] &= 0x3F
    return raw.reshape(-1).view(dt).reshape(shape)


def bits(a):
    """Host array -> unsigned integer view of its bits."""
    a = np.asarray(a)
    return a.view(_UINT[a.dtype.itemsize])


def cupy_bits(c):
    return bits(cupy.asnumpy(c))


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(A, "_warned", set())


# ------------------------------------------------------------------------------------------
# CuPy
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_cupy_in_out_zero_copy(dtype):
    h = host_bits(dtype)
    c = cupy.asarray(bits(h)).view(A._cupy_storage_dtype(dtype))
    d = describe(c, name="x")
    assert (d.device_type, d.device_id, d.framework) == ("cuda", c.device.id, Framework.CUPY)
    assert to_cupy(c) is c
    out = from_cupy(c, Framework.CUPY, dtype)
    assert out.data.ptr == c.data.ptr
    expected = np.uint8 if dtype == "float8_e4m3fn" else numpy_dtype(dtype)
    assert out.dtype == expected
    np.testing.assert_array_equal(cupy_bits(out), bits(h))


def test_cupy_fp8_typed_array_becomes_uint8_view():
    h = host_bits("float8_e4m3fn")
    c = cupy.asarray(bits(h)).view(numpy_dtype("float8_e4m3fn"))
    u = to_cupy(c)
    assert u.dtype == np.uint8 and u.data.ptr == c.data.ptr
    np.testing.assert_array_equal(cupy.asnumpy(u), bits(h))


def test_describe_and_to_numpy_reject_cupy_gpu_arrays():
    c = cupy.zeros((2, 3), cupy.float32)
    with pytest.raises(DeepEPInvalid, match=r"^topk_idx: cupy float32\[2, 3\] on cuda:"):
        to_numpy(c, name="topk_idx")


# ------------------------------------------------------------------------------------------
# PyTorch
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA device")
    return torch


def torch_tensor(torch, h, device="cuda"):
    """Host array (any dtype incl. ml_dtypes) -> CUDA torch tensor with the same bits."""
    t = torch.from_numpy(np.ascontiguousarray(h).view(_INT[h.dtype.itemsize])).to(device)
    return t.view(getattr(torch, h.dtype.name))


def torch_bits(torch, t):
    return bits(t.detach().cpu().view({1: torch.uint8, 2: torch.int16, 4: torch.int32,
                                       8: torch.int64}[t.element_size()]).numpy())


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_in_out_zero_copy(torch, dtype):
    h = host_bits(dtype)
    t = torch_tensor(torch, h)
    d = describe(t, name="x")
    assert (d.dtype, d.device_type, d.device_id, d.framework) == (
        dtype, "cuda", t.device.index, Framework.TORCH)
    c = to_cupy(t, name="x")
    assert c.data.ptr == t.data_ptr()
    assert c.dtype == A._cupy_storage_dtype(dtype) and c.shape == tuple(t.shape)
    np.testing.assert_array_equal(cupy_bits(c), bits(h))
    back = from_cupy(c, Framework.TORCH, d.dtype)
    assert back.data_ptr() == t.data_ptr()
    assert back.dtype == t.dtype and tuple(back.shape) == tuple(t.shape)
    np.testing.assert_array_equal(torch_bits(torch, back), bits(h))


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_strided_and_offset_views(torch, dtype):
    h = host_bits(dtype)
    t = torch_tensor(torch, h)[1:, ::2]
    c = to_cupy(t, name="x")
    assert c.data.ptr == t.data_ptr()
    assert c.strides == tuple(s * t.element_size() for s in t.stride())
    np.testing.assert_array_equal(cupy_bits(c), bits(h[1:, ::2]))
    assert not describe(t).contiguous
    back = from_cupy(c, Framework.TORCH, dtype)
    assert back.data_ptr() == t.data_ptr() and back.stride() == t.stride()


def test_torch_requires_grad_input(torch):
    t = torch.ones(4, 8, device="cuda", requires_grad=True)
    c = to_cupy(t, name="x")
    assert c.data.ptr == t.data_ptr()


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_out_of_fresh_cupy_keeps_memory_alive(torch, dtype):
    h = host_bits(dtype, seed=1)
    c = cupy.asarray(bits(h)).view(A._cupy_storage_dtype(dtype))
    ptr = c.data.ptr
    t = from_cupy(c, Framework.TORCH, dtype)
    assert t.data_ptr() == ptr and str(t.dtype) == "torch." + dtype
    del c
    gc.collect()
    cupy.get_default_memory_pool().free_all_blocks()
    scratch = cupy.ones(int(np.prod(SHAPE)) * 8, cupy.uint8)  # would reuse freed memory
    torch.cuda.synchronize()
    np.testing.assert_array_equal(torch_bits(torch, t), bits(h))
    del scratch


def test_torch_cpu_to_numpy_bf16_fp8(torch):
    for dtype in ("bfloat16", "float8_e4m3fn", "float32"):
        h = host_bits(dtype)
        t = torch_tensor(torch, h, device="cpu")
        n = to_numpy(t, name="x")
        assert n.dtype == numpy_dtype(dtype) and n.ctypes.data == t.data_ptr()
        np.testing.assert_array_equal(bits(n), bits(h))


def test_to_numpy_rejects_torch_gpu_tensor(torch):
    with pytest.raises(DeepEPInvalid, match=r"^x: torch bfloat16\[2\] on cuda:"):
        to_numpy(torch.zeros(2, dtype=torch.bfloat16, device="cuda"), name="x")


@pytest.mark.skipif(_gpu_count() < 2, reason="needs 2 GPUs")
def test_torch_second_device(torch):
    t = torch.arange(16, device="cuda:1", dtype=torch.float32)
    c = to_cupy(t)
    assert c.device.id == 1 and c.data.ptr == t.data_ptr()
    back = from_cupy(c, Framework.TORCH)
    assert back.device == t.device and back.data_ptr() == t.data_ptr()


# ------------------------------------------------------------------------------------------
# JAX
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def jax():
    jax = pytest.importorskip("jax")
    try:
        gpus = jax.devices("gpu")
    except RuntimeError as e:
        pytest.skip(f"JAX has no GPU backend ({e})")
    if not gpus:
        pytest.skip("JAX has no GPU device")
    return jax


def _x64(jax):
    try:
        return bool(jax.config.read("jax_enable_x64"))
    except Exception:
        return bool(getattr(jax.config, "jax_enable_x64", False))


@pytest.fixture
def x64(jax):
    """int64 arrays need jax_enable_x64 (JAX canonicalises 64-bit types to 32-bit otherwise)."""
    prev = _x64(jax)
    jax.config.update("jax_enable_x64", True)
    yield jax
    jax.config.update("jax_enable_x64", prev)


def jax_array(jax, h):
    a = jax.device_put(h, jax.devices("gpu")[0])
    a.block_until_ready()
    assert a.dtype == h.dtype
    return a


@pytest.mark.parametrize("dtype", DTYPES)
def test_jax_in_zero_copy(x64, dtype):
    jax = x64
    h = host_bits(dtype)
    j = jax_array(jax, h)
    d = describe(j, name="x")
    assert (d.dtype, d.device_type, d.framework, d.shape) == (dtype, "cuda", Framework.JAX, SHAPE)
    assert d.device_id == next(iter(j.devices())).local_hardware_id
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c = to_cupy(j, name="x")
    assert c.data.ptr == j.unsafe_buffer_pointer()
    assert c.dtype == A._cupy_storage_dtype(dtype) and c.shape == SHAPE
    np.testing.assert_array_equal(cupy_bits(c), bits(h))
    fallback = [str(w.message) for w in caught if issubclass(w.category, ZeroCopyWarning)]
    if fallback:  # still zero-copy, but through block_until_ready + unsafe_buffer_pointer
        pytest.xfail(f"jaxlib could not export {dtype} through DLPack: {fallback[0]}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_jax_out_zero_copy(x64, dtype):
    h = host_bits(dtype, seed=2)
    c = cupy.asarray(bits(h)).view(A._cupy_storage_dtype(dtype))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        j = from_cupy(c, Framework.JAX, dtype)
    assert j.dtype == numpy_dtype(dtype) and j.shape == SHAPE
    np.testing.assert_array_equal(bits(np.asarray(j)), bits(h))  # bit-exact either way
    copied = [w for w in caught if issubclass(w.category, ZeroCopyWarning)]
    if dtype == "float8_e4m3fn" and copied:
        pytest.xfail(f"this jaxlib rejects FP8 DLPack capsules: {copied[0].message}")
    assert not copied, [str(w.message) for w in copied]
    assert j.unsafe_buffer_pointer() == c.data.ptr


@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn"])
def test_jax_round_trip_no_copy_bit_exact(jax, dtype):
    h = host_bits(dtype, seed=3)
    j = jax_array(jax, h)
    c = to_cupy(j, name="x")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        back = from_cupy(c, Framework.JAX, dtype)
    np.testing.assert_array_equal(bits(np.asarray(back)), bits(h))
    assert back.dtype == j.dtype
    if dtype == "float8_e4m3fn" and any(issubclass(w.category, ZeroCopyWarning) for w in caught):
        pytest.xfail("this jaxlib rejects FP8 DLPack capsules (bit-cast copy used)")
    assert c.data.ptr == j.unsafe_buffer_pointer() == back.unsafe_buffer_pointer()


def test_jax_fp8_in_keeps_buffer_alive(jax):
    h = host_bits("float8_e4m3fn", seed=4)
    j = jax_array(jax, h)
    c = to_cupy(j)
    del j
    gc.collect()
    filler = [jax.device_put(np.ones(SHAPE, np.float32), jax.devices("gpu")[0])
              for _ in range(4)]  # would reuse a freed buffer
    for f in filler:
        f.block_until_ready()
    np.testing.assert_array_equal(cupy.asnumpy(c), bits(h))


def test_jax_fp8_capsule_path_does_not_leak(jax):
    dev = jax.devices("gpu")[0]
    stats = getattr(dev, "memory_stats", lambda: None)()
    if not stats or "bytes_in_use" not in stats:
        pytest.skip("this JAX backend reports no memory_stats")
    gc.collect()
    before = dev.memory_stats()["bytes_in_use"]
    j = jax.device_put(np.zeros((1024, 16384), numpy_dtype("float8_e4m3fn")), dev)  # 16 MiB
    j.block_until_ready()
    for _ in range(50):
        c = to_cupy(j)
        assert c.data.ptr == j.unsafe_buffer_pointer()
        del c
    del j
    gc.collect()
    assert dev.memory_stats()["bytes_in_use"] <= before


def test_jax_out_keeps_cupy_memory_alive(jax):
    h = host_bits("bfloat16", seed=5)
    c = cupy.asarray(bits(h)).view(numpy_dtype("bfloat16"))
    j = from_cupy(c, Framework.JAX, "bfloat16")
    del c
    gc.collect()
    cupy.get_default_memory_pool().free_all_blocks()
    scratch = cupy.ones(int(np.prod(SHAPE)) * 8, cupy.uint8)
    cupy.cuda.Device().synchronize()
    np.testing.assert_array_equal(bits(np.asarray(j)), bits(h))
    del scratch


def test_jax_int64_without_x64_is_reported(jax):
    if _x64(jax):
        pytest.skip("jax_enable_x64 is on for this process")
    c = cupy.arange(8, dtype=cupy.int64)
    with pytest.warns(ZeroCopyWarning, match="copied"):
        j = from_cupy(c, Framework.JAX)
    np.testing.assert_array_equal(np.asarray(j), np.arange(8))


def test_to_numpy_rejects_jax_gpu_array(jax):
    j = jax_array(jax, np.zeros(3, np.float32))
    with pytest.raises(DeepEPInvalid, match=r"^x: jax float32\[3\] on cuda:"):
        to_numpy(j, name="x")


def test_jax_cpu_to_numpy_bf16(jax):
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:
        pytest.skip("JAX has no CPU backend")
    h = host_bits("bfloat16", seed=6)
    j = jax.device_put(h, cpu)
    n = to_numpy(j, name="x")
    assert n.dtype == numpy_dtype("bfloat16") and not n.flags.writeable
    np.testing.assert_array_equal(bits(n), bits(h))
