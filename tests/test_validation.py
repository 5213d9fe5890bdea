"""Bad input raises a clear exception naming the argument, before anything runs, and the buffer
stays usable (the reference backend, one rank; tests/gpu/test_validation_gpu.py does the same on
the GPU backend). Each case below is one distinct mistake a user can make."""

import ml_dtypes
import numpy as np
import pytest

import deepep_cupy as ep

E, T, K, H = 8, 16, 2, 256
BF16, FP8 = ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn


@pytest.fixture(scope="module")
def buf():
    from mpi4py import MPI
    b = ep.Buffer(MPI.COMM_SELF, backend="reference")
    yield b
    b.destroy()


def good_inputs():
    rng = np.random.default_rng(0)
    topk = np.argsort(rng.random((T, E)), axis=1)[:, :K].astype(np.int64)
    x = rng.standard_normal((T, H)).astype(BF16)
    w = rng.random((T, K)).astype(np.float32)
    return topk, x, w


def layout(buf, topk, e=E):
    return buf.get_dispatch_layout(topk, e)


def dispatch_kwargs(buf, topk, x, w):
    per_rank, _, per_expert, in_rank, _ = layout(buf, topk)
    return dict(x=x, topk_idx=topk, topk_weights=w, num_tokens_per_rank=per_rank,
                num_tokens_per_expert=per_expert, is_token_in_rank=in_rank)


def _cases():
    topk, x, w = good_inputs()
    return [
        # (id, call(buf), exception type, message must contain)
        ("topk_idx int32", lambda b: layout(b, topk.astype(np.int32)), TypeError, "topk_idx: expected dtype int64"),
        ("topk_idx 1-D", lambda b: layout(b, topk[:, 0].copy()), ValueError, "topk_idx: expected 2 dimensions"),
        ("topk_idx non-contiguous", lambda b: layout(b, np.asfortranarray(topk)), ValueError, "topk_idx: expected a C-contiguous"),
        ("topk_idx not an array", lambda b: layout(b, topk.tolist()), TypeError, "topk_idx"),
        ("topk_idx zero columns", lambda b: layout(b, np.zeros((T, 0), np.int64)), ValueError, "top-k column"),
        ("expert id >= num_experts", lambda b: layout(b, np.where(topk == 0, E, topk)), ValueError, f"topk_idx: expected values in [-1, {E})"),
        ("expert id < -1", lambda b: layout(b, np.where(topk == 0, -2, topk)), ValueError, "found -2"),
        ("num_experts not an int", lambda b: layout(b, topk, 8.0), TypeError, "num_experts: expected an int"),
        ("num_experts zero", lambda b: layout(b, topk, 0), ValueError, "num_experts: expected >= 1"),
        ("x int32", lambda b: b.dispatch(**{**dispatch_kwargs(b, topk, x, w), "x": np.zeros((T, H), np.int32)}), TypeError, "x: expected dtype bfloat16 or float32"),
        ("x rows != topk rows", lambda b: b.dispatch(**{**dispatch_kwargs(b, topk, x, w), "x": x[:-1].copy()}), ValueError, "topk_idx: expected 15 rows like x"),
        ("topk_weights shape", lambda b: b.dispatch(**{**dispatch_kwargs(b, topk, x, w), "topk_weights": w[:, :1].copy()}), ValueError, "topk_weights: expected shape"),
        ("topk_weights float16", lambda b: b.dispatch(**{**dispatch_kwargs(b, topk, x, w), "topk_weights": w.astype(np.float16)}), TypeError, "topk_weights: expected dtype float32"),
        ("fp8 scales shape", lambda b: b.dispatch(**{**dispatch_kwargs(b, topk, x, w), "x": (x.astype(FP8), np.ones((T, 1), np.float32))}), ValueError, "x[1]: expected shape"),
        ("fp8 hidden not /128", lambda b: b.dispatch(**{**dispatch_kwargs(b, topk, x, w), "x": (np.zeros((T, 100), FP8), np.ones((T, 1), np.float32))}), ValueError, "multiple of 128"),
        ("expert_alignment 0", lambda b: b.dispatch(**dispatch_kwargs(b, topk, x, w), expert_alignment=0), ValueError, "expert_alignment: expected >= 1"),
        ("num_worst_tokens negative", lambda b: b.dispatch(**dispatch_kwargs(b, topk, x, w), num_worst_tokens=-1), ValueError, "num_worst_tokens"),
        ("num_worst_tokens too small", lambda b: b.dispatch(**dispatch_kwargs(b, topk, x, w), num_worst_tokens=1), ValueError, "num_worst_tokens"),
        ("is_token_in_rank shape", lambda b: b.dispatch(**{**dispatch_kwargs(b, topk, x, w), "is_token_in_rank": np.zeros((T, 2), bool)}), ValueError, "is_token_in_rank: expected shape"),
        ("missing topk_idx and is_token_in_rank", lambda b: b.dispatch(x, num_tokens_per_expert=layout(b, topk)[2]), ValueError, "topk_idx: required"),
        ("combine with a bad handle", lambda b: b.combine(x, handle=("not", "a", "handle")), TypeError, "handle: expected"),
        ("config of the wrong type", lambda b: b.dispatch(**dispatch_kwargs(b, topk, x, w), config={"num_sms": 20}), TypeError, "config: expected a Config"),
        ("ll tokens > max per rank", lambda b: b.low_latency_dispatch(x, topk, 4, E), ValueError, "num_max_dispatch_tokens_per_rank=4"),
        ("ll ue8m0 without round_scale", lambda b: b.low_latency_dispatch(x, topk, T, E, use_ue8m0=True), ValueError, "use_ue8m0"),
        ("ll x float32", lambda b: b.low_latency_dispatch(x.astype(np.float32), topk, T, E), TypeError, "x: expected dtype bfloat16"),
        ("ll hidden not /128", lambda b: b.low_latency_dispatch(np.zeros((T, 200), BF16), topk, T, E), ValueError, "x: low-latency hidden sizes are multiples of 128"),
        ("ll hidden above 8192", lambda b: b.low_latency_dispatch(np.zeros((T, 8320), BF16), topk, T, E), ValueError, "up to 8192"),
        ("ll top-k above 16", lambda b: b.low_latency_dispatch(x, np.zeros((T, 17), np.int64), T, E), ValueError, "topk_idx: at most 16"),
        ("ll max tokens above 1024", lambda b: b.low_latency_dispatch(x, topk, 1025, E), ValueError, "num_max_dispatch_tokens_per_rank: at most 1024"),
        ("ll experts above 1024", lambda b: b.low_latency_dispatch(x, topk, T, 2048), ValueError, "num_experts: at most 1024"),
        ("ll async_finish with hook", lambda b: b.low_latency_dispatch(x, topk, T, E, async_finish=True, return_recv_hook=True), ValueError, "async_finish"),
        ("ll combine bad handle", lambda b: b.low_latency_combine(np.zeros((1, 1, H), BF16), topk, w, handle="h"), TypeError, "handle: expected"),
        ("previous_event wrong type", lambda b: b.get_dispatch_layout(topk, E, previous_event="event"), TypeError, "previous_event"),
    ]


CASES = _cases()


def assert_still_usable(buf):
    """A full good round trip on ``buf`` (one rank): combine gives back x and the weights."""
    topk, x, w = good_inputs()
    recv_x, _, recv_w, _, handle, _ = buf.dispatch(**dispatch_kwargs(buf, topk, x, w))
    combined, combined_w, _ = buf.combine(recv_x, handle, topk_weights=recv_w)
    np.testing.assert_array_equal(combined, x)
    np.testing.assert_array_equal(combined_w, w)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_and_buffer_stays_usable(buf, case):
    name, call, exc_type, fragment = case
    with pytest.raises(exc_type) as info:
        call(buf)
    assert isinstance(info.value, ep.DeepEPInvalid), type(info.value)
    assert fragment in str(info.value), f"{name}: {info.value}"
    assert_still_usable(buf)


def test_at_least_fifteen_distinct_bad_inputs():
    assert len({c[0] for c in CASES}) >= 15


def test_buffer_constructor_rejects_bad_arguments():
    from mpi4py import MPI
    with pytest.raises(ep.DeepEPInvalid, match="backend"):
        ep.Buffer(MPI.COMM_SELF, backend="tpu")
    with pytest.raises(TypeError, match="comm"):
        ep.Buffer("world", backend="reference")
    with pytest.raises(ValueError, match="num_nvl_bytes"):
        ep.Buffer(MPI.COMM_SELF, num_nvl_bytes=-1, backend="reference")
    with pytest.raises(ValueError, match="ranks_per_node"):
        ep.Buffer(MPI.COMM_SELF, ranks_per_node=2, backend="reference")
    with pytest.raises(ValueError, match="num_sms"):
        ep.Config(num_sms=3)


def test_destroyed_buffer_raises():
    from mpi4py import MPI
    b = ep.Buffer(MPI.COMM_SELF, backend="reference")
    b.destroy()
    topk, _, _ = good_inputs()
    with pytest.raises(ep.DeepEPInvalid, match="destroyed"):
        b.get_dispatch_layout(topk, E)
    with pytest.raises(ep.DeepEPInvalid, match="destroyed"):
        b.capture()


def test_dispatch_without_topk_routes_by_rank_mask(buf):
    """DeepEP's dispatch without topk_idx: is_token_in_rank alone decides where rows go."""
    topk, x, w = good_inputs()
    per_rank, _, per_expert, in_rank, _ = layout(buf, topk)
    with_topk = buf.dispatch(x, topk_idx=topk, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                             num_tokens_per_expert=per_expert)
    recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
        x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank)
    np.testing.assert_array_equal(recv_x, with_topk[0])
    assert recv_idx is None and recv_w is None and counts == []
    combined, combined_w, _ = buf.combine(recv_x, handle)
    np.testing.assert_array_equal(combined, x)
    assert combined_w is None
    with pytest.raises(ValueError, match="topk_weights: needs topk_idx"):
        buf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, topk_weights=w)


def test_expect_aligned_names_the_argument_and_the_pointer():
    """A pointer that is not a multiple of 16 (a view starting mid-row) is refused before launch:
    a 16-byte load on it would fault and take the CUDA context down."""
    from types import SimpleNamespace
    from deepep_cupy.validation import VECTOR_ALIGNMENT, expect_aligned
    assert VECTOR_ALIGNMENT == 16
    expect_aligned(SimpleNamespace(data=SimpleNamespace(ptr=0x7F0000001000)), "x")
    with pytest.raises(ep.DeepEPInvalid, match=r"^x: data pointer 0x7f0000001002 is not 16-byte aligned "
                                                r"\(a view that starts mid-row\?\)"):
        expect_aligned(SimpleNamespace(data=SimpleNamespace(ptr=0x7F0000001002)), "x")
    odd = SimpleNamespace(__cuda_array_interface__={"data": (0x1008, False)})
    expect_aligned(odd, "topk_idx", 8)
    with pytest.raises(ep.DeepEPInvalid, match="^bias: data pointer 0x1008 is not 16-byte aligned"):
        expect_aligned(odd, "bias")
    base = np.zeros(64, np.uint16)                        # numpy views work too
    start = (-base.ctypes.data % 16) // 2                 # the first 16-byte aligned element
    expect_aligned(base[start:], "x")
    with pytest.raises(ep.DeepEPInvalid, match="x: data pointer"):
        expect_aligned(base[start + 1:], "x")


def test_gpu_take_checks_alignment_before_launch(monkeypatch):
    """Buffer._take on the GPU backend: element-size alignment always, 16 bytes where asked; the
    reference backend's host arrays pass (their alignment says nothing about a device copy)."""
    from types import SimpleNamespace
    from deepep_cupy import arrays
    from deepep_cupy.gpu_backend import GpuBackend
    from deepep_cupy.reference_backend import ReferenceBackend
    from deepep_cupy.validation import VECTOR_ALIGNMENT
    monkeypatch.setattr(arrays, "to_cupy", lambda x, name: x)
    b = object.__new__(ep.Buffer)
    b._backend = GpuBackend.__new__(GpuBackend)     # take() needs nothing of a live GPU backend
    assert b.backend_name == "gpu"
    fake = lambda ptr, itemsize: SimpleNamespace(data=SimpleNamespace(ptr=ptr), itemsize=itemsize)
    assert b._take(fake(0x1000, 2), "x", VECTOR_ALIGNMENT).data.ptr == 0x1000
    b._take(fake(0x1002, 2), "x")                         # only element-size alignment asked
    with pytest.raises(ep.DeepEPInvalid, match="^x: data pointer 0x1002 is not 16-byte aligned"):
        b._take(fake(0x1002, 2), "x", VECTOR_ALIGNMENT)
    with pytest.raises(ep.DeepEPInvalid, match="^topk_idx: data pointer 0x1004 is not 8-byte aligned"):
        b._take(fake(0x1004, 8), "topk_idx")
    b._backend = ReferenceBackend.__new__(ReferenceBackend)
    base = np.zeros(64, np.uint16)
    assert b._take(base[(-base.ctypes.data % 16) // 2 + 1:], "x", VECTOR_ALIGNMENT).dtype == np.uint16


def _bool_and_event_calls():
    """(id, argument, call(buf, bad value)) for every bool and event argument of the public calls."""
    topk, x, w = good_inputs()
    M = T

    def ht(b):
        kw = dispatch_kwargs(b, topk, x, w)
        recv_x, _, recv_w, _, handle, _ = b.dispatch(**kw)
        return kw, recv_x, recv_w, handle

    def ll(b):
        recv, _, handle, _, _ = b.low_latency_dispatch(x, topk, M, E, use_fp8=False)
        return recv, handle

    calls = []
    for arg in ("async_finish", "allocate_on_comm_stream"):
        calls += [
            (f"get_dispatch_layout-{arg}", arg, lambda b, v, a=arg: b.get_dispatch_layout(topk, E, **{a: v})),
            (f"dispatch-{arg}", arg, lambda b, v, a=arg: b.dispatch(**ht(b)[0], **{a: v})),
            (f"cached-dispatch-{arg}", arg, lambda b, v, a=arg: b.dispatch(x, handle=ht(b)[3], **{a: v})),
            (f"combine-{arg}", arg, lambda b, v, a=arg: (lambda r: b.combine(r[1], r[3], **{a: v}))(ht(b))),
        ]
    for arg in ("use_fp8", "round_scale", "use_ue8m0", "async_finish", "return_recv_hook"):
        calls.append((f"low_latency_dispatch-{arg}", arg,
                      lambda b, v, a=arg: b.low_latency_dispatch(x, topk, M, E, **{a: v})))
    for arg in ("zero_copy", "async_finish", "return_recv_hook"):
        calls.append((f"low_latency_combine-{arg}", arg,
                      lambda b, v, a=arg: (lambda r: b.low_latency_combine(r[0], topk, w, r[1], **{a: v}))(ll(b))))
    for name, call in (("get_dispatch_layout", lambda b, v: b.get_dispatch_layout(topk, E, previous_event=v)),
                       ("dispatch", lambda b, v: b.dispatch(**ht(b)[0], previous_event=v)),
                       ("cached-dispatch", lambda b, v: b.dispatch(x, handle=ht(b)[3], previous_event=v)),
                       ("combine", lambda b, v: (lambda r: b.combine(r[1], r[3], previous_event=v))(ht(b)))):
        calls.append((f"{name}-previous_event", "previous_event", call))
    return calls


BOOL_AND_EVENT_CALLS = _bool_and_event_calls()


@pytest.mark.parametrize("case", BOOL_AND_EVENT_CALLS, ids=[c[0] for c in BOOL_AND_EVENT_CALLS])
@pytest.mark.parametrize("bad", [1, "yes", np.True_], ids=["int", "str", "numpy-bool"])
def test_bool_and_event_arguments_are_type_checked(buf, case, bad):
    """The GPU backend's argument types on the reference backend too (issue #15): every flag must be
    a Python bool and every previous_event an EventOverlap (a truthy 1, "yes" or numpy bool would
    silently mean True on one backend and fail on the other), through the same checks
    (validation.expect_bool / expect_stream_args) on both. The buffer stays usable."""
    _, arg, call = case
    with pytest.raises(ep.DeepEPTypeError) as info:
        call(buf, bad)
    assert str(info.value).startswith(f"{arg}: expected a"), str(info.value)
    assert_still_usable(buf)


def test_constructor_flags_are_type_checked():
    from mpi4py import MPI
    for arg in ("low_latency_mode", "allow_nvlink_for_low_latency_mode"):
        with pytest.raises(ep.DeepEPTypeError, match=f"^{arg}: expected a bool"):
            ep.Buffer(MPI.COMM_SELF, backend="reference", **{arg: 1})
    b = ep.Buffer(MPI.COMM_SELF, backend="reference", low_latency_mode=True)
    assert b.low_latency_mode is True
    b.destroy()


def test_public_alive_device_id_and_adopt_handle():
    """What framework integrations (deepep_cupy.jaxep) use instead of Buffer's private parts: a
    handle rebuilt from a dispatch's arrays is refused until adopted, and accepted after."""
    import copy
    from mpi4py import MPI
    b = ep.Buffer(MPI.COMM_SELF, backend="reference")
    assert b.alive and b.device_id is None
    topk, x, w = good_inputs()
    recv_x, _, _, _, handle, _ = b.dispatch(**dispatch_kwargs(b, topk, x, w))
    want = b.combine(recv_x, handle)[0]
    rebuilt = copy.copy(handle)           # the same arrays, another object: as a framework rebuilds it
    with pytest.raises(ep.DeepEPInvalid, match="handle"):
        b.combine(recv_x, rebuilt)
    with pytest.raises(ep.DeepEPTypeError, match="^handle: expected a handle of a dispatch .*got int"):
        b.adopt_handle(123)
    assert b.adopt_handle(rebuilt) is rebuilt
    np.testing.assert_array_equal(np.asarray(b.combine(recv_x, rebuilt)[0]).view(np.uint16),
                                  np.asarray(want).view(np.uint16))
    b.destroy()
    assert not b.alive
    with pytest.raises(ep.DeepEPInvalid, match="destroyed"):
        b.adopt_handle(rebuilt)


def test_capture_gives_a_previous_event(buf):
    """``Buffer.capture()`` (DeepEP's): an ``EventOverlap`` to pass as ``previous_event``; on the
    reference backend nothing is queued, so it is done and the call after it is exact."""
    topk, x, w = good_inputs()
    event = buf.capture()
    assert isinstance(event, ep.EventOverlap) and event.event is None and event.done
    recv_x = buf.dispatch(**dispatch_kwargs(buf, topk, x, w), previous_event=event)[0]
    np.testing.assert_array_equal(recv_x, ep.reference.dispatch([x], [topk], [w], E)[0].recv_x)
