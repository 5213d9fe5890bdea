"""GPU tier: high-throughput dispatch and combine inside one node against the numpy reference.

Every rank builds every rank's inputs from a shared seed, so each can compute the reference result
for itself. Dispatch must be bit-exact (data, scales, expert ids, weights, counts, source indices);
combine follows the reference's float32 order (biases, then ranks ascending), so it is bit-exact too.
"""

import itertools

import ml_dtypes
import numpy as np
import pytest

from dispatch_cases import host, make_inputs, routing, to_gpu
from testutil import assert_all_ranks, gpu_skip_reason, world

pytestmark = pytest.mark.skipif(gpu_skip_reason() is not None, reason=str(gpu_skip_reason()))

BF16, FP8 = ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn
MAX_TOKENS, MAX_HIDDEN, MAX_TOPK = 4096, 7168, 9


@pytest.fixture(scope="module")
def buf():
    import deepep_cupy as ep
    comm = world()
    nbytes = ep.Buffer.get_intranode_size_hint(MAX_TOKENS, MAX_HIDDEN, comm.Get_size(), MAX_TOPK)
    b = ep.Buffer(comm, num_nvl_bytes=nbytes, backend="gpu")
    yield b
    b.destroy()


def run_case(buf, case_seed, tokens, hidden, num_topk, num_experts, kind, fp8, with_weights,
             alignment=1, worst=0, with_bias=False, use_cached=False):
    """Dispatch + combine on the GPU vs the reference; returns a list of problems."""
    from deepep_cupy import reference
    R, me = buf.num_ranks, buf.rank
    xs, scales, idxs, ws = make_inputs(case_seed, R, tokens, hidden, num_topk, num_experts, kind, fp8, with_weights)
    problems = []
    tag = f"seed={case_seed} T={tokens} H={hidden} K={num_topk} E={num_experts} {kind} fp8={fp8} w={with_weights} align={alignment} worst={worst}"
    results = reference.dispatch(xs, idxs, ws, num_experts, expert_alignment=alignment,
                                 num_worst_tokens=worst, x_scales=scales)
    ref = results[me]
    x_in = (to_gpu(xs[me]), to_gpu(scales[me])) if fp8 else to_gpu(xs[me])
    idx_g, w_g = to_gpu(idxs[me]), to_gpu(ws[me]) if ws else None
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx_g, num_experts)
    recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
        x_in, topk_idx=idx_g, topk_weights=w_g, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert, expert_alignment=alignment, num_worst_tokens=worst)
    rows = worst or ref.num_recv_tokens
    n = ref.num_recv_tokens
    got_x = host(recv_x[0] if fp8 else recv_x)
    if got_x.shape != (rows, hidden):
        return [f"{tag}: recv_x shape {got_x.shape} != {(rows, hidden)}"]
    want_x = ref.recv_x.view(np.uint8) if fp8 else ref.recv_x
    if not np.array_equal(got_x[:n].view(np.uint8), want_x[:n].view(np.uint8)):
        problems.append(f"{tag}: recv_x differs in {int((got_x[:n].view(np.uint8) != want_x[:n].view(np.uint8)).any(axis=1).sum())} rows")
    if fp8 and not np.array_equal(host(recv_x[1])[:n], ref.recv_x_scales[:n]):
        problems.append(f"{tag}: recv scales differ")
    if not np.array_equal(host(recv_idx), ref.recv_topk_idx):
        problems.append(f"{tag}: recv_topk_idx differs")
    if with_weights and not np.array_equal(host(recv_w), ref.recv_topk_weights):
        problems.append(f"{tag}: recv_topk_weights differ")
    if counts != ref.num_recv_tokens_per_expert_list:
        problems.append(f"{tag}: per-expert counts {counts[:4]}... != {ref.num_recv_tokens_per_expert_list[:4]}...")
    if not np.array_equal(host(handle.recv_src_idx)[:n], ref.recv_src_idx[:n]):
        problems.append(f"{tag}: recv_src_idx differs")
    if worst and not (host(recv_idx)[n:] == -1).all():
        problems.append(f"{tag}: padding rows of recv_topk_idx are not -1")
    if fp8:
        return problems

    # combine the received rows (as if each expert returned its input), optionally with a bias pair
    ys = [r.recv_x for r in results]
    bias = None
    if with_bias:
        bias = [(np.full((len(xs[r]), hidden), 0.5, BF16), (np.arange(len(xs[r]) * hidden, dtype=np.float32)
                 .reshape(len(xs[r]), hidden) % 7).astype(BF16)) for r in range(R)]
    ref_w = [r.recv_topk_weights for r in results] if with_weights else None
    want, want_w = reference.combine(ys, results, topk_weights=ref_w, bias=bias)[me]
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


CASES = []
for i, (tokens, hidden) in enumerate(itertools.product([0, 1, 129, 4096], [2048, 4096, 5120, 7168])):
    kind = ["random", "holes", "hot", "rank0_only", "all_minus_one"][i % 5]
    CASES.append(dict(tokens=tokens, hidden=hidden, kind=kind))


@pytest.mark.parametrize("case", CASES, ids=[f"T{c['tokens']}-H{c['hidden']}-{c['kind']}" for c in CASES])
def test_dispatch_combine_bf16_matches_reference(buf, case):
    comm = world()
    problems = []
    for j, (topk, experts) in enumerate([(8, 256), (9, 288)]):
        problems += run_case(buf, 1 + j + 7 * CASES.index(case), case["tokens"], case["hidden"], topk, experts,
                             case["kind"], fp8=False, with_weights=True, with_bias=(j == 1),
                             alignment=1 if j == 0 else 128, use_cached=(j == 0))
    assert_all_ranks(comm, not problems, "\n".join(problems[:6]))


@pytest.mark.parametrize("kind", ["random", "holes", "hot", "rank0_only"])
@pytest.mark.parametrize("tokens,hidden", [(129, 2048), (4096, 7168), (1, 5120)])
def test_dispatch_fp8_matches_reference(buf, kind, tokens, hidden):
    problems = run_case(buf, 500 + tokens + hidden, tokens, hidden, 8, 256, kind, fp8=True, with_weights=True)
    assert_all_ranks(world(), not problems, "\n".join(problems[:6]))


@pytest.mark.parametrize("worst", [4096 * 2 + 64])
def test_dispatch_combine_worst_tokens_and_no_weights(buf, worst):
    problems = []
    for kind in ("random", "rank0_only"):
        problems += run_case(buf, 900, 1000, 4096, 8, 64, kind, fp8=False, with_weights=False, worst=worst)
    assert_all_ranks(world(), not problems, "\n".join(problems[:6]))


def test_cuda_graph_replay(buf):
    """dispatch (num_worst_tokens) + combine captured once, replayed 100 times on new data."""
    import cupy as cp
    from deepep_cupy import reference
    R, me, T, H, E, K = buf.num_ranks, buf.rank, 512, 2048, 64, 6
    idxs = [routing("holes", T, K, E, R, np.random.default_rng(r)) for r in range(R)]
    idx_g = to_gpu(idxs[me])
    worst = R * T
    x_g = cp.zeros((T, H), dtype=cp.dtype(BF16))
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx_g, E)
    buf.dispatch(x_g, topk_idx=idx_g, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                 num_tokens_per_expert=per_expert, num_worst_tokens=worst)   # warm up (JIT) outside capture
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        recv_x, _, _, _, handle, _ = buf.dispatch(x_g, topk_idx=idx_g, num_tokens_per_rank=per_rank,
                                                   is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                                                   num_worst_tokens=worst)
        combined, _, _ = buf.combine(recv_x, handle)
        graph = stream.end_capture()
    problems = []
    for it in range(100):
        xs = [(np.random.default_rng(1000 * it + r).standard_normal((T, H), dtype=np.float32)).astype(BF16)
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
        want, _ = reference.combine([r.recv_x for r in res], res)[me]
        if not np.array_equal(host(combined).view(np.uint16), want.view(np.uint16)):
            problems.append(f"replay {it}: combine differs")
        if problems:
            break
    assert_all_ranks(world(), not problems, "\n".join(problems))


def test_stress_1000_iterations_bit_identical(buf):
    import cupy as cp
    R, me, T, H, E, K = buf.num_ranks, buf.rank, 256, 4096, 64, 8
    idx = to_gpu(routing("holes", T, K, E, R, np.random.default_rng(me)))
    x = cp.asarray(np.random.default_rng(7 + me).standard_normal((T, H), dtype=np.float32).astype(BF16))
    first = None
    mismatches = 0
    for it in range(1000):
        recv_x, _, _, _, handle, _ = buf.dispatch(x, topk_idx=idx, num_tokens_per_expert=buf.get_dispatch_layout(idx, E)[2])
        out, _, _ = buf.combine(recv_x, handle)
        if it % 50 == 0 or it == 999:
            snap = (host(recv_x).view(np.uint16).copy(), host(out).view(np.uint16).copy())
            if first is None:
                first = snap
            elif not (np.array_equal(first[0], snap[0]) and np.array_equal(first[1], snap[1])):
                mismatches += 1
    assert_all_ranks(world(), mismatches == 0, f"{mismatches} snapshots differ from the first")


def test_async_events_and_previous_event(buf):
    import cupy as cp
    from deepep_cupy import EventOverlap, reference
    R, me, T, H, E, K = buf.num_ranks, buf.rank, 300, 2048, 32, 4
    xs, _, idxs, ws = make_inputs(77, R, T, H, K, E, "random", False, True)
    idx_g = to_gpu(idxs[me])
    prev = EventOverlap(cp.cuda.get_current_stream().record())
    recv_x, recv_idx, recv_w, counts, handle, event = buf.dispatch(
        to_gpu(xs[me]), topk_idx=idx_g, topk_weights=to_gpu(ws[me]),
        num_tokens_per_expert=buf.get_dispatch_layout(idx_g, E)[2], previous_event=prev,
        async_finish=True, allocate_on_comm_stream=True)
    event.current_stream_wait()
    ref = reference.dispatch(xs, idxs, ws, E)[me]
    ok = np.array_equal(host(recv_x).view(np.uint16), ref.recv_x.view(np.uint16))
    out, out_w, event = buf.combine(recv_x, handle, topk_weights=recv_w, async_finish=True)
    with event:
        pass
    res = reference.dispatch(xs, idxs, ws, E)
    want, want_w = reference.combine([r.recv_x for r in res], res,
                                     topk_weights=[r.recv_topk_weights for r in res])[me]
    ok &= np.array_equal(host(out).view(np.uint16), want.view(np.uint16)) and np.array_equal(host(out_w), want_w)
    assert_all_ranks(world(), ok, "async dispatch/combine differs from the reference")


@pytest.mark.parametrize("num_sms", [2, 8, 16, 24])
def test_sm_budgets(buf, num_sms):
    import deepep_cupy as ep
    problems = run_case(buf, 3000 + num_sms, 777, 2048, 8, 256, "random", fp8=False, with_weights=True)
    cfg = ep.Config(num_sms=num_sms)
    R, me = buf.num_ranks, buf.rank
    xs, _, idxs, _ = make_inputs(3100 + num_sms, R, 513, 4096, 8, 256, "hot", False, False)
    from deepep_cupy import reference
    ref = reference.dispatch(xs, idxs, None, 256)[me]
    idx_g = to_gpu(idxs[me])
    recv_x, _, _, _, handle, _ = buf.dispatch(to_gpu(xs[me]), topk_idx=idx_g,
                                              num_tokens_per_expert=buf.get_dispatch_layout(idx_g, 256)[2], config=cfg)
    if not np.array_equal(host(recv_x).view(np.uint16), ref.recv_x.view(np.uint16)):
        problems.append(f"num_sms={num_sms}: dispatch differs")
    out, _, _ = buf.combine(recv_x, handle, config=cfg)
    res = reference.dispatch(xs, idxs, None, 256)
    want, _ = reference.combine([r.recv_x for r in res], res)[me]
    if not np.array_equal(host(out).view(np.uint16), want.view(np.uint16)):
        problems.append(f"num_sms={num_sms}: combine differs")
    assert_all_ranks(world(), not problems, "\n".join(problems))


def test_combine_with_single_bias_array(buf):
    """bias as one array (the pair form is covered above)."""
    from deepep_cupy import reference
    R, me, T, H, E, K = buf.num_ranks, buf.rank, 200, 2048, 32, 4
    xs, _, idxs, _ = make_inputs(55, R, T, H, K, E, "holes", False, False)
    bias = [(np.arange(len(xs[r]) * H, dtype=np.float32).reshape(len(xs[r]), H) % 5 - 2).astype(BF16)
            for r in range(R)]
    idx_g = to_gpu(idxs[me])
    recv_x, _, _, _, handle, _ = buf.dispatch(to_gpu(xs[me]), topk_idx=idx_g,
                                              num_tokens_per_expert=buf.get_dispatch_layout(idx_g, E)[2])
    got, _, _ = buf.combine(recv_x, handle, bias=to_gpu(bias[me]))
    res = reference.dispatch(xs, idxs, None, E)
    want, _ = reference.combine([r.recv_x for r in res], res, bias=bias)[me]
    ok = np.array_equal(host(got).view(np.uint16), want.view(np.uint16))
    assert_all_ranks(world(), ok, "combine with a single bias array differs from the reference")


def test_zz_missing_peer_times_out_naming_rank_and_phase():
    """Rank 1 skips a combine: rank 0's combine gives up after settings.timeout_seconds and the next
    call raises DeepEPTimeout naming the rank and the phase; nobody hangs. Runs last (its own
    buffer), since the ranks' sequence numbers disagree afterwards."""
    import time
    import cupy as cp
    import deepep_cupy as ep
    comm = world()
    if comm.Get_size() < 2:
        pytest.skip("needs 2 ranks")
    old = ep.settings.timeout_seconds
    ep.settings.timeout_seconds = 3.0
    b = ep.Buffer(comm, num_nvl_bytes=ep.Buffer.get_intranode_size_hint(256, 2048, comm.Get_size()), backend="gpu")
    try:
        xs, _, idxs, _ = make_inputs(99, b.num_ranks, 256, 2048, 4, 32, "random", False, False)
        idx_g = to_gpu(idxs[b.rank])
        recv_x, _, _, _, handle, _ = b.dispatch(to_gpu(xs[b.rank]), topk_idx=idx_g,
                                                num_tokens_per_expert=b.get_dispatch_layout(idx_g, 32)[2])
        message = ""
        if b.rank == 0:
            t0 = time.monotonic()
            b.combine(recv_x, handle)           # rank 1 never joins
            cp.cuda.Device().synchronize()      # the kernel gives up after the timeout
            waited = time.monotonic() - t0
            try:
                b.combine(recv_x, handle)       # the next call reports the timeout
            except ep.DeepEPTimeout as e:
                message = str(e)
            ok = "rank 0" in message and "combine" in message and "rank 1" in message and waited < 30
        else:
            ok = True
        assert_all_ranks(comm, ok, f"expected a DeepEPTimeout naming rank 0, the phase and peer rank 1; got {message!r}")
    finally:
        ep.settings.timeout_seconds = old
        cp.cuda.Device().synchronize()
        comm.Barrier()
        b.destroy()


def test_dispatch_without_topk_routes_by_rank_mask(buf):
    """No topk_idx: is_token_in_rank alone routes; no expert data travels."""
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
    want, _ = reference.combine([r.recv_x for r in res], res)[me]
    ok &= np.array_equal(host(got).view(np.uint16), want.view(np.uint16))
    assert_all_ranks(world(), ok, "dispatch without topk_idx differs from the reference routing")
