"""GPU tier: the hierarchical (internode) dispatch and combine against the numpy reference.

One host plays several nodes: ``ranks_per_node`` = half the ranks (2 ranks: two nodes of one;
4 ranks: two nodes of two), or DEEPEP_TEST_RANKS_PER_NODE. The RDMA stage then really runs through
NVSHMEM puts and the NVLink stage through NVLink stores.

Dispatch must be bit-exact against the reference (same order: source rank, then token). Combine
rounds each token's sum once per node and once at the end (as DeepEP's internode combine does), so
its oracle is the reference combine taken node by node, then summed over nodes in float32 after the
biases: bit-exact too.
"""

import os

import numpy as np
import pytest

from dispatch_cases import BF16, host, make_inputs, routing, to_gpu
from testutil import assert_all_ranks, gpu_skip_reason, world

pytestmark = pytest.mark.skipif(gpu_skip_reason() is not None, reason=str(gpu_skip_reason()))

MAX_TOKENS, MAX_HIDDEN, MAX_TOPK = 1024, 7168, 9


def ranks_per_node(num_ranks):
    """The simulated node size of this run (None: this rank count cannot form two nodes)."""
    if "DEEPEP_TEST_RANKS_PER_NODE" in os.environ:
        return int(os.environ["DEEPEP_TEST_RANKS_PER_NODE"])
    return num_ranks // 2 if num_ranks >= 2 and num_ranks % 2 == 0 else None


@pytest.fixture(scope="module")
def buf():
    import deepep_cupy as ep
    comm = world()
    per_node = ranks_per_node(comm.Get_size())
    if per_node is None:
        pytest.skip(f"{comm.Get_size()} rank(s) cannot be split into two nodes")
    nvl, rdma = ep.Buffer.get_internode_size_hint(MAX_TOKENS, MAX_HIDDEN, comm.Get_size(), per_node, MAX_TOPK)
    b = ep.Buffer(comm, num_nvl_bytes=nvl, num_rdma_bytes=rdma, ranks_per_node=per_node, backend="gpu")
    assert b.num_nodes >= 2
    yield b
    b.destroy()


def two_level_combine(results, ys, me, ranks_per_node, bias=None, weights=None):
    """The combine our hierarchical kernels compute, from the reference: each node's copies summed
    (float32, rank order) and rounded to bf16, then bias0 + bias1 + the node sums in node order
    (float32), rounded once more. Weights sum exactly, so the reference's are the oracle."""
    from deepep_cupy import reference
    num_ranks = len(results)
    num_nodes = num_ranks // ranks_per_node
    acc = None
    for n in range(num_nodes):
        masked = [y if r // ranks_per_node == n else np.zeros_like(y) for r, y in enumerate(ys)]
        part = reference.combine(masked, results)[me][0].astype(np.float32)
        if acc is None:
            acc = np.zeros_like(part)
            for b in (bias or ()):
                if b is not None:
                    acc = acc + b.astype(np.float32)
        acc = acc + part
    want_w = None
    if weights is not None:
        want_w = reference.combine(ys, results, topk_weights=weights)[me][1]
    return acc.astype(BF16), want_w


def run_case(buf, seed, tokens, hidden, num_topk, num_experts, kind, fp8=False, with_weights=True,
             alignment=1, worst=0, with_bias=False, use_cached=False):
    """Dispatch + combine (+ a cached dispatch) against the reference; returns a list of problems."""
    from deepep_cupy import reference
    R, me, L = buf.num_ranks, buf.rank, buf.ranks_per_node
    xs, scales, idxs, ws = make_inputs(seed, R, tokens, hidden, num_topk, num_experts, kind, fp8, with_weights)
    tag = (f"seed={seed} T={tokens} H={hidden} K={num_topk} E={num_experts} {kind} fp8={fp8} "
           f"w={with_weights} align={alignment} worst={worst}")
    results = reference.dispatch(xs, idxs, ws, num_experts, expert_alignment=alignment,
                                 num_worst_tokens=worst, x_scales=scales)
    ref = results[me]
    x_in = (to_gpu(xs[me]), to_gpu(scales[me])) if fp8 else to_gpu(xs[me])
    idx_g, w_g = to_gpu(idxs[me]), to_gpu(ws[me]) if ws else None
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(idx_g, num_experts)
    recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
        x_in, topk_idx=idx_g, topk_weights=w_g, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma,
        is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, expert_alignment=alignment,
        num_worst_tokens=worst)
    n, rows = ref.num_recv_tokens, worst or ref.num_recv_tokens
    got_x = host(recv_x[0] if fp8 else recv_x)
    if got_x.shape != (rows, hidden):
        return [f"{tag}: recv_x shape {got_x.shape} != {(rows, hidden)}"]
    problems = []
    want_x = ref.recv_x.view(np.uint8) if fp8 else ref.recv_x
    bad_rows = (got_x[:n].view(np.uint8) != want_x[:n].view(np.uint8)).any(axis=1)
    if bad_rows.any():
        problems.append(f"{tag}: recv_x differs in {int(bad_rows.sum())} of {n} rows (first {int(np.argmax(bad_rows))})")
    if fp8 and not np.array_equal(host(recv_x[1])[:n], ref.recv_x_scales[:n]):
        problems.append(f"{tag}: recv scales differ")
    if not np.array_equal(host(recv_idx)[:n], ref.recv_topk_idx[:n]):
        problems.append(f"{tag}: recv_topk_idx differs")
    if worst and not (host(recv_idx)[n:] == -1).all():
        problems.append(f"{tag}: padding rows of recv_topk_idx are not -1")
    if with_weights and not np.array_equal(host(recv_w)[:n], ref.recv_topk_weights[:n]):
        problems.append(f"{tag}: recv_topk_weights differ")
    if worst == 0 and counts != ref.num_recv_tokens_per_expert_list:
        problems.append(f"{tag}: per-expert counts {counts[:4]}... != {ref.num_recv_tokens_per_expert_list[:4]}...")
    if not np.array_equal(host(handle.recv_src_idx)[:n], ref.recv_src_idx[:n]):
        problems.append(f"{tag}: recv_src_idx differs")
    if fp8 or problems:
        return problems

    ys = [r.recv_x for r in results]
    bias = None
    if with_bias:
        bias = [(np.full((len(xs[r]), hidden), 0.5, BF16),
                 (np.arange(len(xs[r]) * hidden, dtype=np.float32).reshape(len(xs[r]), hidden) % 7).astype(BF16))
                for r in range(R)]
    ref_w = [r.recv_topk_weights for r in results] if with_weights else None
    want, want_w = two_level_combine(results, ys, me, L, bias=None if bias is None else bias[me], weights=ref_w)
    b = None if bias is None else (to_gpu(bias[me][0]), to_gpu(bias[me][1]))
    got, got_w, _ = buf.combine(recv_x, handle, topk_weights=recv_w if with_weights else None, bias=b)
    if not np.array_equal(host(got).view(np.uint16), want.view(np.uint16)):
        diff = np.abs(host(got).astype(np.float32) - want.astype(np.float32)).max() if want.size else 0
        problems.append(f"{tag}: combine differs (max abs {diff})")
    if with_weights and not np.array_equal(host(got_w), want_w):
        problems.append(f"{tag}: combined weights differ")
    if use_cached:   # same routing, new data, no layout work
        xs2 = [(x.astype(np.float32) * 2 - 1).astype(BF16) for x in xs]
        want2 = reference.dispatch(xs2, idxs, None, num_experts, num_worst_tokens=worst)[me]
        recv2, idx2, w2, counts2, _, _ = buf.dispatch(to_gpu(xs2[me]), handle=handle)
        if idx2 is not None or w2 is not None or counts2 is not None:
            problems.append(f"{tag}: cached dispatch returned top-k outputs")
        if not np.array_equal(host(recv2)[:n].view(np.uint16), want2.recv_x[:n].view(np.uint16)):
            problems.append(f"{tag}: cached dispatch differs")
    return problems


CASES = [dict(tokens=t, hidden=h, kind=k) for t, h, k in [
    (0, 2048, "random"), (1, 4096, "holes"), (129, 7168, "hot"), (129, 2048, "rank0_only"),
    (1024, 7168, "random"), (1024, 5120, "holes"), (777, 2560, "all_minus_one"), (300, 6144, "hot")]]


@pytest.mark.parametrize("case", CASES, ids=[f"T{c['tokens']}-H{c['hidden']}-{c['kind']}" for c in CASES])
def test_dispatch_combine_bf16_matches_reference(buf, case):
    problems = []
    for j, (topk, experts) in enumerate([(8, 256), (9, 288)]):
        problems += run_case(buf, 11 + j + 7 * CASES.index(case), case["tokens"], case["hidden"], topk, experts,
                             case["kind"], with_bias=(j == 1), alignment=1 if j == 0 else 128, use_cached=(j == 0))
    assert_all_ranks(world(), not problems, "\n".join(problems[:6]))


@pytest.mark.parametrize("kind", ["random", "holes", "hot", "rank0_only"])
def test_dispatch_fp8_matches_reference(buf, kind):
    problems = []
    for tokens, hidden in [(129, 2048), (1024, 7168), (1, 5120)]:
        problems += run_case(buf, 500 + tokens + hidden, tokens, hidden, 8, 256, kind, fp8=True)
    assert_all_ranks(world(), not problems, "\n".join(problems[:6]))


def test_worst_tokens_without_weights(buf):
    problems = []
    for kind in ("random", "rank0_only"):
        problems += run_case(buf, 900, 700, 4096, 8, 64, kind, with_weights=False, worst=700 * buf.num_ranks + 64)
    assert_all_ranks(world(), not problems, "\n".join(problems[:6]))


def test_dispatch_without_topk_routes_by_rank_mask(buf):
    """No topk_idx: is_token_in_rank alone routes (one synthetic expert per rank inside)."""
    from deepep_cupy import reference
    R, me, T, H, E, K = buf.num_ranks, buf.rank, 333, 4096, 64, 6
    xs, _, idxs, _ = make_inputs(123, R, T, H, K, E, "holes", False, False)
    idx_g = to_gpu(idxs[me])
    per_rank, _, _, in_rank, _ = buf.get_dispatch_layout(idx_g, E)
    recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(to_gpu(xs[me]), num_tokens_per_rank=per_rank,
                                                                is_token_in_rank=in_rank)
    res = reference.dispatch(xs, idxs, None, E)
    ok = recv_idx is None and recv_w is None and counts == []
    ok &= np.array_equal(host(recv_x).view(np.uint16), res[me].recv_x.view(np.uint16))
    got, _, _ = buf.combine(recv_x, handle)
    want, _ = two_level_combine(res, [r.recv_x for r in res], me, buf.ranks_per_node)
    ok &= np.array_equal(host(got).view(np.uint16), want.view(np.uint16))
    assert_all_ranks(world(), ok, "rank-mask dispatch/combine differs from the reference")


def test_cuda_graph_replay(buf):
    """dispatch (num_worst_tokens: no host wait) + combine captured once, replayed 50 times."""
    import cupy as cp
    from deepep_cupy import reference
    R, me, T, H, E, K = buf.num_ranks, buf.rank, 256, 2048, 64, 6
    idxs = [routing("holes", T, K, E, R, np.random.default_rng(r)) for r in range(R)]
    idx_g = to_gpu(idxs[me])
    worst = R * T
    x_g = cp.zeros((T, H), dtype=cp.dtype(BF16))
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(idx_g, E)
    kwargs = dict(topk_idx=idx_g, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma,
                  is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, num_worst_tokens=worst)
    buf.dispatch(x_g, **kwargs)   # JIT and first-use work outside the capture
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        recv_x, _, _, _, handle, _ = buf.dispatch(x_g, **kwargs)
        combined, _, _ = buf.combine(recv_x, handle)
        graph = stream.end_capture()
    problems = []
    for it in range(50):
        xs = [np.random.default_rng(1000 * it + r).standard_normal((T, H), dtype=np.float32).astype(BF16)
              for r in range(R)]
        with stream:
            x_g[...] = to_gpu(xs[me])
        world().Barrier()
        graph.launch(stream)
        stream.synchronize()
        res = reference.dispatch(xs, idxs, None, E, num_worst_tokens=worst)
        n = res[me].num_recv_tokens
        if not np.array_equal(host(recv_x)[:n].view(np.uint16), res[me].recv_x[:n].view(np.uint16)):
            problems.append(f"replay {it}: dispatch differs")
        want, _ = two_level_combine(res, [r.recv_x for r in res], me, buf.ranks_per_node)
        if not np.array_equal(host(combined).view(np.uint16), want.view(np.uint16)):
            problems.append(f"replay {it}: combine differs")
        if problems:
            break
    assert_all_ranks(world(), not problems, "\n".join(problems))


def test_stress_300_iterations_bit_identical(buf):
    import cupy as cp
    R, me, T, H, E, K = buf.num_ranks, buf.rank, 256, 4096, 64, 8
    idx = to_gpu(routing("holes", T, K, E, R, np.random.default_rng(me)))
    x = cp.asarray(np.random.default_rng(7 + me).standard_normal((T, H), dtype=np.float32).astype(BF16))
    first, mismatches = None, 0
    for it in range(300):
        recv_x, _, _, _, handle, _ = buf.dispatch(x, topk_idx=idx,
                                                  num_tokens_per_expert=buf.get_dispatch_layout(idx, E)[2])
        out, _, _ = buf.combine(recv_x, handle)
        if it % 25 == 0 or it == 299:
            snap = (host(recv_x).view(np.uint16).copy(), host(out).view(np.uint16).copy())
            if first is None:
                first = snap
            elif not (np.array_equal(first[0], snap[0]) and np.array_equal(first[1], snap[1])):
                mismatches += 1
    assert_all_ranks(world(), mismatches == 0, f"{mismatches} snapshots differ from the first")


def test_one_buffer_serves_internode_or_low_latency(buf):
    """The RDMA region holds either the internode or the low-latency kernels: asking for the other
    raises before anything is launched."""
    import deepep_cupy as ep
    x = to_gpu(np.zeros((4, 2048), BF16))
    idx = to_gpu(np.zeros((4, 2), np.int64))
    with pytest.raises(ep.DeepEPInvalid, match="internode"):
        buf.low_latency_dispatch(x, idx, 128, 8 * buf.num_ranks)


def test_zz_missing_peer_times_out_naming_rank_and_stage(buf):
    """Rank 1 skips a dispatch (with two nodes of one it is rank 0's RDMA peer, with larger nodes
    its NVLink peer): rank 0 gives up after settings.timeout_seconds and its next call raises
    DeepEPTimeout naming rank 0, rank 1 and the stage. Runs last (its own buffer)."""
    import time
    import cupy as cp
    import deepep_cupy as ep
    comm = world()
    old = ep.settings.timeout_seconds
    ep.settings.timeout_seconds = 3.0
    nvl, rdma = ep.Buffer.get_internode_size_hint(256, 2048, comm.Get_size(), buf.ranks_per_node, 4)
    b = ep.Buffer(comm, num_nvl_bytes=nvl, num_rdma_bytes=rdma, ranks_per_node=buf.ranks_per_node, backend="gpu")
    try:
        xs, _, idxs, _ = make_inputs(99, b.num_ranks, 256, 2048, 4, 32, "random", False, False)
        idx_g = to_gpu(idxs[b.rank])
        per_expert = b.get_dispatch_layout(idx_g, 32)[2]
        b.dispatch(to_gpu(xs[b.rank]), topk_idx=idx_g, num_tokens_per_expert=per_expert,
                   num_worst_tokens=256 * b.num_ranks)    # warm-up: every rank
        cp.cuda.Device().synchronize()
        comm.Barrier()
        message, ok = "", True
        if b.rank != 1:   # rank 1 never joins this one
            t0 = time.monotonic()
            b.dispatch(to_gpu(xs[b.rank]), topk_idx=idx_g, num_tokens_per_expert=per_expert,
                       num_worst_tokens=256 * b.num_ranks)
            cp.cuda.Device().synchronize()
            waited = time.monotonic() - t0
            try:
                b.dispatch(to_gpu(xs[b.rank]), topk_idx=idx_g, num_tokens_per_expert=per_expert,
                           num_worst_tokens=256 * b.num_ranks)
            except ep.DeepEPTimeout as e:
                message = str(e)
            if b.rank == 0:
                ok = ("rank 0" in message and "rank 1" in message and "stage" in message and "dispatch" in message
                      and waited < 30)
        assert_all_ranks(comm, ok, f"expected a DeepEPTimeout naming rank 0, rank 1 and the stage; got {message!r}")
    finally:
        ep.settings.timeout_seconds = old
        cp.cuda.Device().synchronize()
        comm.Barrier()
        b.destroy()
