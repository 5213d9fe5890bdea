"""Bad-input sweep (issue #12), reference backend on one rank (MPI.COMM_SELF).

One table, one row per kind of mistake. Each row is checked for three things:

  (a) the exception is exactly the expected ``DeepEPInvalid`` / ``DeepEPTypeError``;
  (b) the message starts with the name of the offending argument (``"topk_idx: ..."``);
  (c) afterwards the same buffer still works: a high-throughput layout + dispatch + combine and a
      low-latency dispatch + combine return what the ``deepep_cupy.reference`` model returns.

Kinds that only exist on a GPU (a device pointer that is not 16-byte aligned, an array on another
GPU, a host array passed to the GPU backend) are in tests/gpu/test_bad_inputs_gpu.py. The
reference backend deliberately does not check host pointers' alignment (see ``Buffer._take``).
A mismatch across ranks (a different hidden on one rank) needs several ranks and is not here.
"""

import re
from typing import Callable, NamedTuple

import ml_dtypes
import numpy as np
import pytest

import deepep_cupy as ep
from deepep_cupy import arrays, reference

E, T, K, H, M = 8, 16, 2, 256, 32          # experts, tokens, top-k, hidden, low-latency max tokens
BF16, FP8 = ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn
Invalid, TypeErr = ep.DeepEPInvalid, ep.DeepEPTypeError


def new_buffer():
    from mpi4py import MPI
    return ep.Buffer(MPI.COMM_SELF, backend="reference")


@pytest.fixture(scope="module")
def buf():
    b = new_buffer()
    yield b
    b.destroy()


def inputs(seed=0, num_experts=E):
    """(topk_idx int64 [T, K] with a few -1 slots and one token routed nowhere, x bf16 [T, H],
    topk_weights float32 [T, K])."""
    rng = np.random.default_rng(seed)
    topk = np.argsort(rng.random((T, num_experts)), axis=1)[:, :K].astype(np.int64)
    topk[3, 1] = -1
    topk[5, :] = -1
    x = rng.standard_normal((T, H), dtype=np.float32).astype(BF16)
    w = rng.random((T, K), dtype=np.float32)
    return topk, x, w


TOPK, X, W = inputs()


def layout_kwargs(b, topk=TOPK, num_experts=E):
    per_rank, _, per_expert, in_rank, _ = b.get_dispatch_layout(topk, num_experts)
    return dict(num_tokens_per_rank=per_rank, num_tokens_per_expert=per_expert, is_token_in_rank=in_rank)


def dispatch(b, **over):
    """A good dispatch of (X, TOPK, W), with some arguments replaced."""
    kw = dict(x=X, topk_idx=TOPK, topk_weights=W, **layout_kwargs(b))
    kw.update(over)
    return b.dispatch(**kw)


def ht_handle(b):
    """(recv_x, recv_topk_weights, handle) of a good dispatch on ``b``."""
    recv_x, _, recv_w, _, handle, _ = dispatch(b)
    return recv_x, recv_w, handle


def ll_dispatch(b, num_experts=E):
    """(recv_x, handle) of a good BF16 low-latency dispatch on ``b``."""
    topk = TOPK if num_experts == E else inputs(0, num_experts)[0]
    recv_x, _, handle, _, _ = b.low_latency_dispatch(X, topk, M, num_experts, use_fp8=False)
    return recv_x, handle


def topk33():
    """int64 [T, 33]: TOPK in the first columns, -1 in the rest (33 > the GPU's 32 top-k columns)."""
    return np.concatenate([TOPK, np.full((T, 33 - K), -1, np.int64)], axis=1)


def read_only(shape, dtype=BF16):
    a = np.zeros(shape, dtype)
    a.flags.writeable = False
    return a


def with_nan(a, where=(2, 0), value=np.nan):
    a = a.copy()
    a[where] = value
    return a


class PosingAsCuda:
    """A DLPack producer over a host array that reports itself on CUDA device 0: what a CuPy or
    PyTorch GPU array looks like to the front end, without a GPU (its data is never read)."""

    def __init__(self, arr):
        self.arr = arr

    def __dlpack_device__(self):
        return (2, 0)   # kDLCUDA, device 0

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        cap = self.arr.__dlpack__() if max_version is None else self.arr.__dlpack__(max_version=max_version)
        arrays._tensor_struct(cap)[0].device.device_type = 2
        return cap


def with_other_buffers_handle(call, destroyed: bool, low_latency: bool = False):
    """``call(handle)`` with the handle of a second buffer's dispatch (that buffer destroyed first,
    or not); the second buffer is destroyed in the end either way."""
    other = new_buffer()
    try:
        handle = ll_dispatch(other)[1] if low_latency else ht_handle(other)[2]
        if destroyed:
            other.destroy()
        return call(handle)
    finally:
        other.destroy()     # idempotent


def every_call_after_destroy(_b):
    """Every public method of a destroyed buffer raises naming ``self``; the last one propagates."""
    d = new_buffer()
    recv_x, recv_w, handle = ht_handle(d)
    ll_recv, ll_handle = ll_dispatch(d)
    lay = layout_kwargs(d)
    d.destroy()
    calls = [lambda: d.dispatch(X, topk_idx=TOPK, **lay),
             lambda: d.dispatch(X, handle=handle),
             lambda: d.combine(recv_x, handle, topk_weights=recv_w),
             lambda: d.low_latency_dispatch(X, TOPK, M, E, use_fp8=False),
             lambda: d.low_latency_combine(ll_recv, TOPK, W, ll_handle),
             lambda: d.clean_low_latency_buffer(M, H, E),
             lambda: d.get_next_low_latency_combine_buffer(ll_handle),
             lambda: d.get_dispatch_layout(TOPK, E)]
    for call in calls[:-1]:
        with pytest.raises(Invalid, match="^self: this Buffer was destroyed"):
            call()
    d.destroy()                             # idempotent
    calls[-1]()


class Case(NamedTuple):
    id: str                      # the kind of mistake
    arg: str                     # the argument the message must start with
    exc: type                    # exactly this exception type
    fragment: str                # and this text somewhere in the message
    call: Callable               # call(buf) must raise


CASES = [
    # ---- topk_idx (get_dispatch_layout) ----
    Case("topk_idx-dtype-int32", "topk_idx", TypeErr, "expected dtype int64",
         lambda b: b.get_dispatch_layout(TOPK.astype(np.int32), E)),
    Case("topk_idx-not-an-array", "topk_idx", TypeErr, "__dlpack__",
         lambda b: b.get_dispatch_layout(TOPK.tolist(), E)),
    Case("topk_idx-1-D", "topk_idx", Invalid, "expected 2 dimensions",
         lambda b: b.get_dispatch_layout(TOPK[:, 0].copy(), E)),
    Case("topk_idx-non-contiguous-view", "topk_idx", Invalid, "C-contiguous",
         lambda b: b.get_dispatch_layout(np.repeat(TOPK, 2, axis=1)[:, ::2], E)),
    Case("topk_idx-negative-stride-view", "topk_idx", Invalid, "C-contiguous",
         lambda b: b.get_dispatch_layout(TOPK[::-1], E)),
    Case("topk_idx-device-array-to-host-backend", "topk_idx", Invalid, "expected an array on cpu, got one on cuda:0",
         lambda b: b.get_dispatch_layout(PosingAsCuda(TOPK), E)),
    Case("topk_idx-expert-id-too-large", "topk_idx", Invalid, f"expected values in [-1, {E}), found {E}",
         lambda b: b.get_dispatch_layout(np.where(TOPK == 0, E, TOPK), E)),
    Case("topk_idx-expert-id-below-minus-one", "topk_idx", Invalid, "found -2",
         lambda b: b.get_dispatch_layout(np.where(TOPK == 0, -2, TOPK), E)),
    # ---- num_experts ----
    Case("num_experts-not-an-int", "num_experts", TypeErr, "expected an int",
         lambda b: b.get_dispatch_layout(TOPK, 8.0)),
    Case("num_experts-zero", "num_experts", Invalid, "expected >= 1",
         lambda b: b.get_dispatch_layout(TOPK, 0)),
    Case("num_experts-changed-since-layout", "topk_idx", Invalid, f"expected values in [-1, {E})",
         lambda b: dispatch(b, topk_idx=inputs(1, 2 * E)[0], **layout_kwargs(b))),
    # ---- get_dispatch_layout outputs that do not belong to topk_idx (values; new checks) ----
    Case("stale-num_tokens_per_expert", "num_tokens_per_expert", Invalid, "does not match topk_idx",
         lambda b: dispatch(b, num_tokens_per_expert=layout_kwargs(b, inputs(7)[0])["num_tokens_per_expert"])),
    Case("stale-is_token_in_rank", "is_token_in_rank", Invalid, "does not match topk_idx",
         lambda b: dispatch(b, is_token_in_rank=~layout_kwargs(b)["is_token_in_rank"])),
    Case("stale-num_tokens_per_rank", "num_tokens_per_rank", Invalid, "does not match topk_idx",
         lambda b: dispatch(b, num_tokens_per_rank=layout_kwargs(b)["num_tokens_per_rank"] + 1)),
    Case("rank-mask-num_tokens_per_rank-wrong", "num_tokens_per_rank", Invalid, "column sums of is_token_in_rank",
         lambda b: b.dispatch(X, num_tokens_per_rank=layout_kwargs(b)["num_tokens_per_rank"] - 1,
                              is_token_in_rank=layout_kwargs(b)["is_token_in_rank"])),
    # ---- dispatch: x, weights, layout arrays, options ----
    Case("x-dtype-int32", "x", TypeErr, "expected dtype bfloat16 or float32",
         lambda b: dispatch(b, x=np.zeros((T, H), np.int32))),
    Case("x-negative-stride-view", "x", Invalid, "C-contiguous",
         lambda b: dispatch(b, x=X[::-1])),
    Case("x-non-contiguous-view", "x", Invalid, "C-contiguous",
         lambda b: dispatch(b, x=np.repeat(X, 2, axis=1)[:, ::2])),
    Case("x-rows-differ-from-topk_idx", "topk_idx", Invalid, f"expected {T - 1} rows like x",
         lambda b: dispatch(b, x=X[:-1].copy())),
    Case("fp8-scales-wrong-shape", "x[1]", Invalid, "expected shape",
         lambda b: dispatch(b, x=(X.astype(FP8), np.ones((T, 1), np.float32)))),
    Case("topk_weights-NaN", "topk_weights", Invalid, "found nan at index (2, 0)",
         lambda b: dispatch(b, topk_weights=with_nan(W))),
    Case("topk_weights-infinite", "topk_weights", Invalid, "found inf",
         lambda b: dispatch(b, topk_weights=with_nan(W, (4, 1), np.inf))),
    Case("topk_weights-wrong-shape", "topk_weights", Invalid, "expected shape",
         lambda b: dispatch(b, topk_weights=W[:, :1].copy())),
    Case("topk_weights-float64", "topk_weights", TypeErr, "expected dtype float32",
         lambda b: dispatch(b, topk_weights=W.astype(np.float64))),
    Case("num_tokens_per_rank-int64", "num_tokens_per_rank", TypeErr, "expected dtype int32",
         lambda b: dispatch(b, num_tokens_per_rank=np.full(1, T, np.int64))),
    Case("is_token_in_rank-wrong-shape", "is_token_in_rank", Invalid, "expected shape",
         lambda b: dispatch(b, is_token_in_rank=np.ones((T, 2), bool))),
    Case("expert_alignment-zero", "expert_alignment", Invalid, "expected >= 1",
         lambda b: dispatch(b, expert_alignment=0)),
    Case("num_worst_tokens-too-small", "num_worst_tokens", Invalid, "too small",
         lambda b: dispatch(b, num_worst_tokens=1)),
    Case("config-wrong-type", "config", TypeErr, "expected a Config",
         lambda b: dispatch(b, config={"num_sms": 20})),
    Case("previous_event-wrong-type", "previous_event", TypeErr, "expected an EventOverlap",
         lambda b: dispatch(b, previous_event="event")),
    Case("async_finish-not-a-bool", "async_finish", TypeErr, "expected a bool",
         lambda b: dispatch(b, async_finish="yes")),
    Case("allocate_on_comm_stream-without-previous_event", "allocate_on_comm_stream", TypeErr,
         "needs previous_event", lambda b: dispatch(b, allocate_on_comm_stream=True)),
    # ---- handles: wrong kind, another buffer's, a destroyed buffer's; cached dispatch; combine ----
    Case("handle-not-a-handle", "handle", TypeErr, "expected the ReferenceDispatchHandle",
         lambda b: b.combine(X, handle=("not", "a", "handle"))),
    Case("handle-of-low-latency-mode-to-combine", "handle", TypeErr, "got ReferenceLowLatencyHandle",
         lambda b: b.combine(X, handle=ll_dispatch(b)[1])),
    Case("handle-from-another-buffer", "handle", Invalid, "made by another buffer",
         lambda b: with_other_buffers_handle(lambda h: b.combine(X, h), destroyed=False)),
    Case("handle-from-a-destroyed-buffer", "handle", Invalid, "destroyed since",
         lambda b: with_other_buffers_handle(lambda h: b.combine(X, h), destroyed=True)),
    Case("cached-dispatch-x-rows-differ", "x", Invalid, f"made for {T} tokens",
         lambda b: b.dispatch(X[:-1].copy(), handle=ht_handle(b)[2])),
    Case("cached-dispatch-with-topk_idx", "topk_idx", Invalid, "must be None in cached mode",
         lambda b: b.dispatch(X, handle=ht_handle(b)[2], topk_idx=TOPK)),
    Case("cached-dispatch-num_experts-changed", "num_tokens_per_expert", Invalid, f"expected shape ({E})",
         lambda b: b.dispatch(X, handle=ht_handle(b)[2],
                              num_tokens_per_expert=layout_kwargs(b, num_experts=2 * E)["num_tokens_per_expert"])),
    Case("combine-x-rows-differ-from-handle", "x", Invalid, "expected shape",
         lambda b: b.combine(ht_handle(b)[0][:-1].copy(), ht_handle(b)[2])),
    Case("combine-bias-wrong-shape", "bias", Invalid, "expected shape",
         lambda b: b.combine(*ht_handle(b)[::2], bias=np.zeros((T, H // 2), BF16))),
    Case("combine-bias-dtype-differs-from-x", "bias", TypeErr, "like x",
         lambda b: b.combine(*ht_handle(b)[::2], bias=np.zeros((T, H), np.float32))),
    Case("combine-topk_weights-NaN", "topk_weights", Invalid, "found nan",
         lambda b: (lambda r: b.combine(r[0], r[2], topk_weights=with_nan(r[1], (0, 0))))(ht_handle(b))),
    Case("call-after-destroy", "self", Invalid, "this Buffer was destroyed", every_call_after_destroy),
    # ---- low-latency dispatch ----
    Case("ll-tokens-exceed-num_max_dispatch_tokens_per_rank", "x", Invalid,
         "16 tokens exceed num_max_dispatch_tokens_per_rank=4",
         lambda b: b.low_latency_dispatch(X, TOPK, 4, E)),
    Case("ll-num_max_dispatch_tokens_per_rank-above-1024", "num_max_dispatch_tokens_per_rank", Invalid,
         "at most 1024", lambda b: b.low_latency_dispatch(X, TOPK, 1025, E)),
    Case("ll-hidden-not-multiple-of-128", "x", Invalid, "multiples of 128",
         lambda b: b.low_latency_dispatch(np.zeros((T, 200), BF16), TOPK, M, E)),
    Case("ll-hidden-above-8192", "x", Invalid, "up to 8192, got 8320",
         lambda b: b.low_latency_dispatch(np.zeros((T, 8320), BF16), TOPK, M, E)),
    Case("ll-topk-above-16", "topk_idx", Invalid, "at most 16",
         lambda b: b.low_latency_dispatch(X, np.zeros((T, 17), np.int64), M, E)),
    Case("ll-num_experts-above-1024", "num_experts", Invalid, "at most 1024",
         lambda b: b.low_latency_dispatch(X, TOPK, M, 2048)),
    Case("ll-expert-chosen-more-than-M-times", "topk_idx", Invalid, "more than num_max_dispatch_tokens_per_rank",
         lambda b: b.low_latency_dispatch(X, np.zeros((T, K), np.int64), T, E)),
    Case("ll-x-float32", "x", TypeErr, "expected dtype bfloat16",
         lambda b: b.low_latency_dispatch(X.astype(np.float32), TOPK, M, E)),
    Case("ll-ue8m0-without-round_scale", "use_ue8m0", Invalid, "round_scale",
         lambda b: b.low_latency_dispatch(X, TOPK, M, E, use_ue8m0=True)),
    Case("ll-async_finish-with-return_recv_hook", "async_finish", Invalid, "return_recv_hook",
         lambda b: b.low_latency_dispatch(X, TOPK, M, E, async_finish=True, return_recv_hook=True)),
    # ---- low-latency combine ----
    Case("ll-combine-topk_weights-NaN", "topk_weights", Invalid, "found nan at index (2, 0)",
         lambda b: b.low_latency_combine(*ll_dispatch(b)[:1], TOPK, with_nan(W), ll_dispatch(b)[1])),
    Case("ll-combine-handle-from-another-buffer", "handle", Invalid, "made by another buffer",
         lambda b: with_other_buffers_handle(lambda h: b.low_latency_combine(ll_dispatch(b)[0], TOPK, W, h),
                                             destroyed=False, low_latency=True)),
    Case("ll-combine-x-for-other-num_experts", "x", Invalid, "expected shape",
         lambda b: b.low_latency_combine(ll_dispatch(b, 2 * E)[0], TOPK, W, ll_dispatch(b)[1])),
    Case("ll-combine-topk_idx-beyond-handle-num_experts", "topk_idx", Invalid, f"expected values in [-1, {E})",
         lambda b: b.low_latency_combine(*ll_dispatch(b)[:1], np.where(TOPK == 1, E + 1, TOPK), W,
                                         ll_dispatch(b)[1])),
    Case("ll-combine-topk_idx-shape-differs-from-dispatch", "topk_idx", Invalid, "the handle was made for shape",
         lambda b: b.low_latency_combine(*ll_dispatch(b)[:1], TOPK[:-1].copy(), W[:-1].copy(), ll_dispatch(b)[1])),
    Case("ll-combine-out-wrong-dtype", "out", TypeErr, "expected dtype bfloat16",
         lambda b: b.low_latency_combine(*ll_dispatch(b)[:1], TOPK, W, ll_dispatch(b)[1],
                                         out=np.zeros((T, H), np.float32))),
    Case("ll-combine-zero_copy-not-a-bool", "zero_copy", TypeErr, "expected a bool",
         lambda b: b.low_latency_combine(*ll_dispatch(b)[:1], TOPK, W, ll_dispatch(b)[1], zero_copy=1)),
    Case("ll-clean-hidden-unsupported", "hidden", Invalid, "multiples of 128",
         lambda b: b.clean_low_latency_buffer(M, 100, E)),
    Case("ll-combine-buffer-with-high-throughput-handle", "handle", TypeErr, "expected the ReferenceLowLatencyHandle",
         lambda b: b.get_next_low_latency_combine_buffer(ht_handle(b)[2])),
    # ---- the GPU's limits and argument rules, enforced on the reference backend too (issue #15) ----
    Case("gpu-topk_idx-33-columns", "topk_idx", Invalid, "at most 32 top-k columns on the GPU, got 33",
         lambda b: dispatch(b, topk_idx=topk33(), topk_weights=None, **layout_kwargs(b, topk33()))),
    Case("gpu-combine-topk_weights-33-columns", "topk_weights", Invalid, "at most 32 top-k columns on the GPU, got 33",
         lambda b: (lambda r: b.combine(r[0], r[2], topk_weights=np.zeros((r[0].shape[0], 33), np.float32)))(
             ht_handle(b))),
    Case("gpu-experts-per-rank-above-1022", "num_tokens_per_expert", Invalid, "at most 1022 experts per rank, got 1024",
         lambda b: dispatch(b, **layout_kwargs(b, num_experts=1024))),
    Case("gpu-layout-num_experts-above-8192", "num_experts", Invalid, "at most 8192 supported, got 8200",
         lambda b: b.get_dispatch_layout(TOPK, 8200)),
    Case("gpu-tokens-per-rank-above-131072", "x", Invalid, "at most 131072 tokens per rank, got 131073",
         lambda b: b.dispatch(np.zeros((131073, 8), BF16), topk_idx=np.full((131073, 1), -1, np.int64))),
    Case("gpu-combine-config-wrong-type", "config", TypeErr, "expected a Config",
         lambda b: b.combine(*ht_handle(b)[::2], config={"num_sms": 20})),
    Case("ll-combine-out-jax-array-immutable", "out", Invalid, "JAX arrays are immutable",
         lambda b: b.low_latency_combine(*ll_dispatch(b)[:1], TOPK, W, ll_dispatch(b)[1],
                                         out=pytest.importorskip("jax.numpy").zeros((T, H), BF16))),
    Case("ll-combine-out-read-only", "out", Invalid, "read-only",
         lambda b: b.low_latency_combine(*ll_dispatch(b)[:1], TOPK, W, ll_dispatch(b)[1], out=read_only((T, H)))),
    Case("ll-combine-zero_copy-not-the-combine-buffer", "x", Invalid, "get_next_low_latency_combine_buffer",
         lambda b: b.low_latency_combine(*ll_dispatch(b)[:1], TOPK, W, ll_dispatch(b)[1], zero_copy=True)),
    # ---- cumulative_local_expert_recv_stats: int32 [L], written in place ----
    Case("ll-recv-stats-int64", "cumulative_local_expert_recv_stats", TypeErr, "expected dtype int32",
         lambda b: b.low_latency_dispatch(X, TOPK, M, E, cumulative_local_expert_recv_stats=np.zeros(E, np.int64))),
    Case("ll-recv-stats-wrong-length", "cumulative_local_expert_recv_stats", Invalid, "expected shape",
         lambda b: b.low_latency_dispatch(X, TOPK, M, E, cumulative_local_expert_recv_stats=np.zeros(E + 1, np.int32))),
    Case("ll-recv-stats-jax-array-immutable", "cumulative_local_expert_recv_stats", Invalid, "JAX arrays are immutable",
         lambda b: b.low_latency_dispatch(X, TOPK, M, E, cumulative_local_expert_recv_stats=pytest.importorskip(
             "jax.numpy").zeros(E, np.int32))),
    Case("ll-recv-stats-read-only", "cumulative_local_expert_recv_stats", Invalid, "read-only",
         lambda b: b.low_latency_dispatch(X, TOPK, M, E, cumulative_local_expert_recv_stats=read_only(E, np.int32))),
]


def good_round_trips(b):
    """A high-throughput and a low-latency round trip on ``b``, compared with the reference model."""
    good_high_throughput(b)
    good_low_latency(b)


def good_high_throughput(b):
    """Layout, dispatch and combine on ``b``, compared with the reference model."""
    topk, x, w = inputs(3)
    want = reference.dispatch([x], [topk], [w], E)[0]
    recv_x, recv_idx, recv_w, counts, handle, _ = b.dispatch(x, topk_idx=topk, topk_weights=w,
                                                             **layout_kwargs(b, topk))
    np.testing.assert_array_equal(recv_x, want.recv_x)
    np.testing.assert_array_equal(recv_idx, want.recv_topk_idx)
    np.testing.assert_array_equal(recv_w, want.recv_topk_weights)
    assert counts == want.num_recv_tokens_per_expert_list
    combined, combined_w, _ = b.combine(recv_x, handle, topk_weights=recv_w)
    want_x, want_w = reference.combine([recv_x], [want], [recv_w])[0]
    np.testing.assert_array_equal(combined, want_x)
    np.testing.assert_array_equal(combined_w, want_w)
    sent = (topk >= 0).any(axis=1)                        # one rank: every routed token comes back once
    np.testing.assert_array_equal(combined[sent], x[sent])


def good_low_latency(b):
    """A low-latency dispatch and combine on ``b``, compared with the reference model."""
    topk, x, w = inputs(3)
    want_ll = reference.low_latency_dispatch([x], [topk], M, E, use_fp8=False)[0]
    recv, count, ll_handle, _, _ = b.low_latency_dispatch(x, topk, M, E, use_fp8=False)
    np.testing.assert_array_equal(recv, want_ll.recv_x)
    np.testing.assert_array_equal(count, want_ll.recv_count)
    out, _, _ = b.low_latency_combine(recv, topk, w, ll_handle)
    np.testing.assert_array_equal(out, reference.low_latency_combine([recv], [topk], [w], [want_ll])[0])


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_names_the_argument_and_buffer_stays_usable(buf, case):
    with pytest.raises(ep.DeepEPInvalid) as info:
        case.call(buf)
    err = info.value
    assert type(err) is case.exc, f"{case.id}: {type(err).__name__}: {err}"
    msg = str(err)
    # the message leads with the argument's name (not a longer name, not an index of it)
    assert re.match(re.escape(case.arg) + r"(?![\w\[])", msg), f"{case.id}: {msg!r} does not start with {case.arg!r}"
    assert case.fragment in msg, f"{case.id}: {msg!r} lacks {case.fragment!r}"
    good_round_trips(buf)


def test_sweep_has_at_least_thirty_distinct_kinds():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 30


def test_good_inputs_pass_the_new_checks(buf):
    """What the new checks must not refuse: NaN weights in -1 slots (never read), layout outputs
    of this very topk_idx, cached dispatch with the handle's num_experts, a handle reused by the
    buffer that made it, float64 topk_idx converted by the caller."""
    w = W.copy()
    w[TOPK < 0] = np.nan
    recv_x, _, recv_w, _, handle, _ = dispatch(buf, topk_weights=w)
    assert np.isfinite(recv_w).all()
    buf.dispatch(X, handle=handle, num_tokens_per_expert=layout_kwargs(buf)["num_tokens_per_expert"])
    buf.combine(recv_x, handle, topk_weights=recv_w)
    buf.combine(recv_x, handle, topk_weights=recv_w)
    recv, handle_ll = ll_dispatch(buf)
    out, _, _ = buf.low_latency_combine(recv, TOPK, w, handle_ll)
    assert np.isfinite(out.astype(np.float32)).all()
    buf.get_next_low_latency_combine_buffer(handle_ll)
    # padded rows (num_worst_tokens) are not read by the combine: their weights are not checked
    recv_x, _, recv_w, _, handle, _ = dispatch(buf, num_worst_tokens=T + 4)
    recv_w = recv_w.copy()
    recv_w[-1] = np.nan
    buf.combine(recv_x, handle, topk_weights=recv_w)
    good_round_trips(buf)


# ---- a reference buffer sized for the GPU (num_nvl_bytes / num_rdma_bytes given) is held to the
# GPU's memory rules too: rows of whole 16-byte units, and the region each mode runs in (issue #15).
# A buffer given no bytes is the reference backend's own mode (it needs no memory): not checked.
HT_BYTES = ep.Buffer.get_intranode_size_hint(T, H, 1, K)
LL_BYTES = ep.Buffer.get_low_latency_rdma_size_hint(M, H, 1, E)


class SizedCase(NamedTuple):
    id: str
    sizes: dict                  # the buffer's byte arguments
    arg: str
    fragment: str
    call: Callable               # call(buf) must raise DeepEPInvalid
    good: Callable               # then good(buf) must still work (what the buffer is sized for)


SIZED_CASES = [
    SizedCase("dispatch-x-row-not-16-bytes", dict(num_nvl_bytes=HT_BYTES), "x",
              "a row must be a multiple of 16 bytes, got hidden 100 of bfloat16",
              lambda b: dispatch(b, x=np.zeros((T, 100), BF16)), good_high_throughput),
    SizedCase("combine-x-row-not-16-bytes", dict(num_nvl_bytes=HT_BYTES), "x",
              "a row must be a multiple of 16 bytes, got hidden 2 of float32",
              lambda b: (lambda r: b.combine(np.zeros((r[0].shape[0], 2), np.float32), r[2]))(ht_handle(b)),
              good_high_throughput),
    SizedCase("dispatch-without-num_nvl_bytes", dict(num_rdma_bytes=LL_BYTES, low_latency_mode=True),
              "num_nvl_bytes", "the high-throughput kernels need symmetric memory",
              lambda b: dispatch(b), good_low_latency),
    SizedCase("ll-dispatch-without-num_rdma_bytes", dict(num_nvl_bytes=HT_BYTES), "num_rdma_bytes",
              f"the low-latency kernels need {LL_BYTES} bytes for these shapes, the buffer has 0",
              lambda b: b.low_latency_dispatch(X, TOPK, M, E, use_fp8=False), good_high_throughput),
    SizedCase("ll-dispatch-num_rdma_bytes-too-small", dict(num_rdma_bytes=LL_BYTES, low_latency_mode=True),
              "num_rdma_bytes", f"the buffer has {LL_BYTES} (Buffer.get_low_latency_rdma_size_hint)",
              lambda b: b.low_latency_dispatch(X, TOPK, 2 * M, E), good_low_latency),
    SizedCase("clean-num_rdma_bytes-too-small", dict(num_rdma_bytes=LL_BYTES, low_latency_mode=True),
              "num_rdma_bytes", "the low-latency kernels need",
              lambda b: b.clean_low_latency_buffer(M, 2 * H, E), good_low_latency),
]


@pytest.mark.parametrize("case", SIZED_CASES, ids=[c.id for c in SIZED_CASES])
def test_buffer_sized_for_the_gpu_is_checked_like_the_gpu(case):
    from mpi4py import MPI
    with ep.Buffer(MPI.COMM_SELF, backend="reference", **case.sizes) as b:
        with pytest.raises(ep.DeepEPInvalid) as info:
            case.call(b)
        msg = str(info.value)
        assert type(info.value) is Invalid, f"{case.id}: {type(info.value).__name__}: {msg}"
        assert re.match(re.escape(case.arg) + r"(?![\w\[])", msg), f"{case.id}: {msg!r} does not start with {case.arg!r}"
        assert case.fragment in msg, f"{case.id}: {msg!r} lacks {case.fragment!r}"
        case.good(b)


def test_unsized_buffer_skips_the_gpu_memory_rules(buf):
    """The module's buffer has no bytes: odd row sizes and both modes run (the reference backend's
    own mode, e.g. jaxep's [T, K] float32 weight gradients); the argument limits above still apply."""
    topk, x, w = inputs(4)
    x100 = x[:, :100].copy()
    recv_x, _, _, _, handle, _ = dispatch(buf, x=x100, topk_idx=topk, topk_weights=w, **layout_kwargs(buf, topk))
    combined, _, _ = buf.combine(recv_x, handle)
    sent = (topk >= 0).any(axis=1)
    np.testing.assert_array_equal(combined[sent], x100[sent])
    good_round_trips(buf)
