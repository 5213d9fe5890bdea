"""GPU tier: errors surface on the call that caused them (issue #12), through ``Buffer.check`` and
``settings.check_each_call``, for a bad expert id found by a kernel and for a peer that never
arrives; the buffer goes on working after a reported bad id."""

import time

import numpy as np
import pytest

from testutil import assert_all_ranks, gpu_skip_reason, world

pytestmark = pytest.mark.skipif(gpu_skip_reason() is not None, reason=str(gpu_skip_reason()))


@pytest.fixture
def each_call():
    """settings.check_each_call on for one test."""
    import deepep_cupy as ep
    old = ep.settings.check_each_call
    ep.settings.check_each_call = True
    yield
    ep.settings.check_each_call = old


def _ht_buffer():
    import deepep_cupy as ep
    comm = world()
    return ep.Buffer(comm, num_nvl_bytes=ep.Buffer.get_intranode_size_hint(256, 2048, comm.Get_size()), backend="gpu")


def _bad_and_good_idx(num_experts):
    bad = np.array([[0, num_experts + 5], [1, -1]], dtype=np.int64)
    good = np.array([[0, num_experts - 1], [1, -1]], dtype=np.int64)
    return bad, good


def test_check_raises_a_bad_expert_id_on_the_call_and_clears():
    """The layout kernel finds the bad id; the call returns without waiting; check() raises it
    naming topk_idx and the value; then the buffer works and check() passes."""
    import cupy as cp
    import deepep_cupy as ep
    comm = world()
    E = 8 * comm.Get_size()
    bad, good = _bad_and_good_idx(E)
    b = _ht_buffer()
    try:
        b.get_dispatch_layout(cp.asarray(bad), E)
        message = ""
        try:
            b.check()
        except ep.DeepEPInvalid as e:
            message = str(e)
        per_expert = b.get_dispatch_layout(cp.asarray(good), E)[2]
        b.check()
        ok = "topk_idx" in message and str(E + 5) in message and int(per_expert.sum()) == 3
        assert_all_ranks(comm, ok, f"check() gave {message!r}; per-expert sum {int(per_expert.sum())}")
    finally:
        comm.Barrier()
        b.destroy()


def test_check_each_call_raises_in_the_low_latency_call_itself(each_call):
    import cupy as cp
    import deepep_cupy as ep
    comm = world()
    R, M, H, E = comm.Get_size(), 16, 2048, 8 * comm.Get_size()
    b = ep.Buffer(comm, num_rdma_bytes=ep.Buffer.get_low_latency_rdma_size_hint(M, H, R, E),
                  low_latency_mode=True, backend="gpu")
    try:
        bad, good = _bad_and_good_idx(E)
        import ml_dtypes
        x = cp.asarray(np.ones((2, H), dtype=ml_dtypes.bfloat16))
        message = ""
        try:
            b.low_latency_dispatch(x, cp.asarray(bad), M, E, use_fp8=False)
        except ep.DeepEPInvalid as e:
            message = str(e)
        recv, count, handle, _, _ = b.low_latency_dispatch(x, cp.asarray(good), M, E, use_fp8=False)
        total = int(comm.allreduce(int(cp.asnumpy(count).sum())))
        ok = "topk_idx" in message and total == 3 * R
        assert_all_ranks(comm, ok, f"the call gave {message!r}; received {total} entries, expected {3 * R}")
    finally:
        comm.Barrier()
        b.destroy()


def test_check_reports_a_missing_peer_on_the_call():
    """The last rank skips a combine: on rank 0, check() right after the combine raises
    DeepEPTimeout naming rank 0, the combine phase and the missing rank, within the timeout."""
    import cupy as cp
    import ml_dtypes
    import deepep_cupy as ep
    comm = world()
    R = comm.Get_size()
    if R < 2:
        pytest.skip("needs 2 ranks")
    old = ep.settings.timeout_seconds
    ep.settings.timeout_seconds = 3.0
    b = _ht_buffer()
    try:
        E = 8 * R
        rng = np.random.default_rng(5 + b.rank)
        idx = cp.asarray(np.argsort(rng.random((64, E)), axis=1)[:, :4].astype(np.int64))
        x = cp.asarray(rng.standard_normal((64, 2048)).astype(ml_dtypes.bfloat16))
        layout = b.get_dispatch_layout(idx, E)
        recv_x, _, _, _, handle, _ = b.dispatch(x, topk_idx=idx, num_tokens_per_rank=layout[0],
                                                is_token_in_rank=layout[3], num_tokens_per_expert=layout[2])
        b.check()
        comm.Barrier()
        message, waited = "", 0.0
        if b.rank == 0:
            t0 = time.monotonic()
            b.combine(recv_x, handle)          # rank R-1 never joins
            try:
                b.check()
            except ep.DeepEPTimeout as e:
                message = str(e)
            waited = time.monotonic() - t0
        ok = b.rank != 0 or ("rank 0" in message and "combine" in message and waited < 3.0 + 10)
        assert_all_ranks(comm, ok, f"rank 0: check() gave {message!r} after {waited:.1f} s")
    finally:
        ep.settings.timeout_seconds = old
        cp.cuda.Device().synchronize()
        comm.Barrier()
        b.destroy()
