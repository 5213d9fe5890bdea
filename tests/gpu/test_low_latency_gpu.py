"""GPU tier, low-latency dispatch and combine (issue #4) through ``Buffer``, under ``mpirun -n 2``.

Against the reference model, bit-exact: dispatch data, FP8 scales (plain, round_scale, UE8M0),
counts, source indices and layout ranges; combine output. 56 routings (random with -1 slots, a hot
expert, a rank receiving nothing, all -1, zero / one / M tokens, top-k 1 to 16, every supported
hidden size from 2048 to 8192) on both transports (NVLink stores; NVSHMEM puts forced by
``allow_nvlink_for_low_latency_mode=False``), M = 1024, the receive hook with real work in
between and two operations in flight, CUDA-graph replay, a 1000-iteration loop, zero-copy, bad
inputs, and a peer that never calls (last).
"""

import time

import ml_dtypes
import numpy as np
import pytest

from testutil import assert_all_ranks, gpu_skip_reason, world

pytestmark = pytest.mark.skipif(gpu_skip_reason() is not None, reason=str(gpu_skip_reason()))

BF16 = ml_dtypes.bfloat16
HIDDENS = (2048, 2560, 3072, 4096, 5120, 6144, 7168, 8192)
MODES = ("bf16", "fp8", "fp8_round", "fp8_ue8m0")
ROUTINGS = ("random", "hot", "rank0_only", "random", "all_holes")


def mode_flags(mode):
    """(use_fp8, round_scale, use_ue8m0) of a mode name."""
    return mode != "bf16", mode in ("fp8_round", "fp8_ue8m0"), mode == "fp8_ue8m0"


def routing(kind, tokens, k, e, num_ranks, rng):
    """int64 [tokens, k] expert ids of one rank for a routing kind."""
    if kind == "all_holes":
        return np.full((tokens, k), -1, dtype=np.int64)
    pool = e // num_ranks if kind == "rank0_only" else e     # rank0_only: every expert on rank 0
    k_eff = min(k, pool)
    idx = np.full((tokens, k), -1, dtype=np.int64)
    idx[:, :k_eff] = np.argsort(rng.random((tokens, pool)), axis=1)[:, :k_eff]
    if kind == "hot":          # expert 1 in every token (moved to slot 0 if chosen elsewhere)
        for t in range(tokens):
            row = [v for v in idx[t] if v != 1][:k - 1]
            idx[t] = [1] + row + [-1] * (k - 1 - len(row))
    if kind == "random":
        idx[rng.random(idx.shape) < 0.2] = -1
    return idx


def make_inputs(seed, num_ranks, tokens, hidden, k, e, kind):
    """Every rank's (x, topk_idx, topk_weights); odd ranks get 5 tokens fewer."""
    xs, idxs, ws = [], [], []
    for r in range(num_ranks):
        rng = np.random.default_rng(seed * 100 + r)
        t = tokens if r % 2 == 0 else max(0, tokens - 5)
        xs.append((rng.standard_normal((t, hidden), dtype=np.float32) * 3).astype(BF16))
        idxs.append(routing(kind, t, k, e, num_ranks, rng))
        ws.append(rng.random((t, k), dtype=np.float32))
    return xs, idxs, ws


def cases():
    """56 (M, hidden, experts, topk, tokens, routing, mode) combinations."""
    out = []
    for i in range(56):
        m = 128 if i % 14 == 0 else 64
        tokens = (m, 1, 0, 37, m - 3)[(i // 3) % 5]
        out.append((m, HIDDENS[i % 8], (16, 32, 64)[i % 3], (8, 1, 11, 16, 6)[(i // 2) % 5], tokens,
                    ROUTINGS[i % 5], MODES[(i // 8) % 4]))
    return out


def bf16_combine_case(seed, num_ranks, me, m, hidden, k, e, kind="random"):
    """Every rank's inputs of a BF16 dispatch, the expert outputs it returns (its received rows)
    and what rank ``me``'s combine must give: (xs, idxs, ws, ys, want)."""
    from deepep_cupy import reference
    xs, idxs, ws = make_inputs(seed, num_ranks, m, hidden, k, e, kind)
    ref = reference.low_latency_dispatch(xs, idxs, m, e, use_fp8=False)
    ys = [r.recv_x for r in ref]
    return xs, idxs, ws, ys, reference.low_latency_combine(ys, idxs, ws, ref)[me]


def buffer_bytes(num_ranks):
    from deepep_cupy import Buffer
    shapes = {(m, h, e) for m, h, e, *_ in cases()} | {(1024, 2048, 16), (128, 7168, 256)}
    return max(Buffer.get_low_latency_rdma_size_hint(m, h, num_ranks, e) for m, h, e in shapes)


@pytest.fixture(scope="module", params=[True, False], ids=["nvlink", "puts"])
def buf(request):
    import deepep_cupy as ep
    comm = world()
    b = ep.Buffer(comm, num_rdma_bytes=buffer_bytes(comm.Get_size()), low_latency_mode=True, backend="gpu",
                  allow_nvlink_for_low_latency_mode=request.param)
    yield b
    b.destroy()


def host(a):
    import cupy as cp
    return cp.asnumpy(a)


def check_dispatch(got, mine, use_fp8, use_ue8m0, label):
    """Problems (strings) comparing one rank's dispatch outputs with its reference result."""
    recv, recv_count, handle = got
    problems = []
    counts = host(recv_count)
    if not np.array_equal(counts, mine.recv_count):
        return [f"{label}: recv_count {counts[:6]} != {mine.recv_count[:6]}"]
    data = host(recv[0] if use_fp8 else recv)
    scales = host(recv[1]) if use_fp8 else None
    src = host(handle.recv_src_info)
    for l, n in enumerate(counts):
        if not np.array_equal(data[l, :n].view(np.uint8), mine.recv_x[l, :n].view(np.uint8)):
            problems.append(f"{label}: expert {l} data differs")
        elif use_fp8 and not np.array_equal(scales[l, :n], mine.recv_x_scales[l, :n]):
            problems.append(f"{label}: expert {l} scales differ")
        elif not np.array_equal(src[l, :n], mine.recv_src_info[l, :n]):
            problems.append(f"{label}: expert {l} source indices differ")
        if problems:
            break
    if not np.array_equal(host(handle.layout_begin), mine.layout_begin) or \
            not np.array_equal(host(handle.layout_count), mine.layout_count):
        problems.append(f"{label}: layout ranges differ")
    return problems


def run_case(b, seed, m, hidden, e, k, tokens, kind, mode):
    """One dispatch + combine through the Buffer, checked against the reference; returns problems."""
    import cupy as cp
    from deepep_cupy import reference
    R, me = b.num_ranks, b.rank
    use_fp8, round_scale, ue8m0 = mode_flags(mode)
    xs, idxs, ws = make_inputs(seed, R, tokens, hidden, k, e, kind)
    label = f"case {seed} (M={m} H={hidden} E={e} K={k} T={tokens} {kind} {mode})"
    ref = reference.low_latency_dispatch(xs, idxs, m, e, use_fp8=use_fp8, round_scale=round_scale,
                                         use_ue8m0=ue8m0)
    idx_g = cp.asarray(idxs[me])
    recv, count, handle, _, hook = b.low_latency_dispatch(cp.asarray(xs[me]), idx_g, m, e, use_fp8=use_fp8,
                                                          round_scale=round_scale, use_ue8m0=ue8m0)
    assert hook is None
    problems = check_dispatch((recv, count, handle), ref[me], use_fp8, ue8m0, label)
    # combine: experts return the bf16 rows they would have received (any bf16 input would do)
    ref_bf16 = ref if not use_fp8 else reference.low_latency_dispatch(xs, idxs, m, e, use_fp8=False)
    ys = [r.recv_x for r in ref_bf16]
    want = reference.low_latency_combine(ys, idxs, ws, ref_bf16)[me]
    out, _, _ = b.low_latency_combine(cp.asarray(ys[me]), idx_g, cp.asarray(ws[me]), handle)
    if not np.array_equal(host(out).view(np.uint16), want.view(np.uint16)):
        bad = np.argwhere(host(out).view(np.uint16) != want.view(np.uint16))
        problems.append(f"{label}: combine differs at {len(bad)} values, first {bad[:2].tolist()}")
    return problems


def test_routings_against_reference(buf):
    """56 routings x hidden sizes x modes, dispatch and combine bit-exact, on this transport."""
    problems = []
    for seed, case in enumerate(cases()):
        problems += run_case(buf, seed, *case)
    assert_all_ranks(world(), not problems, "\n".join(problems[:10]))


@pytest.mark.parametrize("mode", MODES)
def test_small_case_per_mode(buf, mode):
    """One small routing per mode (M = 32, 24 tokens, hidden 2048, top-4 of 16), dispatch and combine
    bit-exact: every low-latency kernel variant in a few launches, which is what the sanitizers run
    (test_routings_against_reference's 56 cases took racecheck past 100 s after one test)."""
    problems = run_case(buf, 700 + MODES.index(mode), 32, 2048, 16, 4, 24, "random", mode)
    assert_all_ranks(world(), not problems, "\n".join(problems[:10]))


def test_max_tokens_per_rank(buf):
    """M = 1024 tokens per rank, top-8."""
    problems = run_case(buf, 500, 1024, 2048, 16, 8, 1024, "random", "fp8")
    problems += run_case(buf, 501, 1024, 2048, 16, 8, 1024, "hot", "bf16")
    assert_all_ranks(world(), not problems, "\n".join(problems[:10]))


def test_check_values_reads_topk_idx_once(buf):
    """With ``settings.check_values`` a low-latency dispatch checks its ids once (a device
    reduction and a host wait each), and the case stays exact."""
    from deepep_cupy import settings
    backend = buf._backend
    original, calls = backend.check_index_range, []

    def counting(*args):
        calls.append(args[1])
        return original(*args)
    old = settings.check_values
    settings.check_values, backend.check_index_range = True, counting
    try:
        problems = run_case(buf, 502, 64, 2048, 16, 8, 64, "random", "bf16")
    finally:
        settings.check_values = old
        del backend.check_index_range   # the class's method again
    if calls != ["topk_idx"]:   # run_case makes one dispatch (the combine checks no ids on the GPU)
        problems.append(f"id checks {calls}, want one of topk_idx")
    assert_all_ranks(world(), not problems, "\n".join(problems))


@pytest.mark.parametrize("reduce_warps,tma", [(0, False), (1, False), (8, False), (15, False), (4, True),
                                               (0, True)])
def test_fused_combine_role_splits_and_tma(buf, reduce_warps, tma):
    """The fused combine with other splits of each 16-warp block: 0 (every warp sends, then
    reduces), 1, 8 and 15 reducer warps (every other test runs the default, 4); and the TMA bulk-store
    send (``settings.ll_combine_tma``), fused and, once, with the hook. Bit-exact."""
    import cupy as cp
    import deepep_cupy as ep
    old = (ep.settings.ll_combine_reduce_warps, ep.settings.ll_combine_tma)
    ep.settings.ll_combine_reduce_warps, ep.settings.ll_combine_tma = reduce_warps, tma
    problems = []
    try:
        for i, case in enumerate(cases()[:6]):
            problems += run_case(buf, 600 + i, *case)
        problems += run_case(buf, 620, 128, 7168, 256, 8, 128, "random", "fp8")
        problems += run_case(buf, 621, 128, 7168, 256, 8, 128, "hot", "bf16")
        if tma and reduce_warps == 4:     # the hook's send kernel with TMA
            R, me, M, H, E, K = buf.num_ranks, buf.rank, 128, 8192, 64, 8
            xs, idxs, ws, ys, want = bf16_combine_case(630, R, me, M, H, K, E)
            idx_g = cp.asarray(idxs[me])
            _, _, handle, _, _ = buf.low_latency_dispatch(cp.asarray(xs[me]), idx_g, M, E, use_fp8=False)
            out, _, hook = buf.low_latency_combine(cp.asarray(ys[me]), idx_g, cp.asarray(ws[me]), handle,
                                                   return_recv_hook=True)
            hook()
            if not np.array_equal(host(out).view(np.uint16), want.view(np.uint16)):
                problems.append("TMA combine with the hook differs")
    finally:
        ep.settings.ll_combine_reduce_warps, ep.settings.ll_combine_tma = old
    assert_all_ranks(world(), not problems, "\n".join(problems[:10]))


def test_recv_hook_with_work_between_and_two_in_flight(buf):
    """return_recv_hook: the sends return at once; a GEMM runs before hook(); two dispatches may be in
    flight (A, B, hook A, hook B); combine's hook too. Results bit-exact."""
    import cupy as cp
    from deepep_cupy import reference
    from deepep_cupy.errors import DeepEPInvalid
    R, me, M, H, E, K = buf.num_ranks, buf.rank, 128, 7168, 64, 8
    a_in = make_inputs(700, R, M, H, K, E, "random")
    b_in = make_inputs(701, R, M - 9, H, K, E, "hot")
    ref_a = reference.low_latency_dispatch(a_in[0], a_in[1], M, E, use_fp8=True)
    ref_b = reference.low_latency_dispatch(b_in[0], b_in[1], M, E, use_fp8=False)
    work = cp.random.default_rng(me).random((2048, 2048), dtype=cp.float32)
    ra = buf.low_latency_dispatch(cp.asarray(a_in[0][me]), cp.asarray(a_in[1][me]), M, E, use_fp8=True,
                                  return_recv_hook=True)
    rb = buf.low_latency_dispatch(cp.asarray(b_in[0][me]), cp.asarray(b_in[1][me]), M, E, use_fp8=False,
                                  return_recv_hook=True)
    problems = []
    try:   # a third operation in flight is refused before anything is sent
        buf.low_latency_dispatch(cp.asarray(b_in[0][me]), cp.asarray(b_in[1][me]), M, E, return_recv_hook=True)
        problems.append("a third pending operation was accepted")
    except DeepEPInvalid:
        pass
    try:
        rb[4]()
        problems.append("hook B ran before hook A")
    except DeepEPInvalid:
        pass
    for _ in range(10):
        work = work @ work / 2048.0       # compute overlapping the transfer
    ra[4]()
    rb[4]()
    try:
        ra[4]()
        problems.append("a hook ran twice")
    except DeepEPInvalid:
        pass
    problems += check_dispatch(ra[:3], ref_a[me], True, False, "hook A")
    problems += check_dispatch(rb[:3], ref_b[me], False, False, "hook B")
    ys = [r.recv_x for r in ref_b]
    want = reference.low_latency_combine(ys, b_in[1], b_in[2], ref_b)[me]
    out, _, hook = buf.low_latency_combine(cp.asarray(ys[me]), cp.asarray(b_in[1][me]), cp.asarray(b_in[2][me]),
                                           rb[2], return_recv_hook=True)
    for _ in range(10):
        work = work @ work / 2048.0
    hook()
    if not np.array_equal(host(out).view(np.uint16), want.view(np.uint16)):
        problems.append("combine after hook differs")
    assert_all_ranks(world(), not problems, "\n".join(problems))


def test_two_in_flight_with_a_slow_peer(buf):
    """Two dispatches in flight (A, B); the last rank waits 1 s before its hooks while the others hook
    at once and go on to C and D, which reuse A's and B's halves: the guard makes C and D wait until
    the slow rank has received A and B, so every result matches the reference."""
    import cupy as cp
    from deepep_cupy import reference
    comm = world()
    R, me, M, H, E, K = buf.num_ranks, buf.rank, 64, 4096, 32, 8
    ins = [make_inputs(720 + i, R, M - i, H, K, E, ("random", "hot", "random", "rank0_only")[i]) for i in range(4)]
    refs = [reference.low_latency_dispatch(xs, idxs, M, E, use_fp8=False) for xs, idxs, _ in ins]
    problems = run_case(buf, 719, M, H, E, K, M, "random", "bf16")     # lay the shapes out first
    comm.Barrier()
    a = buf.low_latency_dispatch(cp.asarray(ins[0][0][me]), cp.asarray(ins[0][1][me]), M, E, use_fp8=False,
                                 return_recv_hook=True)
    b = buf.low_latency_dispatch(cp.asarray(ins[1][0][me]), cp.asarray(ins[1][1][me]), M, E, use_fp8=False,
                                 return_recv_hook=True)
    if me == R - 1:
        cp.cuda.get_current_stream().synchronize()
        time.sleep(1.0)
    a[4]()
    b[4]()
    c = buf.low_latency_dispatch(cp.asarray(ins[2][0][me]), cp.asarray(ins[2][1][me]), M, E, use_fp8=False)
    d = buf.low_latency_dispatch(cp.asarray(ins[3][0][me]), cp.asarray(ins[3][1][me]), M, E, use_fp8=False)
    for name, got, ref in (("A", a, refs[0]), ("B", b, refs[1]), ("C", c, refs[2]), ("D", d, refs[3])):
        problems += check_dispatch(got[:3], ref[me], False, False, f"operation {name}")
    assert_all_ranks(comm, not problems, "\n".join(problems))


def test_lagging_peer_that_receives_nothing_keeps_its_dispatch(buf):
    """The reuse hole of issue #12: dispatch A routes nothing to the last rank P, which sleeps before
    its hook while the others hook A, combine A (their tokens need no row from P) and send dispatch
    C into A's half, with tokens for P. A combine receive that waited only for its own tokens' rows
    let C's metas, flags and messages land before P read A's, so P saw C's counts as A's. Every
    receive now waits for every source's flag, so P's A, everyone's combine and C stay exact."""
    import cupy as cp
    from deepep_cupy import reference
    comm = world()
    R, me, M, H, E, K = buf.num_ranks, buf.rank, 64, 4096, 32, 4
    if R < 2:
        pytest.skip("needs 2 ranks")
    L, P = E // R, R - 1
    xs_a, _, ws_a = make_inputs(760, R, M, H, K, E, "random")
    idxs_a = []
    for r in range(R):     # A: experts of ranks 0 .. R-2 only
        rng = np.random.default_rng(761 + r)
        idxs_a.append(np.argsort(rng.random((len(xs_a[r]), P * L)), axis=1)[:, :K].astype(np.int64))
    xs_c, idxs_c, _ = make_inputs(762, R, M, H, K, E, "hot")      # C: expert 1 and every rank
    ref_a = reference.low_latency_dispatch(xs_a, idxs_a, M, E, use_fp8=False)
    ref_c = reference.low_latency_dispatch(xs_c, idxs_c, M, E, use_fp8=False)
    assert ref_a[P].recv_count.sum() == 0 and ref_c[P].recv_count.sum() > 0
    ys = [r.recv_x for r in ref_a]
    want = reference.low_latency_combine(ys, idxs_a, ws_a, ref_a)[me]
    problems = run_case(buf, 759, M, H, E, K, M, "random", "bf16")     # lay the shapes out first
    comm.Barrier()
    a = buf.low_latency_dispatch(cp.asarray(xs_a[me]), cp.asarray(idxs_a[me]), M, E, use_fp8=False,
                                 return_recv_hook=True)
    if me == P:
        cp.cuda.get_current_stream().synchronize()     # A is sent; now lag
        time.sleep(1.0)
    a[4]()
    out, _, _ = buf.low_latency_combine(cp.asarray(ys[me]), cp.asarray(idxs_a[me]), cp.asarray(ws_a[me]), a[2])
    c = buf.low_latency_dispatch(cp.asarray(xs_c[me]), cp.asarray(idxs_c[me]), M, E, use_fp8=False,
                                 return_recv_hook=True)
    c[4]()
    problems += check_dispatch(a[:3], ref_a[me], False, False, "dispatch A")
    problems += check_dispatch(c[:3], ref_c[me], False, False, "dispatch C")
    if not np.array_equal(host(out).view(np.uint16), want.view(np.uint16)):
        problems.append("combine A differs")
    assert_all_ranks(comm, not problems, "\n".join(problems))


def test_send_does_not_wait_for_peers(buf):
    """With return_recv_hook the send kernels finish while a peer has not even called yet."""
    import cupy as cp
    comm = world()
    R, me, M, H, E, K = buf.num_ranks, buf.rank, 128, 7168, 64, 8
    xs, idxs, _ = make_inputs(710, R, M, H, K, E, "random")
    problems = run_case(buf, 709, M, H, E, K, M, "random", "fp8")   # these shapes are laid out (no clean below)
    assert_all_ranks(comm, not problems, "\n".join(problems))
    comm.Barrier()
    if me == R - 1:
        time.sleep(1.5)                  # the last rank calls late
    t0 = time.monotonic()
    recv, count, handle, _, hook = buf.low_latency_dispatch(cp.asarray(xs[me]), cp.asarray(idxs[me]), M, E,
                                                            return_recv_hook=True)
    cp.cuda.get_current_stream().synchronize()
    send_s = time.monotonic() - t0
    hook()
    cp.cuda.get_current_stream().synchronize()
    ok = me == R - 1 or send_s < 0.5
    assert_all_ranks(comm, ok, f"the send half took {send_s:.3f} s while the last rank was sleeping")


def test_cuda_graph_replay(buf):
    """dispatch (FP8) + combine captured once (plain and hook mode), replayed 100 times on alternating
    inputs copied into the captured arrays; every replay checked."""
    import cupy as cp
    from deepep_cupy import reference
    R, me, M, H, E, K = buf.num_ranks, buf.rank, 64, 4096, 32, 8
    sets = []
    for seed, kind in ((800, "random"), (801, "hot")):
        xs, idxs, ws = make_inputs(seed, R, M, H, K, E, kind)
        ref = reference.low_latency_dispatch(xs, idxs, M, E, use_fp8=True)
        ref16 = reference.low_latency_dispatch(xs, idxs, M, E, use_fp8=False)
        ys = [r.recv_x for r in ref16]
        sets.append((xs[me], idxs[me], ws[me], ys[me], ref[me], reference.low_latency_combine(ys, idxs, ws, ref16)[me]))
    x_g = cp.asarray(sets[0][0])
    idx_g = cp.asarray(sets[0][1])
    w_g = cp.asarray(sets[0][2])
    y_g = cp.asarray(sets[0][3])
    problems = []
    for hook_mode in (False, True):
        stream = cp.cuda.Stream(non_blocking=True)
        with stream:
            recv, count, handle, _, hook = buf.low_latency_dispatch(x_g, idx_g, M, E, return_recv_hook=hook_mode)
            if hook:
                hook()
            stream.synchronize()      # warm-up outside the capture (JIT, allocations)
            stream.begin_capture()
            recv, count, handle, _, hook = buf.low_latency_dispatch(x_g, idx_g, M, E, return_recv_hook=hook_mode)
            if hook:
                hook()
            out, _, hook = buf.low_latency_combine(y_g, idx_g, w_g, handle, return_recv_hook=hook_mode)
            if hook:
                hook()
            graph = stream.end_capture()
        for it in range(100 if not hook_mode else 20):
            x, idx, w, y, mine, want = sets[it % 2]
            with stream:
                x_g[...] = cp.asarray(x)
                idx_g[...] = cp.asarray(idx)
                w_g[...] = cp.asarray(w)
                y_g[...] = cp.asarray(y)
                graph.launch(stream)
                stream.synchronize()
            label = f"{'hook' if hook_mode else 'plain'} replay {it}"
            problems += check_dispatch((recv, count, handle), mine, True, False, label)
            if not np.array_equal(host(out).view(np.uint16), want.view(np.uint16)):
                problems.append(f"{label}: combine differs")
            if problems:
                break
    assert_all_ranks(world(), not problems, "\n".join(problems[:6]))


def test_cumulative_local_expert_recv_stats(buf):
    """``cumulative_local_expert_recv_stats`` gains each receive's ``recv_count``, in stream order:
    eager (plain and async_finish), with the hook (nothing before ``hook()``), and in a captured
    graph (once per replay). It starts from non-zero values: an add, not an overwrite."""
    import cupy as cp
    from deepep_cupy import reference
    R, me, M, H, E, K = buf.num_ranks, buf.rank, 64, 2048, 32, 8
    xs, idxs, ws = make_inputs(900, R, M, H, K, E, "hot")
    want_count = reference.low_latency_dispatch(xs, idxs, M, E, use_fp8=False)[me].recv_count.astype(np.int64)
    start = np.arange(E // R, dtype=np.int32) * 1000 + 7
    stats = cp.asarray(start)
    x_g, idx_g = cp.asarray(xs[me]), cp.asarray(idxs[me])
    problems = []

    def expect(n, label):
        got = host(stats).astype(np.int64)
        if not np.array_equal(got, start + n * want_count):
            problems.append(f"{label}: stats {got[:6]} != start + {n} x {want_count[:6]}")

    buf.low_latency_dispatch(x_g, idx_g, M, E, use_fp8=False, cumulative_local_expert_recv_stats=stats)
    _, _, _, event, _ = buf.low_latency_dispatch(x_g, idx_g, M, E, async_finish=True,
                                                 cumulative_local_expert_recv_stats=stats)
    event.current_stream_wait()
    cp.cuda.get_current_stream().synchronize()
    expect(2, "eager, then async_finish")
    _, _, _, _, hook = buf.low_latency_dispatch(x_g, idx_g, M, E, return_recv_hook=True,
                                                cumulative_local_expert_recv_stats=stats)
    cp.cuda.get_current_stream().synchronize()
    expect(2, "sends issued, hook not called")
    hook()
    cp.cuda.get_current_stream().synchronize()
    expect(3, "after the hook")
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        buf.low_latency_dispatch(x_g, idx_g, M, E, cumulative_local_expert_recv_stats=stats)
        graph = stream.end_capture()
        for _ in range(5):
            graph.launch(stream)
        stream.synchronize()
    expect(8, "5 graph replays")
    assert_all_ranks(world(), not problems, "; ".join(problems))


def test_stress_1000_iterations_bit_identical(buf):
    """1000 dispatch (FP8) + combine rounds on the same inputs give the same bits every time."""
    import cupy as cp
    R, me, M, H, E, K = buf.num_ranks, buf.rank, 128, 7168, 64, 8
    xs, idxs, ws = make_inputs(900, R, M, H, K, E, "random")
    x_g, idx_g, w_g = cp.asarray(xs[me]), cp.asarray(idxs[me]), cp.asarray(ws[me])
    (q0, s0), c0, h0, _, _ = buf.low_latency_dispatch(x_g, idx_g, M, E)
    y = cp.where(cp.arange(R * M)[None, :, None] < c0[:, None, None], q0.view(cp.int8).astype(cp.float32) / 64,
                 0).astype(cp.dtype("bfloat16"))
    out0, _, _ = buf.low_latency_combine(y, idx_g, w_g, h0)
    valid = (cp.arange(R * M)[None, :] < c0[:, None])[..., None]
    first_q, first_s, first_out = cp.where(valid, q0, 0), cp.where(valid, s0, 0), out0.copy()
    mismatches = cp.zeros((), dtype=cp.int64)
    for _ in range(1000):
        (q, s), c, h, _, _ = buf.low_latency_dispatch(x_g, idx_g, M, E)
        out, _, _ = buf.low_latency_combine(y, idx_g, w_g, h)
        mismatches += (cp.any(cp.where(valid, q, 0) != first_q) | cp.any(cp.where(valid, s, 0) != first_s)
                       | cp.any(c != c0) | cp.any(out.view(cp.uint16) != first_out.view(cp.uint16)))
    n = int(mismatches)
    assert_all_ranks(world(), n == 0, f"{n} of 1000 iterations differ from the first")


def test_zero_copy_out_and_async_finish(buf):
    """zero_copy combine from get_next_low_latency_combine_buffer, into a given out=, with async_finish."""
    import cupy as cp
    from deepep_cupy import reference
    from deepep_cupy.errors import DeepEPInvalid
    R, me, M, H, E, K = buf.num_ranks, buf.rank, 64, 5120, 32, 6
    xs, idxs, ws, ys, want = bf16_combine_case(950, R, me, M, H, K, E)
    ref = reference.low_latency_dispatch(xs, idxs, M, E, use_fp8=False)
    idx_g = cp.asarray(idxs[me])
    recv, count, handle, event, _ = buf.low_latency_dispatch(cp.asarray(xs[me]), idx_g, M, E, use_fp8=False,
                                                             async_finish=True)
    event.current_stream_wait()
    problems = check_dispatch((recv, count, handle), ref[me], False, False, "async dispatch")
    target = buf.get_next_low_latency_combine_buffer(handle)
    target[...] = cp.asarray(ys[me])
    out = cp.empty((xs[me].shape[0], H), dtype=cp.dtype("bfloat16"))
    try:
        buf.low_latency_combine(cp.asarray(ys[me]), idx_g, cp.asarray(ws[me]), handle, zero_copy=True)
        problems.append("zero_copy accepted an array that is not the combine buffer")
    except DeepEPInvalid:
        pass
    got, event, _ = buf.low_latency_combine(target, idx_g, cp.asarray(ws[me]), handle, zero_copy=True,
                                            async_finish=True, out=out)
    event.current_stream_wait()
    if got is not out or not np.array_equal(host(out).view(np.uint16), want.view(np.uint16)):
        problems.append("zero-copy combine into out= differs")
    assert_all_ranks(world(), not problems, "\n".join(problems))


def test_bad_inputs_raise_before_launch(buf):
    """Shapes outside the supported set raise DeepEPInvalid naming the argument; the buffer still works."""
    import cupy as cp
    from deepep_cupy.errors import DeepEPInvalid
    M, E = 64, 32
    x = cp.zeros((8, 7168), dtype=cp.dtype("bfloat16"))
    idx = cp.zeros((8, 4), dtype=cp.int64)
    bad = {
        "x": lambda: buf.low_latency_dispatch(cp.zeros((8, 1000), dtype=cp.dtype("bfloat16")), idx, M, E),
        "topk_idx": lambda: buf.low_latency_dispatch(x, cp.zeros((8, 17), dtype=cp.int64), M, 64),
        "num_max_dispatch_tokens_per_rank": lambda: buf.low_latency_dispatch(x, idx, 2048, E),
        "async_finish": lambda: buf.low_latency_dispatch(x, idx, M, E, async_finish=True, return_recv_hook=True),
        "use_ue8m0": lambda: buf.low_latency_dispatch(x, idx, M, E, use_ue8m0=True),
    }
    problems = []
    for name, call in bad.items():
        try:
            call()
            problems.append(f"{name}: accepted")
        except DeepEPInvalid as e:
            if name not in str(e):
                problems.append(f"{name}: message does not name it: {e}")
    problems += run_case(buf, 960, M, 7168, E, 4, 8, "random", "fp8")
    assert_all_ranks(world(), not problems, "\n".join(problems))


@pytest.mark.parametrize("skipped", ["dispatch", "combine"])
def test_zz_missing_peer_times_out_naming_rank_and_phase(buf, skipped):
    """The last rank skips one dispatch (or one combine) that the others make: rank 0's receive gives up after
    settings.timeout_seconds and its next call raises DeepEPTimeout naming rank 0, the phase and
    the missing peer (for the combine: the first rank whose sends-done flag is still down). After
    clean_low_latency_buffer (collective) the buffer works again."""
    import cupy as cp
    import deepep_cupy as ep
    comm = world()
    R, me, M, H, E, K = buf.num_ranks, buf.rank, 64, 2048, 16, 4
    if R < 2:
        pytest.skip("needs 2 ranks")
    old = ep.settings.timeout_seconds
    ep.settings.timeout_seconds = 3.0
    xs, idxs, ws = make_inputs(990, R, M, H, K, E, "random")
    x_g, idx_g = cp.asarray(xs[me]), cp.asarray(idxs[me])
    message, waited = "", 0.0
    try:
        run_case(buf, 991, M, H, E, K, M, "random", "bf16")     # same shapes: no re-layout below
        if skipped == "combine":
            recv, _, handle, _, _ = buf.low_latency_dispatch(x_g, idx_g, M, E, use_fp8=False)
            cp.cuda.Device().synchronize()
        comm.Barrier()
        if me != R - 1:                                         # rank R-1 never joins
            t0 = time.monotonic()
            if skipped == "dispatch":
                buf.low_latency_dispatch(x_g, idx_g, M, E)
            else:
                buf.low_latency_combine(recv, idx_g, cp.asarray(ws[me]), handle)
            cp.cuda.Device().synchronize()
            waited = time.monotonic() - t0
            try:
                if me == 0:
                    buf.low_latency_dispatch(x_g, idx_g, M, E)    # the next call reports it
                else:
                    buf.check()                                 # the others consume their record
            except ep.DeepEPTimeout as e:
                message = str(e)
        comm.Barrier()
        ok = me != 0 or ("rank 0" in message and f"low-latency {skipped} receive" in message
                         and f"rank {R - 1}" in message and waited < 30)
        assert_all_ranks(comm, ok, f"expected a DeepEPTimeout naming rank 0, the {skipped} receive and rank "
                                   f"{R - 1}; got {message!r} after {waited:.1f} s")
    finally:
        ep.settings.timeout_seconds = old
        cp.cuda.Device().synchronize()
        comm.Barrier()
    buf.clean_low_latency_buffer(M, H, E)
    problems = run_case(buf, 992, M, H, E, K, M, "random", "fp8")
    assert_all_ranks(comm, not problems, "after clean: " + "\n".join(problems))
