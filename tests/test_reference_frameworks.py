"""The reference backend answers in the caller's framework (issue #13): NumPy in -> NumPy out (the
very arrays the backend made), JAX CPU arrays in -> JAX arrays out, PyTorch CPU tensors in ->
PyTorch tensors out, bfloat16 and float8_e4m3fn included, for every public call: the layout,
dispatch (BF16, float32, the FP8 pair, cached, routed by ``is_token_in_rank`` alone), combine,
and the low-latency pair (BF16, FP8, UE8M0, the receive hook, ``out=``, ``zero_copy``).

Each call runs twice on the same buffer: once with NumPy inputs (the expected values) and once
with the framework's; every returned array must be of the framework, of the expected dtype, and
bit-equal to the NumPy result. Outputs of one call go back into the next (a JAX ``recv_x`` into
``combine``). JAX runs with and without ``jax_enable_x64``: without it JAX has no int64, so
``topk_idx`` goes in as int32 (accepted and widened) and ``recv_topk_idx`` comes back as int32.

One rank (``MPI.COMM_WORLD`` of a plain run); the same file also runs under
``mpiexec -n 2 python3 -m pytest -q tests/test_reference_frameworks.py -p no:cacheprovider``:
every rank makes the same calls in the same order, with inputs of its own.
"""

import contextlib

import ml_dtypes
import numpy as np
import pytest

import deepep_cupy as ep
from deepep_cupy import arrays

BF16, FP8 = ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn
T, H, K, M = 12, 256, 3, 16           # tokens, hidden, top-k, low-latency max tokens per rank
FRAMEWORKS = ("numpy", "jax", "jax_x64", "torch")


@pytest.fixture(scope="module")
def comm():
    from mpi4py import MPI
    return MPI.COMM_WORLD


@pytest.fixture(scope="module")
def buf(comm):
    b = ep.Buffer(comm, backend="reference")
    yield b
    b.destroy()


class Fw:
    """One framework: converts NumPy inputs into it and knows what its outputs look like."""

    def __init__(self, name: str):
        self.name = name
        if name.startswith("jax"):
            self.jax = pytest.importorskip("jax")
            self.jnp = pytest.importorskip("jax.numpy")
        elif name == "torch":
            self.torch = pytest.importorskip("torch")

    @property
    def framework(self) -> arrays.Framework:
        return {"numpy": arrays.Framework.NUMPY, "torch": arrays.Framework.TORCH}.get(self.name, arrays.Framework.JAX)

    def context(self):
        """jax_enable_x64 for "jax_x64" (restored after), nothing elsewhere."""
        return self.jax.enable_x64(True) if self.name == "jax_x64" else contextlib.nullcontext()

    def put(self, a):
        """A NumPy array (or None) as an array of this framework."""
        if a is None or self.name == "numpy":
            return a
        if self.name == "torch":
            if a.dtype == BF16:
                return self.torch.from_numpy(a.view(np.int16).copy()).view(self.torch.bfloat16)
            if a.dtype == FP8:
                return self.torch.from_numpy(a.view(np.uint8).copy()).view(self.torch.float8_e4m3fn)
            return self.torch.from_numpy(a.copy())
        return self.jnp.asarray(a)   # int64 becomes int32 without x64, as in any JAX program

    def out_dtype(self, numpy_dtype) -> str:
        """The dtype this framework's result has for a NumPy result of ``numpy_dtype``."""
        name = arrays.canonical_dtype(numpy_dtype)
        if self.name == "jax" and name == "int64":
            return "int32"           # no 64-bit types without jax_enable_x64
        return name

    def is_native(self, a) -> bool:
        if self.name == "numpy":
            return type(a) is np.ndarray
        if self.name == "torch":
            return isinstance(a, self.torch.Tensor)
        return isinstance(a, self.jax.Array)


def check(fw: Fw, got, want, what: str) -> None:
    """``got`` is ``fw``'s array of ``want``'s dtype (per ``fw.out_dtype``) and values, bit for bit;
    or both are None; tuples (FP8 pairs) element by element."""
    if want is None:
        assert got is None, f"{what}: expected None, got {type(got).__name__}"
        return
    if isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == len(want), f"{what}: expected a pair, got {type(got)}"
        for i, (g, w) in enumerate(zip(got, want)):
            check(fw, g, w, f"{what}[{i}]")
        return
    assert fw.is_native(got), f"{what}: expected a {fw.name} array, got {type(got).__module__}.{type(got).__name__}"
    desc = arrays.describe(got, what)
    assert desc.dtype == fw.out_dtype(want.dtype), f"{what}: dtype {desc.dtype}, expected {fw.out_dtype(want.dtype)}"
    assert desc.device_type == "cpu" and desc.shape == want.shape, f"{what}: {desc}"
    host = arrays.to_numpy(got, what)
    if host.dtype != want.dtype:     # JAX without x64: int32 ids, same values
        np.testing.assert_array_equal(host, want.astype(host.dtype), err_msg=what)
        assert (host.astype(want.dtype) == want).all(), what
        return
    storage = np.dtype(f"u{want.dtype.itemsize}") if want.dtype.kind != "b" else want.dtype
    np.testing.assert_array_equal(np.ascontiguousarray(host).view(storage),
                                  np.ascontiguousarray(want).view(storage), err_msg=what)


def inputs(rank: int, num_experts: int):
    """Routing (int64 topk_idx with -1 slots and a token routed nowhere), weights, bf16 x, biases."""
    rng = np.random.default_rng(100 + rank)
    topk = np.argsort(rng.random((T, num_experts)), axis=1)[:, :K].astype(np.int64)
    topk[2, 1] = -1
    topk[4, :] = -1
    w = rng.random((T, K), dtype=np.float32)
    x = rng.standard_normal((T, H), dtype=np.float32).astype(BF16)
    bias = rng.standard_normal((T, H), dtype=np.float32).astype(BF16)
    return topk, w, x, bias


@pytest.fixture(params=FRAMEWORKS)
def fw(request):
    f = Fw(request.param)
    with f.context():
        yield f


def num_experts_for(buf) -> int:
    return 4 * buf.num_ranks


def test_layout_dispatch_combine(buf, fw):
    E = num_experts_for(buf)
    topk, w, x, bias = inputs(buf.rank, E)
    want_layout = buf.get_dispatch_layout(topk, E)
    layout = buf.get_dispatch_layout(fw.put(topk), E)
    for name, g, wnt in zip(("num_tokens_per_rank", "num_tokens_per_rdma_rank", "num_tokens_per_expert",
                             "is_token_in_rank"), layout[:4], want_layout[:4]):
        check(fw, g, wnt, name)
    per_rank, _, per_expert, in_rank, _ = layout

    # BF16 dispatch with weights; the layout outputs of this framework go back in
    want = buf.dispatch(x, topk_idx=topk, topk_weights=w, num_tokens_per_rank=want_layout[0],
                        num_tokens_per_expert=want_layout[2], is_token_in_rank=want_layout[3])
    got = buf.dispatch(fw.put(x), topk_idx=fw.put(topk), topk_weights=fw.put(w), num_tokens_per_rank=per_rank,
                       num_tokens_per_expert=per_expert, is_token_in_rank=in_rank)
    for i, name in ((0, "recv_x"), (1, "recv_topk_idx"), (2, "recv_topk_weights")):
        check(fw, got[i], want[i], name)
    assert got[3] == want[3] and isinstance(got[3], list)
    recv_x, _, recv_w, _, handle, event = got
    assert isinstance(event, ep.EventOverlap)

    # cached dispatch of float32 data with that handle
    x32 = x.astype(np.float32) * 3
    check(fw, buf.dispatch(fw.put(x32), handle=handle)[0], buf.dispatch(x32, handle=want[4])[0], "cached recv_x")

    # combine of the framework's own recv_x / recv_topk_weights (outputs fed back in), with a bias pair
    want_c = buf.combine(want[0], want[4], topk_weights=want[2], bias=(bias, None))
    got_c = buf.combine(recv_x, handle, topk_weights=recv_w, bias=(fw.put(bias), None))
    check(fw, got_c[0], want_c[0], "combined_x")
    check(fw, got_c[1], want_c[1], "combined_topk_weights")
    sent = (topk >= 0).any(axis=1)
    if buf.num_ranks == 1:   # one rank: each routed token comes back once, plus the bias
        np.testing.assert_array_equal(want_c[0][sent], (x[sent].astype(np.float32)
                                                        + bias[sent].astype(np.float32)).astype(BF16))


def test_fp8_pair_and_rank_mask_dispatch(buf, fw):
    E = num_experts_for(buf)
    topk, w, x, _ = inputs(buf.rank, E)
    from deepep_cupy import reference
    q, s = reference.per_token_cast_to_fp8(x)
    lay = buf.get_dispatch_layout(topk, E)
    kw = dict(num_tokens_per_rank=lay[0], num_tokens_per_expert=lay[2], is_token_in_rank=lay[3])
    fkw = {k: fw.put(v) for k, v in kw.items()}
    want = buf.dispatch((q, s), topk_idx=topk, **kw)
    got = buf.dispatch((fw.put(q), fw.put(s)), topk_idx=fw.put(topk), **fkw)
    check(fw, got[0], want[0], "recv_x (FP8 pair)")
    assert arrays.describe(got[0][0]).dtype == "float8_e4m3fn"
    check(fw, got[1], want[1], "recv_topk_idx")
    assert got[2] is None and want[2] is None
    # the FP8 pair again through the handle (cached)
    check(fw, buf.dispatch((fw.put(q), fw.put(s)), handle=got[4])[0], buf.dispatch((q, s), handle=want[4])[0],
          "cached recv_x (FP8 pair)")

    # routed by is_token_in_rank alone: recv_x in the framework, no expert outputs
    want = buf.dispatch(x, num_tokens_per_rank=lay[0], is_token_in_rank=lay[3])
    got = buf.dispatch(fw.put(x), num_tokens_per_rank=fkw["num_tokens_per_rank"],
                       is_token_in_rank=fkw["is_token_in_rank"])
    check(fw, got[0], want[0], "recv_x (rank mask)")
    assert got[1] is None and got[2] is None and got[3] == []
    check(fw, buf.combine(got[0], got[4])[0], buf.combine(want[0], want[4])[0], "combined_x (rank mask)")


@pytest.mark.parametrize("mode", ["bf16", "fp8", "ue8m0"])
@pytest.mark.parametrize("hook", [False, True], ids=["no-hook", "hook"])
def test_low_latency(buf, fw, mode, hook):
    E = num_experts_for(buf)
    topk, w, x, _ = inputs(buf.rank, E)
    flags = dict(use_fp8=mode != "bf16", round_scale=mode == "ue8m0", use_ue8m0=mode == "ue8m0")
    want_recv, want_count, want_h, _, _ = buf.low_latency_dispatch(x, topk, M, E, **flags)
    recv, count, handle, event, fn = buf.low_latency_dispatch(fw.put(x), fw.put(topk), M, E, return_recv_hook=hook,
                                                             **flags)
    assert (fn is not None) == hook and isinstance(event, ep.EventOverlap)
    if hook:
        fn()
    check(fw, recv, want_recv, "recv_x")
    check(fw, count, want_count, "recv_count")
    if mode == "ue8m0":
        assert arrays.describe(recv[1]).dtype == "int32"

    # expert outputs in the framework: the received bf16 rows (dequantised for FP8), scaled
    y_np = (want_recv if mode == "bf16" else want_recv[0]).astype(np.float32)
    if mode == "fp8":
        y_np = y_np * np.repeat(want_recv[1], 128, axis=-1)
    y_np = (y_np * 0.5).astype(BF16)
    want_out = buf.low_latency_combine(y_np, topk, w, want_h)[0]
    out, event, fn = buf.low_latency_combine(fw.put(y_np), fw.put(topk), fw.put(w), handle, return_recv_hook=hook)
    assert (fn is not None) == hook
    if hook:
        fn()
    check(fw, out, want_out, "combined_x")
    if buf.num_ranks == 1:   # the weighted sum of each token's own (scaled) rows
        assert np.isfinite(want_out.astype(np.float32)).all()


def test_low_latency_out_and_zero_copy(buf, fw):
    """``out=`` (NumPy and PyTorch: written in place and returned as the same object; JAX arrays are
    immutable: refused) and ``zero_copy`` with the buffer's own combine buffer."""
    E = num_experts_for(buf)
    topk, w, x, _ = inputs(buf.rank, E)
    recv, _, handle, _, _ = buf.low_latency_dispatch(fw.put(x), fw.put(topk), M, E, use_fp8=False)
    want = buf.low_latency_combine(arrays.to_numpy(recv), topk, w, handle)[0]
    out = fw.put(np.zeros((T, H), BF16))
    if fw.framework is arrays.Framework.JAX:
        with pytest.raises(ep.DeepEPInvalid, match=r"^out: JAX arrays are immutable"):
            buf.low_latency_combine(recv, fw.put(topk), fw.put(w), handle, out=out)
    else:
        got, _, _ = buf.low_latency_combine(recv, fw.put(topk), fw.put(w), handle, out=out)
        assert got is out
        check(fw, got, want, "out")
    target = buf.get_next_low_latency_combine_buffer(handle)    # the buffer's own (NumPy) array
    assert target is buf.get_next_low_latency_combine_buffer(handle)
    target[...] = arrays.to_numpy(recv)
    got, _, _ = buf.low_latency_combine(target, fw.put(topk), fw.put(w), handle, zero_copy=True)
    check(Fw("numpy"), got, want, "combined_x (zero_copy: follows x, a NumPy array)")


def test_numpy_results_are_the_backend_arrays(buf):
    """NumPy in -> NumPy out costs nothing: the arrays are returned as the backend made them (plain
    ndarrays, writable, not copies of copies)."""
    E = num_experts_for(buf)
    topk, w, x, _ = inputs(buf.rank, E)
    lay = buf.get_dispatch_layout(topk, E)
    recv_x, recv_idx, recv_w, _, handle, _ = buf.dispatch(x, topk_idx=topk, topk_weights=w, num_tokens_per_rank=lay[0],
                                                          num_tokens_per_expert=lay[2], is_token_in_rank=lay[3])
    for a in (lay[0], lay[2], lay[3], recv_x, recv_idx, recv_w):
        assert type(a) is np.ndarray and a.flags.writeable
    assert recv_x.dtype == BF16 and recv_idx.dtype == np.int64


def test_jax_int32_topk_idx_is_widened_and_int32_elsewhere_refused(buf):
    """JAX's default integer is int32 (int64 needs jax_enable_x64): accepted as ``topk_idx`` and
    used as int64, with the same results as int64. NumPy int32 stays refused, naming the argument."""
    jnp = pytest.importorskip("jax.numpy")
    E = num_experts_for(buf)
    topk, w, x, _ = inputs(buf.rank, E)
    want = buf.get_dispatch_layout(topk, E)
    got = buf.get_dispatch_layout(jnp.asarray(topk, dtype=jnp.int32), E)
    for g, wnt in zip(got[:4], want[:4]):
        if wnt is not None:
            np.testing.assert_array_equal(np.asarray(g), wnt)
    with pytest.raises(ep.DeepEPTypeError, match=r"^topk_idx: expected dtype int64, got int32"):
        buf.get_dispatch_layout(topk.astype(np.int32), E)
    with pytest.raises(ep.DeepEPTypeError, match=r"^topk_idx: expected dtype int64 or int32, got int16"):
        buf.get_dispatch_layout(jnp.asarray(topk, dtype=jnp.int16), E)


def test_from_numpy_unit():
    """arrays.from_numpy alone: NumPy returns the same object; bf16/FP8 keep their dtype and bits in
    JAX and PyTorch; a read-only array still converts; CuPy is refused (it lives on the GPU)."""
    a = np.arange(8, dtype=np.float32).reshape(2, 4).astype(BF16)
    assert arrays.from_numpy(a, "numpy") is a
    assert arrays.from_numpy(a.view(np.uint16), arrays.Framework.NUMPY, "bfloat16").dtype == BF16
    with pytest.raises(ep.DeepEPInvalid, match="CuPy arrays live on the GPU"):
        arrays.from_numpy(a, "cupy")
    with pytest.raises(ep.DeepEPTypeError, match="cannot present"):
        arrays.from_numpy(a, "numpy", "float32")
    ro = a.copy()
    ro.flags.writeable = False
    for name in ("jax", "torch"):
        try:
            f = Fw(name)
        except pytest.skip.Exception:
            continue
        for src in (a, ro, a.astype(np.float32).astype(FP8), np.array([[True, False]])):
            out = arrays.from_numpy(src, name)
            assert f.is_native(out) and arrays.describe(out).dtype == arrays.canonical_dtype(src.dtype)
            back = arrays.to_numpy(out)
            np.testing.assert_array_equal(np.ascontiguousarray(back).view(np.uint8),
                                          np.ascontiguousarray(src).view(np.uint8))
