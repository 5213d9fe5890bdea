"""GPU tier (issue #11), under ``mpirun -n 2``: default settings make no host wait on the hot paths;
bad expert ids are caught on the device; misaligned pointers are refused before launch.

* No host wait: 100 eager calls (no CUDA graph) of a cached dispatch, a dispatch with
  ``num_worst_tokens`` (layout included), a combine, a low-latency dispatch and a low-latency
  combine, at 4096 tokens x 7168 channels (1024 for low latency). A spin kernel first holds the
  current stream for ``SPIN_S``; every call queues behind it, so any host wait on GPU work would
  keep the host loop busy for at least ``SPIN_S``. Asserted: the loop returns in less than half of
  that, with its last event still pending.
* Bad expert ids (``num_experts``, -2, 2**40 + 3) in ``topk_idx`` of get_dispatch_layout, dispatch
  and low_latency_dispatch: the call completes with the entry treated as -1 (outputs equal the
  reference with -1 there: nothing written out of bounds), the next call raises ``DeepEPInvalid``
  naming ``topk_idx``, the value and the range, and a good round trip after it is right.
* x / bias / out views whose data pointer is not 16-byte aligned raise ``DeepEPInvalid`` naming
  the argument, before anything is launched; the buffer stays usable.
"""

import time

import ml_dtypes
import numpy as np
import pytest

from dispatch_cases import host, make_inputs, routing, run_case, to_gpu
from testutil import assert_all_ranks, gpu_skip_reason, world

pytestmark = pytest.mark.skipif(gpu_skip_reason() is not None, reason=str(gpu_skip_reason()))

BF16 = ml_dtypes.bfloat16
T, H, K, E = 4096, 7168, 8, 256      # high-throughput hot-path shapes
M_LL = 1024                          # low-latency tokens per rank (the kernels' maximum)
CALLS = 100
SPIN_S = 1.0
SMALL_LL = dict(m=64, hidden=2048, experts=32, topk=4, tokens=37)   # bad-id / alignment cases

_SPIN_SRC = r"""
extern "C" __global__ void spin_ns(unsigned long long ns) {
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do {
        __nanosleep(10000);
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while (now - start < ns);
}
"""


@pytest.fixture(scope="module")
def buf():
    import deepep_cupy as ep
    comm = world()
    r = comm.Get_size()
    nvl = ep.Buffer.get_intranode_size_hint(T, H, r, K)
    rdma = ep.Buffer.get_low_latency_rdma_size_hint(M_LL, H, r, E)
    b = ep.Buffer(comm, num_nvl_bytes=nvl, num_rdma_bytes=rdma, low_latency_mode=True, backend="gpu")
    assert not ep.settings.check_values, "these tests are about the default settings"
    yield b
    b.destroy()


def spin(seconds: float) -> None:
    """Hold the current stream for ``seconds`` (one thread sleeping on the global timer)."""
    import cupy as cp
    cp.RawKernel(_SPIN_SRC, "spin_ns")((1,), (1,), (np.uint64(int(seconds * 1e9)),))


def host_runs_ahead(call):
    """``call(i)`` for i < CALLS behind a SPIN_S spin on the current stream.

    Returns:
        (host seconds of the loop, whether its end event was still pending when the loop returned,
        GPU seconds of the calls' work: from the end of the spin to the end event).
    """
    import cupy as cp
    cp.cuda.Device().synchronize()
    world().Barrier()
    stream = cp.cuda.get_current_stream()
    begin, end = cp.cuda.Event(), cp.cuda.Event()
    spin(SPIN_S)
    begin.record(stream)
    t0 = time.perf_counter()
    for i in range(CALLS):
        call(i)
    host_s = time.perf_counter() - t0
    end.record(stream)
    pending = not end.done
    end.synchronize()
    return host_s, pending, cp.cuda.get_elapsed_time(begin, end) / 1e3


def _hot_path(buf, kind):
    """(warm-up, the call to time) of one hot path with default settings."""
    import cupy as cp
    R, me = buf.num_ranks, buf.rank
    rng = np.random.default_rng(17 + me)
    x = cp.asarray((rng.standard_normal((T, H), dtype=np.float32)).astype(BF16))
    idx = to_gpu(routing("random", T, K, E, R, rng))
    w = cp.asarray(rng.random((T, K), dtype=np.float32))
    if kind in ("cached_dispatch", "worst_tokens_dispatch", "combine"):
        per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
        recv_x, _, _, _, handle, _ = buf.dispatch(x, topk_idx=idx, num_tokens_per_rank=per_rank,
                                                  is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
        if kind == "cached_dispatch":
            return lambda i: buf.dispatch(x, handle=handle)
        if kind == "combine":
            return lambda i: buf.combine(recv_x, handle)

        def worst(i):
            pr, prd, pe, ir, _ = buf.get_dispatch_layout(idx, E)
            return buf.dispatch(x, topk_idx=idx, topk_weights=w, num_tokens_per_rank=pr, num_tokens_per_rdma_rank=prd,
                                is_token_in_rank=ir, num_tokens_per_expert=pe, num_worst_tokens=R * T)
        return worst
    x_ll, idx_ll, w_ll = x[:M_LL], idx[:M_LL], w[:M_LL]
    if kind == "low_latency_dispatch":
        return lambda i: buf.low_latency_dispatch(x_ll, idx_ll, M_LL, E)
    recv, _, handle, _, _ = buf.low_latency_dispatch(x_ll, idx_ll, M_LL, E, use_fp8=False)
    return lambda i: buf.low_latency_combine(recv, idx_ll, w_ll, handle)


@pytest.mark.parametrize("kind", ["cached_dispatch", "worst_tokens_dispatch", "combine", "low_latency_dispatch",
                                  "low_latency_combine"])
def test_eager_calls_make_no_host_wait(buf, kind):
    """100 eager calls return on the host while the GPU is still busy (it has not even started them:
    a SPIN_S spin is ahead of them on the stream)."""
    import cupy as cp
    call = _hot_path(buf, kind)
    call(-1)                              # compile, allocate, first-use work outside the timing
    cp.cuda.Device().synchronize()
    host_s, pending, gpu_s = host_runs_ahead(call)
    report = (f"{kind}: {CALLS} calls took {host_s * 1e3:.1f} ms on the host ({host_s / CALLS * 1e6:.0f} us a call), "
              f"{gpu_s * 1e3:.1f} ms on the GPU after a {SPIN_S:.1f} s spin; end event pending at return: {pending}")
    if buf.rank == 0:
        print(report)
    assert_all_ranks(world(), pending and host_s < SPIN_S / 2, report)


# ---------------------------------------------------------------------------------------- bad ids
BAD_VALUES = [(E, f"found {E} on rank"), (-2, "found -2 on rank"), (2**40 + 3, "found 2147483647 or more")]


def _with_bad(topk, value):
    """A copy of ``topk`` with ``value`` in two entries (if there are rows), and the same with -1 there."""
    bad = topk.copy()
    if len(bad):
        bad[len(bad) // 2, 1] = value
        bad[-1, 0] = value
    return bad, np.where((bad < -1) | (bad >= E), -1, bad)


def _expect_invalid_next(call, num_experts, shown, label):
    """After the faulty call has finished on every rank: ``call()`` must raise DeepEPInvalid naming
    topk_idx, the range and the value. Returns problems."""
    import cupy as cp
    import deepep_cupy as ep
    cp.cuda.Device().synchronize()
    world().Barrier()
    try:
        call()
    except ep.DeepEPInvalid as e:
        msg = str(e)
        if "topk_idx" not in msg or f"[-1, {num_experts})" not in msg or shown not in msg:
            return [f"{label}: message {msg!r} lacks topk_idx, [-1, {num_experts}) or {shown!r}"]
        return []
    return [f"{label}: the next call did not raise DeepEPInvalid"]


@pytest.mark.parametrize("value,shown", BAD_VALUES, ids=["num_experts", "minus_two", "beyond_int32"])
def test_bad_expert_id_in_layout_raises_at_the_next_call(buf, value, shown):
    from deepep_cupy import reference
    R, me = buf.num_ranks, buf.rank
    good = routing("holes", 512, K, E, R, np.random.default_rng(5 + me))
    bad, fixed = _with_bad(good, value)
    outs = buf.get_dispatch_layout(to_gpu(bad), E)      # nothing waits, so nothing raises yet
    want = reference.get_dispatch_layout(fixed, E, R)
    problems = []
    if not all(np.array_equal(host(outs[i]), want[i]) for i in (0, 2, 3)):
        problems.append("the faulty call's layout is not the reference's with the bad entries as -1")
    problems += _expect_invalid_next(lambda: buf.get_dispatch_layout(to_gpu(good), E), E, shown, "layout")
    outs = buf.get_dispatch_layout(to_gpu(good), E)
    want = reference.get_dispatch_layout(good, E, R)
    if not all(np.array_equal(host(outs[i]), want[i]) for i in (0, 2, 3)):
        problems.append("the layout after the error is wrong")
    problems += run_case(buf, 41, 129, 2048, K, E, "random", fp8=False, with_weights=True, use_cached=True)
    assert_all_ranks(world(), not problems, "\n".join(problems[:6]))


def test_bad_expert_id_in_dispatch_raises_at_the_next_call(buf):
    """dispatch computing its own layout (no layout tensors given) reports through the layout kernel;
    the rows go where the reference sends them with the bad entry as -1."""
    from deepep_cupy import reference
    R, me = buf.num_ranks, buf.rank
    xs, _, idxs, _ = make_inputs(43, R, 129, 2048, K, E, "random", False, False)
    pairs = [_with_bad(i, E + 1) for i in idxs]
    want = reference.dispatch(xs, [f for _, f in pairs], None, E)[me]
    per_expert = buf.get_dispatch_layout(to_gpu(idxs[me]), E)[2]
    recv_x, recv_idx, _, _, _, _ = buf.dispatch(to_gpu(xs[me]), topk_idx=to_gpu(pairs[me][0]),
                                                num_tokens_per_expert=per_expert)
    problems = []
    if not np.array_equal(host(recv_x).view(np.uint16), want.recv_x.view(np.uint16)) or \
            not np.array_equal(host(recv_idx), want.recv_topk_idx):
        problems.append("the faulty dispatch differs from the reference with the bad entries as -1")
    problems += _expect_invalid_next(lambda: buf.dispatch(to_gpu(xs[me]), topk_idx=to_gpu(idxs[me]),
                                                          num_tokens_per_expert=per_expert), E, f"found {E + 1}",
                                     "dispatch")
    problems += run_case(buf, 44, 129, 2048, K, E, "random", fp8=False, with_weights=True)
    assert_all_ranks(world(), not problems, "\n".join(problems[:6]))


def _ll_round_trip(buf, xs, idxs, ws, m, e, label):
    """A good low-latency dispatch + combine (bf16) against the reference; returns problems."""
    from deepep_cupy import reference
    me = buf.rank
    ref = reference.low_latency_dispatch(xs, idxs, m, e, use_fp8=False)
    recv, count, handle, _, _ = buf.low_latency_dispatch(to_gpu(xs[me]), to_gpu(idxs[me]), m, e, use_fp8=False)
    problems = _ll_dispatch_problems(recv, count, handle, ref[me], label)
    ys = [r.recv_x for r in ref]
    want = reference.low_latency_combine(ys, idxs, ws, ref)[me]
    out, _, _ = buf.low_latency_combine(to_gpu(ys[me]), to_gpu(idxs[me]), to_gpu(ws[me]), handle)
    if not np.array_equal(host(out).view(np.uint16), want.view(np.uint16)):
        problems.append(f"{label}: combine differs")
    return problems


def _ll_dispatch_problems(recv, count, handle, mine, label):
    counts = host(count)
    if not np.array_equal(counts, mine.recv_count):
        return [f"{label}: recv_count {counts} != {mine.recv_count}"]
    data, src = host(recv), host(handle.recv_src_info)
    for l, n in enumerate(counts):
        if not np.array_equal(data[l, :n].view(np.uint16), mine.recv_x[l, :n].view(np.uint16)) or \
                not np.array_equal(src[l, :n], mine.recv_src_info[l, :n]):
            return [f"{label}: expert {l} differs"]
    return []


@pytest.mark.parametrize("value,shown", BAD_VALUES, ids=["num_experts", "minus_two", "beyond_int32"])
def test_bad_expert_id_in_low_latency_dispatch_raises_at_the_next_call(buf, value, shown):
    """The low-latency send treats the id as -1 (sends it nowhere: no out-of-bounds count, no
    destination bit past the rank count) and records it; the next low-latency call raises."""
    from deepep_cupy import reference
    R, me = buf.num_ranks, buf.rank
    m, h, e, k, t = (SMALL_LL[n] for n in ("m", "hidden", "experts", "topk", "tokens"))
    xs, _, idxs, ws = make_inputs(45, R, t, h, k, e, "random", False, True)
    pairs = []
    for i in idxs:
        bad = i.copy()
        bad[len(bad) // 2, 1] = value
        bad[-1, 0] = value
        pairs.append((bad, np.where((bad < -1) | (bad >= e), -1, bad)))
    ref = reference.low_latency_dispatch(xs, [f for _, f in pairs], m, e, use_fp8=False)
    recv, count, handle, _, _ = buf.low_latency_dispatch(to_gpu(xs[me]), to_gpu(pairs[me][0]), m, e, use_fp8=False)
    problems = _ll_dispatch_problems(recv, count, handle, ref[me], "faulty dispatch (bad entries as -1)")
    problems += _expect_invalid_next(
        lambda: buf.low_latency_dispatch(to_gpu(xs[me]), to_gpu(idxs[me]), m, e, use_fp8=False), e, shown,
        "low_latency_dispatch")
    problems += _ll_round_trip(buf, xs, idxs, ws, m, e, "after the error")
    assert_all_ranks(world(), not problems, "\n".join(problems[:6]))


# ------------------------------------------------------------------------------------- alignment
def _misaligned(shape, dtype):
    """A C-contiguous CuPy view whose data starts one element into its allocation."""
    import cupy as cp
    n = int(np.prod(shape))
    return cp.zeros(n + 16, dtype=dtype)[1:1 + n].reshape(shape)


def test_misaligned_pointers_raise_before_launch(buf):
    """Views starting mid-row (a bf16 array sliced at an odd element offset, FP8 bytes at offset 1)
    raise DeepEPInvalid naming the argument, on every rank, before any launch; the buffer then works."""
    import cupy as cp
    import deepep_cupy as ep
    R, me = buf.num_ranks, buf.rank
    tokens, hidden = 129, 2048
    rng = np.random.default_rng(60 + me)
    bf16 = cp.dtype(BF16)
    x = cp.asarray(rng.standard_normal((tokens, hidden), dtype=np.float32).astype(BF16))
    idx = to_gpu(routing("random", tokens, K, E, R, rng))
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
    layout = dict(topk_idx=idx, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                  num_tokens_per_expert=per_expert)
    recv_x, _, _, _, handle, _ = buf.dispatch(x, **layout)
    m, h, e, k, t = (SMALL_LL[n] for n in ("m", "hidden", "experts", "topk", "tokens"))
    x_ll = cp.asarray(rng.standard_normal((t, h), dtype=np.float32).astype(BF16))
    idx_ll = to_gpu(routing("random", t, k, e, R, rng))
    w_ll = cp.asarray(rng.random((t, k), dtype=np.float32))
    recv_ll, _, handle_ll, _, _ = buf.low_latency_dispatch(x_ll, idx_ll, m, e, use_fp8=False)
    scales = cp.ones((tokens, hidden // 128), dtype=cp.float32)
    cases = [
        ("dispatch x", "x", lambda: buf.dispatch(_misaligned((tokens, hidden), bf16), **layout)),
        ("cached dispatch x", "x", lambda: buf.dispatch(_misaligned((tokens, hidden), bf16), handle=handle)),
        ("dispatch fp8 x[0]", "x[0]",
         lambda: buf.dispatch((_misaligned((tokens, hidden), cp.uint8), scales), **layout)),
        ("combine x", "x", lambda: buf.combine(_misaligned(recv_x.shape, bf16), handle)),
        ("combine bias", "bias", lambda: buf.combine(recv_x, handle, bias=_misaligned((tokens, hidden), bf16))),
        ("combine bias[1]", "bias[1]",
         lambda: buf.combine(recv_x, handle, bias=(None, _misaligned((tokens, hidden), bf16)))),
        ("low-latency dispatch x", "x", lambda: buf.low_latency_dispatch(_misaligned((t, h), bf16), idx_ll, m, e)),
        ("low-latency combine x", "x", lambda: buf.low_latency_combine(_misaligned(recv_ll.shape, bf16), idx_ll, w_ll,
                                                                        handle_ll)),
        ("low-latency combine out", "out", lambda: buf.low_latency_combine(recv_ll, idx_ll, w_ll, handle_ll,
                                                                           out=_misaligned((t, h), bf16))),
    ]
    problems = []
    for label, name, call in cases:
        try:
            call()
            problems.append(f"{label}: accepted")
        except ep.DeepEPInvalid as err:
            msg = str(err)
            if not msg.startswith(f"{name}: data pointer 0x") or "not 16-byte aligned" not in msg:
                problems.append(f"{label}: message {msg!r}")
    cp.cuda.Device().synchronize()
    problems += run_case(buf, 61, tokens, hidden, K, E, "random", fp8=False, with_weights=True, with_bias=True)
    assert_all_ranks(world(), not problems, "\n".join(problems[:6]))
