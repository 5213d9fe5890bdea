"""ReferenceBackend across real MPI ranks, checked bit for bit against the single-process model.

Run with: mpiexec -n 2 (or 3) python -m pytest -q tests/multirank -p no:cacheprovider

Every rank builds ALL ranks' inputs from a shared seed, runs the backend collectively on its own
slice, and compares with deepep_cupy.reference for its own rank. All collectives of a test run
before any assertion, so a failing comparison on one rank cannot leave the others hanging.
"""

import numpy as np
import pytest

MPI = pytest.importorskip("mpi4py.MPI")

from deepep_cupy import reference as ref  # noqa: E402
from deepep_cupy.backend import (CombineRequest, DispatchRequest, LayoutRequest, LowLatencyCombineRequest,  # noqa: E402
                                 LowLatencyDispatchRequest)
from deepep_cupy.errors import DeepEPInvalid  # noqa: E402
from deepep_cupy.reference_backend import ReferenceBackend  # noqa: E402

BF16 = ref.BF16


@pytest.fixture(scope="module")
def comm():
    c = MPI.COMM_WORLD
    if c.Get_size() < 2:
        pytest.skip("needs at least 2 MPI ranks (run under mpiexec -n 2)")
    return c


@pytest.fixture(scope="module")
def backend(comm):
    return ReferenceBackend(comm)


def bits(a):
    a = np.ascontiguousarray(a)
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def same(a, b):
    if a is None or b is None:
        assert a is None and b is None, (a, b)
        return
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert a.shape == b.shape, (a.shape, b.shape)
    np.testing.assert_array_equal(bits(a), bits(b))


def dispatch(be, x, x_scales, topk_idx, topk_weights, num_experts, alignment=1, worst=0, handle=None):
    """``be.dispatch`` of these arrays; the result's fields as a tuple (without the event)."""
    res = be.dispatch(DispatchRequest(x, x_scales, num_experts, topk_idx=topk_idx, topk_weights=topk_weights,
                                      expert_alignment=alignment, num_worst_tokens=worst, handle=handle))
    assert res.event.done
    return (res.recv_x, res.recv_x_scales, res.recv_topk_idx, res.recv_topk_weights,
            res.num_recv_tokens_per_expert_list, res.handle)


def combine(be, x, handle, topk_weights=None, bias=None):
    """``be.combine``: (combined_x, combined_topk_weights)."""
    res = be.combine(CombineRequest(x, handle, topk_weights, bias if isinstance(bias, tuple) else (bias, None)))
    return res.combined_x, res.combined_topk_weights


def make_inputs(num_ranks, seed, hidden=256, experts_per_rank=3, k=3, zero_rank=1, max_tokens=12):
    """All ranks' inputs, identical on every rank. Rank ``zero_rank`` has no tokens."""
    rng = np.random.default_rng(seed)
    num_experts = num_ranks * experts_per_rank
    xs, idx, ws = [], [], []
    for s in range(num_ranks):
        t = 0 if s == zero_rank else int(rng.integers(1, max_tokens + 1))
        xs.append(rng.standard_normal((t, hidden)).astype(BF16))
        i = (np.stack([rng.permutation(num_experts)[:k] for _ in range(t)]) if t
             else np.zeros((0, k), np.int64))
        i = np.where(rng.random((t, k)) < 0.2, -1, i).astype(np.int64)
        if t >= 2:
            i[1, -1] = i[1, 0]  # a duplicate expert in one token
        if t >= 3:
            i[2, :] = -1  # a token going nowhere
        idx.append(i)
        ws.append(rng.random((t, k)).astype(np.float32))
    return xs, idx, ws, num_experts


def test_layout(comm, backend):
    r, n = comm.Get_rank(), comm.Get_size()
    xs, idx, _, e = make_inputs(n, 1)
    got = backend.get_dispatch_layout(LayoutRequest(idx[r], e))
    exp = ref.get_dispatch_layout(idx[r], e, n, backend.ranks_per_node)
    for a, b in zip((got.num_tokens_per_rank, got.num_tokens_per_rdma_rank, got.num_tokens_per_expert,
                     got.is_token_in_rank), exp):
        same(a, b)
    assert got.event.done
    # one rank per node -> the RDMA counts exist and equal the per-rank counts
    b1 = ReferenceBackend(comm, ranks_per_node=1)
    got = b1.get_dispatch_layout(LayoutRequest(idx[r], e))
    same(got.num_tokens_per_rdma_rank, got.num_tokens_per_rank)


def test_ranks_per_node_detection(comm, backend):
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    size = local.Get_size()
    local.Free()
    assert backend.ranks_per_node == size  # mpiexec on one host: all ranks share it


@pytest.mark.parametrize("alignment,worst,weights", [(1, 0, True), (4, 0, False), (1, 64, True)])
def test_dispatch_combine_bf16(comm, backend, alignment, worst, weights):
    r, n = comm.Get_rank(), comm.Get_size()
    xs, idx, ws, e = make_inputs(n, 2 + alignment + worst)
    ws_arg = ws if weights else None
    got = dispatch(backend, xs[r], None, idx[r], ws_arg[r] if weights else None, e, alignment, worst)
    rng = np.random.default_rng(99)
    exp_all = ref.dispatch(xs, idx, ws_arg, e, expert_alignment=alignment, num_worst_tokens=worst)
    ys = [rng.standard_normal(d.recv_x.shape).astype(BF16) for d in exp_all]
    biases = [(rng.standard_normal(x.shape).astype(BF16), rng.standard_normal(x.shape).astype(np.float32))
              for x in xs]
    handle = got[5]
    comb = combine(backend, ys[r], handle, got[3], biases[r])
    comb_plain = combine(backend, got[0], handle, None, None)

    exp = exp_all[r]
    same(got[0], exp.recv_x)
    assert got[1] is None
    same(got[2], exp.recv_topk_idx)
    same(got[3], exp.recv_topk_weights)
    assert got[4] == exp.num_recv_tokens_per_expert_list
    if worst:
        assert got[4] == [] and got[0].shape[0] == worst
    same(handle.rank_prefix_matrix, exp.rank_prefix_matrix)
    same(handle.recv_src_rank, exp.recv_src_rank)
    same(handle.recv_src_idx, exp.recv_src_idx)
    assert handle.num_recv_tokens == exp.num_recv_tokens
    exp_comb = ref.combine(ys, exp_all, [d.recv_topk_weights for d in exp_all] if weights else None,
                           bias=biases)[r]
    same(comb[0], exp_comb[0])
    same(comb[1], exp_comb[1])
    exp_plain = ref.combine([d.recv_x for d in exp_all], exp_all)[r]
    same(comb_plain[0], exp_plain[0])
    assert comb_plain[1] is None
    # sanity on real values: dispatch + combine of recv_x = x * number of ranks reached
    per = e // n
    copies = np.array([len({v // per for v in row if v >= 0}) for row in idx[r]], np.float32)
    same(comb_plain[0], (xs[r].astype(np.float32) * copies[:, None] + np.float32(0)).astype(BF16))


def test_dispatch_fp8_and_cached(comm, backend):
    r, n = comm.Get_rank(), comm.Get_size()
    xs, idx, ws, e = make_inputs(n, 7)
    pairs = [ref.per_token_cast_to_fp8(x) for x in xs]
    got = dispatch(backend, pairs[r][0], pairs[r][1], idx[r], ws[r], e, 1, 0)
    handle = got[5]
    # cached: other data, same routing
    xs2 = [(x.astype(np.float32) * 2 + 1).astype(BF16) for x in xs]
    cached = dispatch(backend, xs2[r], None, None, None, e, 1, 0, handle=handle)
    pairs_ue = [ref.per_token_cast_to_fp8(x, round_scale=True, use_ue8m0=True) for x in xs]
    cached_ue = dispatch(backend, pairs_ue[r][0], pairs_ue[r][1], None, None, e, 1, 0, handle=handle)

    exp = ref.dispatch([p[0] for p in pairs], idx, ws, e, x_scales=[p[1] for p in pairs])[r]
    same(got[0], exp.recv_x)
    same(got[1], exp.recv_x_scales)
    same(got[2], exp.recv_topk_idx)
    same(got[3], exp.recv_topk_weights)
    assert got[4] == exp.num_recv_tokens_per_expert_list
    exp2 = ref.dispatch(xs2, idx, ws, e)[r]
    same(cached[0], exp2.recv_x)
    assert cached[1] is None and cached[2] is None and cached[3] is None and cached[4] is None
    exp_ue = ref.dispatch([p[0] for p in pairs_ue], idx, ws, e, x_scales=[p[1] for p in pairs_ue])[r]
    same(cached_ue[0], exp_ue.recv_x)
    same(cached_ue[1], exp_ue.recv_x_scales)


def test_dispatch_worst_tokens_error_on_every_rank(comm, backend):
    r, n = comm.Get_rank(), comm.Get_size()
    xs, idx, ws, e = make_inputs(n, 8)
    exp = ref.dispatch(xs, idx, ws, e)
    worst = max(d.num_recv_tokens for d in exp)
    assert worst >= 2
    with pytest.raises(DeepEPInvalid, match="num_worst_tokens"):
        dispatch(backend, xs[r], None, idx[r], ws[r], e, 1, worst - 1)
    # the backend is still usable afterwards
    got = dispatch(backend, xs[r], None, idx[r], ws[r], e, 1, worst)
    same(got[0], ref.dispatch(xs, idx, ws, e, num_worst_tokens=worst)[r].recv_x)


@pytest.mark.parametrize("use_fp8,round_scale,use_ue8m0", [
    (False, False, False), (True, False, False), (True, True, False), (True, True, True)])
def test_low_latency(comm, backend, use_fp8, round_scale, use_ue8m0):
    r, n = comm.Get_rank(), comm.Get_size()
    m = 16
    xs, idx, ws, e = make_inputs(n, 20 + 3 * use_fp8 + round_scale, max_tokens=m - 1)
    res = backend.low_latency_dispatch(LowLatencyDispatchRequest(xs[r], idx[r], m, e, use_fp8, round_scale, use_ue8m0))
    recv_x, recv_scales, recv_count, handle = res.recv_x, res.recv_x_scales, res.recv_count, res.handle
    assert res.event.done and res.hook is None
    exp_all = ref.low_latency_dispatch(xs, idx, m, e, use_fp8=use_fp8, round_scale=round_scale,
                                       use_ue8m0=use_ue8m0)
    rng = np.random.default_rng(5)
    ys = [rng.standard_normal(d.recv_x.shape).astype(BF16) for d in exp_all]
    comb = backend.low_latency_combine(LowLatencyCombineRequest(ys[r], idx[r], ws[r], handle)).combined_x
    out = np.empty((xs[r].shape[0], xs[r].shape[1]), BF16)
    comb_out = backend.low_latency_combine(LowLatencyCombineRequest(ys[r], idx[r], ws[r], handle,
                                                                    out=out)).combined_x

    exp = exp_all[r]
    same(recv_x, exp.recv_x)
    same(recv_scales, exp.recv_x_scales if use_fp8 else None)
    same(recv_count, exp.recv_count)
    same(handle.recv_src_info, exp.recv_src_info)
    same(handle.layout_range, exp.layout_range)
    exp_comb = ref.low_latency_combine(ys, idx, ws, exp_all)[r]
    same(comb, exp_comb)
    assert comb_out is out
    same(out, exp_comb)


def test_size_one_communicator(comm):
    """The backend works on a communicator of size 1 (each rank alone)."""
    r = comm.Get_rank()
    solo = comm.Split(color=r, key=0)
    try:
        be = ReferenceBackend(solo)
        xs, idx, ws, e = make_inputs(1, 30 + r, zero_rank=-1)
        got = dispatch(be, xs[0], None, idx[0], ws[0], e, 1, 0)
        comb = combine(be, got[0], got[5], got[3], None)
        lld = be.low_latency_dispatch(LowLatencyDispatchRequest(xs[0], idx[0], 16, e, False, False, False))
        recv_x, h = lld.recv_x, lld.handle
        ll = be.low_latency_combine(LowLatencyCombineRequest(recv_x, idx[0], np.ones_like(ws[0]), h)).combined_x
    finally:
        solo.Free()
    exp = ref.dispatch(xs, idx, ws, e)
    same(got[0], exp[0].recv_x)
    exp_c = ref.combine([exp[0].recv_x], exp, [exp[0].recv_topk_weights])[0]
    same(comb[0], exp_c[0])
    same(comb[1], exp_c[1])
    nvalid = (idx[0] >= 0).sum(axis=1).astype(np.float32)
    same(ll, (xs[0].astype(np.float32) * nvalid[:, None] + np.float32(0)).astype(BF16))


def test_cumulative_local_expert_recv_stats(comm):
    """Through ``Buffer``: ``cumulative_local_expert_recv_stats`` gains this rank's reference
    ``recv_count`` at each low-latency dispatch (plain, then with the hook), from non-zero values;
    a call refused for bad input leaves it as it was."""
    import deepep_cupy as ep
    r, n = comm.Get_rank(), comm.Get_size()
    m = 16
    xs, idx, _, e = make_inputs(n, 31, max_tokens=m - 1)
    want = ref.low_latency_dispatch(xs, idx, m, e, use_fp8=False)[r].recv_count.astype(np.int64)
    start = np.arange(e // n, dtype=np.int32) * 100 + 3
    stats = start.copy()
    with ep.Buffer(comm, backend="reference") as buf:
        buf.low_latency_dispatch(xs[r], idx[r], m, e, use_fp8=False, cumulative_local_expert_recv_stats=stats)
        after_one = stats.astype(np.int64)
        _, _, _, _, hook = buf.low_latency_dispatch(xs[r], idx[r], m, e, return_recv_hook=True,
                                                    cumulative_local_expert_recv_stats=stats)
        hook()
        after_two = stats.astype(np.int64)
        assert want.sum() > 0, "the routing must send this rank something"
        with pytest.raises(DeepEPInvalid, match="^num_max_dispatch_tokens_per_rank"):
            buf.low_latency_dispatch(xs[r], idx[r], 0, e, cumulative_local_expert_recv_stats=stats)
    np.testing.assert_array_equal(after_one, start + want)
    np.testing.assert_array_equal(after_two, start + 2 * want)
    np.testing.assert_array_equal(stats, after_two)
    assert stats.dtype == np.int32
