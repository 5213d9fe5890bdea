"""GPU tier, low-latency kernels (issue #4), driven through deepep_cupy.low_latency directly (not yet
wired into Buffer): dispatch bit-exact against the reference (BF16, FP8, round_scale, UE8M0), both
transports (NVLink stores and forced NVSHMEM puts), combine bit-exact, and repeated calls.

Written before the kernels first ran on GPUs: expect the first session with GPU time to debug here.
"""

import ml_dtypes
import numpy as np
import pytest

from testutil import assert_all_ranks, gpu_skip_reason, world

pytestmark = pytest.mark.skipif(gpu_skip_reason() is not None, reason=str(gpu_skip_reason()))

BF16 = ml_dtypes.bfloat16
M, H, E, K = 128, 7168, 64, 8


@pytest.fixture(scope="module")
def buf():
    import deepep_cupy as ep
    from deepep_cupy import low_latency
    comm = world()
    b = ep.Buffer(comm, num_nvl_bytes=1 << 20,
                  num_rdma_bytes=low_latency.size_hint(M, H, comm.Get_size(), E), backend="gpu")
    yield b
    b.destroy()


def inputs(seed, num_ranks, tokens, holes=True):
    xs, idxs, ws = [], [], []
    for r in range(num_ranks):
        rng = np.random.default_rng(seed * 100 + r)
        t = tokens if r % 2 == 0 else max(0, tokens - 5)
        xs.append(rng.standard_normal((t, H), dtype=np.float32).astype(BF16))
        idx = np.argsort(rng.random((t, E)), axis=1)[:, :K].astype(np.int64)
        if holes:
            idx[rng.random(idx.shape) < 0.2] = -1
        idxs.append(idx)
        ws.append(rng.random((t, K), dtype=np.float32))
    return xs, idxs, ws


@pytest.mark.parametrize("force_puts", [False, True], ids=["nvlink", "puts"])
@pytest.mark.parametrize("mode", ["bf16", "fp8", "fp8_round", "fp8_ue8m0"])
def test_low_latency_round_trip(buf, force_puts, mode):
    import cupy as cp
    from deepep_cupy import low_latency, reference
    comm, R, me = world(), buf.num_ranks, buf.rank
    use_fp8 = mode != "bf16"
    round_scale = mode in ("fp8_round", "fp8_ue8m0")
    ue8m0 = mode == "fp8_ue8m0"
    kernels = low_latency.LowLatencyKernels(buf._backend, M, H, E, force_puts=force_puts)
    stream = buf._backend.comm_stream
    problems = []
    for it, tokens in enumerate([M, 1, 0, 77]):
        xs, idxs, ws = inputs(10 * it + len(mode), R, tokens)
        ref = reference.low_latency_dispatch(xs, idxs, M, E, use_fp8=use_fp8, round_scale=round_scale,
                                             use_ue8m0=ue8m0)
        kernels.dispatch_send(cp.asarray(xs[me]), cp.asarray(idxs[me]), use_fp8, round_scale, ue8m0, stream)
        recv_x, recv_scales, recv_count, handle = kernels.dispatch_recv(stream)
        stream.synchronize()
        kernels.check_errors("low-latency dispatch")
        mine = ref[me]
        counts = cp.asnumpy(recv_count)
        if not np.array_equal(counts, mine.recv_count):
            problems.append(f"T={tokens}: recv_count {counts[:6]} != {mine.recv_count[:6]}")
            continue
        got_x = cp.asnumpy(recv_x)
        for l, n in enumerate(counts):
            a = got_x[l, :n].view(np.uint8)
            b = mine.recv_x[l, :n].view(np.uint8)
            if not np.array_equal(a, b):
                problems.append(f"T={tokens}: expert {l} data differs")
                break
            if use_fp8 and not np.array_equal(cp.asnumpy(recv_scales)[l, :n], mine.recv_x_scales[l, :n]):
                problems.append(f"T={tokens}: expert {l} scales differ")
                break
            if not np.array_equal(cp.asnumpy(handle.recv_src_info)[l, :n], mine.recv_src_info[l, :n]):
                problems.append(f"T={tokens}: expert {l} source indices differ")
                break
        if not np.array_equal(cp.asnumpy(handle.layout_begin), mine.layout_begin) or \
                not np.array_equal(cp.asnumpy(handle.layout_count), mine.layout_count):
            problems.append(f"T={tokens}: layout ranges differ")
        if use_fp8:
            continue
        # combine: every expert returns its input; the reference sums w * y over k
        ys = [r.recv_x for r in ref]
        want = reference.low_latency_combine(ys, idxs, ws, ref)[me]
        kernels.combine_send(recv_x, handle, stream)
        out = kernels.combine_recv(cp.asarray(idxs[me]), cp.asarray(ws[me]), handle, None, stream)
        stream.synchronize()
        kernels.check_errors("low-latency combine")
        if not np.array_equal(cp.asnumpy(out).view(np.uint16), want.view(np.uint16)):
            problems.append(f"T={tokens}: combine differs")
    assert_all_ranks(comm, not problems, "\n".join(problems[:8]))
