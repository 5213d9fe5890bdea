"""GPU tier: high-throughput dispatch and combine inside one node against the numpy reference.

Every rank builds every rank's inputs from a shared seed, so each can compute the reference result
for itself. Dispatch must be bit-exact (data, scales, expert ids, weights, counts, source indices);
combine follows the reference's float32 order (biases, then ranks ascending), so it is bit-exact too.
"""

import itertools

import ml_dtypes
import numpy as np
import pytest

from dispatch_cases import (async_problems, graph_replay_problems, host, make_inputs, rank_mask_problems, run_case,
                            stress_mismatches, to_gpu)
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
# hidden 9216: 72 scale words a row, past the 64 the direct kernel loads ahead of the row's data
@pytest.mark.parametrize("tokens,hidden", [(129, 2048), (4096, 7168), (1, 5120), (129, 9216)])
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
    problems = graph_replay_problems(buf, 100)
    assert_all_ranks(world(), not problems, "\n".join(problems))


def test_stress_1000_iterations_bit_identical(buf):
    mismatches = stress_mismatches(buf, 1000)
    assert_all_ranks(world(), mismatches == 0, f"{mismatches} snapshots differ from the first")


@pytest.mark.parametrize("allocate_on_comm_stream", [True, False])
def test_async_events_and_previous_event(buf, allocate_on_comm_stream):
    problems = async_problems(buf, allocate_on_comm_stream)
    assert_all_ranks(world(), not problems, "; ".join(problems))


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
    problems = rank_mask_problems(buf)
    assert_all_ranks(world(), not problems, "; ".join(problems))


@pytest.fixture
def dispatch_kernel(request):
    """settings.intranode_dispatch (and intranode_copy: "direct-<path>" is the direct kernel with
    intranode_copy = <path>, e.g. "direct-tma" TMA bulk copies over block ranges, "direct" its
    default register copies; a "+notify-kernel" suffix sets intranode_notify = "kernel", the notify
    kernel before the data kernel instead of the fused exchange) for one test, restored afterwards."""
    import deepep_cupy as ep
    old = ep.settings.intranode_dispatch, ep.settings.intranode_copy, ep.settings.intranode_notify
    kind, _, notify = request.param.partition("+notify-")
    ep.settings.intranode_dispatch = "direct" if kind.startswith("direct") else kind
    ep.settings.intranode_copy = kind.removeprefix("direct-") if kind.startswith("direct-") else "registers"
    ep.settings.intranode_notify = notify or "fused"
    yield request.param
    ep.settings.intranode_dispatch, ep.settings.intranode_copy, ep.settings.intranode_notify = old


def expects_fused(dispatch_kernel: str) -> bool:
    """Whether a fresh dispatch under the ``dispatch_kernel`` fixture's setting exchanges its counts
    inside the data kernel: the direct kernel's register paths with the default notify mode."""
    return dispatch_kernel in ("direct", "direct-registers8")


@pytest.mark.parametrize("dispatch_kernel,arena_full_on", [("staged", None), ("direct", None), ("direct", 0),
                                                           ("direct", "all"), ("direct+notify-kernel", None),
                                                           ("direct+notify-kernel", 0), ("direct-tma", None),
                                                           ("direct-tma", 0), ("direct-tma-grid", None),
                                                           ("direct-tma-grid", 0), ("direct-registers8", None)],
                         indirect=["dispatch_kernel"], ids=["staged", "direct", "direct-rank0-arena-full",
                                                            "direct-all-arenas-full", "direct-notify-kernel",
                                                            "direct-notify-kernel-rank0-arena-full", "direct-tma",
                                                            "direct-tma-rank0-arena-full", "direct-tma-grid",
                                                            "direct-tma-grid-rank0-arena-full", "direct-registers8"])
@pytest.mark.parametrize("tokens,hidden,kind,fp8", [(4096, 7168, "random", False), (129, 2048, "hot", False),
                                                    (1000, 4096, "rank0_only", True), (0, 2048, "random", False),
                                                    (129, 9216, "random", True)])   # 72 scale words a row
def test_dispatch_kernels_and_receive_modes(buf, dispatch_kernel, arena_full_on, tokens, hidden, kind, fp8):
    """The staged kernel, and the direct kernel (register copies, and TMA copies; the fresh
    dispatch with the fused count exchange, and with the notify kernel) with every receiver direct,
    with rank 0 staged (its arena held full, the others direct: the modes mix within one operation)
    and with every receiver staged: all bit-exact against the reference (dispatch, combine, cached
    dispatch)."""
    kernels = buf._backend.intranode()
    row = hidden * (1 if fp8 else 2)   # the launched rows' bytes
    plan = kernels._copy_plan(row)
    producers, stages, smem, split = plan.producers, plan.stages, plan.smem, plan.split
    if dispatch_kernel in ("direct", "direct-registers8", "direct+notify-kernel"):
        assert (producers, stages, smem, split) == (0, 0, 0, 0)
    elif dispatch_kernel.startswith("direct-tma"):   # every size here takes the TMA path
        assert producers > 0 and stages >= 4 and smem == producers * stages * row, (producers, stages)
        assert split == (dispatch_kernel == "direct-tma-grid"), split
    hold = None
    if arena_full_on == "all" or arena_full_on == buf.rank:   # the caller "keeps" the whole arena
        hold = []
        while kernels.arena.largest_free:
            hold.append(kernels.arena.alloc(kernels.arena.largest_free))
    try:
        seed = 4000 + tokens + hidden + (0 if arena_full_on is None else 7)
        problems = run_case(buf, seed, tokens, hidden, 8, 256, kind, fp8=fp8, with_weights=True,
                            use_cached=not fp8, alignment=1)
        want_direct = dispatch_kernel.startswith("direct") and hold is None
        want_fused = expects_fused(dispatch_kernel)
        if kernels.last_dispatch_direct != want_direct:
            problems.append(f"rank {buf.rank}: last dispatch direct={kernels.last_dispatch_direct}, "
                            f"expected {want_direct}")
        # the fresh dispatch queued its data kernel before the host's poll when its receiver was
        # direct, and always with the fused exchange (a full arena: outputs in ordinary memory)
        if kernels.last_dispatch_ahead != (want_direct or want_fused):
            problems.append(f"rank {buf.rank}: last fresh dispatch queued ahead of the poll="
                            f"{kernels.last_dispatch_ahead}, expected {want_direct or want_fused}")
        if kernels.last_dispatch_fused != want_fused:
            problems.append(f"rank {buf.rank}: last fresh dispatch fused={kernels.last_dispatch_fused}, "
                            f"expected {want_fused}")
    finally:
        del hold
    assert_all_ranks(world(), not problems, "\n".join(problems[:6]))


@pytest.mark.parametrize("dispatch_kernel", ["direct-tma", "direct-tma-grid"], indirect=True)
@pytest.mark.parametrize("tokens,num_sms,hidden,fp8", [(7, 24, 6144, False), (33, 4, 2048, True),
                                                       (129, 6, 6144, False), (700, 34, 2048, False),
                                                       (4096, 24, 2048, True), (4096, 24, 6144, False)],
                         ids=["7-tokens-24-blocks-P2", "33-tokens-4-blocks-P4", "129-tokens-6-blocks-P2",
                              "700-tokens-34-blocks-P4", "4096-tokens-24-blocks-P4", "4096-tokens-24-blocks-P2"])
def test_tma_block_ranges(buf, dispatch_kernel, tokens, num_sms, hidden, fp8):
    """The TMA path's splits: block ranges [b T / G, (b+1) T / G), whose chunks cut by a range boundary
    are written by several blocks and published by the last to arrive, and the grid stride (groups
    of P tokens dealt to the blocks in turn: every chunk written by many blocks). Fewer tokens than
    blocks (empty ranges between the writers of one chunk), a chunk split over many blocks, ranges
    that do not fall on chunk boundaries, a last group short of a producer (129 and 33 tokens), and
    blocks with more local chunks than shared-memory slots (4096 tokens), with 2 producers a block
    (12 KiB rows) and 4 (2 KiB rows): bit-exact, twice in a row (the arrival counters carry over,
    tagged by the operation), and the path the test names is the one that ran."""
    import deepep_cupy as ep
    kernels = buf._backend.intranode()
    row = hidden * (1 if fp8 else 2)
    plan = kernels._copy_plan(row)
    producers, split = plan.producers, plan.split
    problems = []
    if producers != (2 if row > 8192 else 4) or split != (dispatch_kernel == "direct-tma-grid"):
        problems.append(f"rank {buf.rank}: copy plan for {row}-byte rows: {producers} producers, split {split}")
    for rep in range(2):
        problems += run_case(buf, 4100 + tokens + num_sms + hidden + rep, tokens, hidden, 8, 64, "random", fp8=fp8,
                             with_weights=True, use_cached=not fp8, config=ep.Config(num_sms=num_sms))
        if not kernels.last_dispatch_direct:
            problems.append(f"rank {buf.rank}: the dispatch did not take the direct kernel")
    assert_all_ranks(world(), not problems, "\n".join(problems[:6]))


@pytest.mark.parametrize("tokens,num_sms,hidden,fp8", [(4500, 2, 2048, False), (8300, 4, 2048, True),
                                                       (33, 24, 4096, False), (1, 2, 2048, True)],
                         ids=["4500-tokens-2-blocks", "8300-tokens-4-blocks-fp8", "33-tokens-24-blocks",
                              "1-token-2-blocks-fp8"])
def test_fused_exchange_windows(buf, tokens, num_sms, hidden, fp8):
    """The fused count exchange derives each block's send positions a window of 64 own chunks at a
    time: blocks with more than one window (4500 tokens over 2 blocks: 71 chunks for block 0; 8300
    over 4: 65), blocks with no chunk at all (33 tokens over 24 blocks, 1 over 2): bit-exact against
    the reference (dispatch, combine, cached dispatch reusing the send positions the kernel wrote),
    twice in a row (the entries alternate by parity), with the fused kernel the one that ran."""
    import deepep_cupy as ep
    kernels = buf._backend.intranode()
    problems = []
    for rep in range(2):
        problems += run_case(buf, 4300 + tokens + num_sms + rep, tokens, hidden, 8, 64, "random", fp8=fp8,
                             with_weights=True, use_cached=not fp8, config=ep.Config(num_sms=num_sms))
        if not (kernels.last_dispatch_fused and kernels.last_dispatch_ahead):
            problems.append(f"rank {buf.rank}: fused={kernels.last_dispatch_fused}, "
                            f"ahead={kernels.last_dispatch_ahead}: not the fused kernel")
    assert_all_ranks(world(), not problems, "\n".join(problems[:6]))


def test_receive_arena_blocks_return_when_arrays_die(buf):
    """recv_x from the arena is freed when the caller drops it, so a loop that drops its outputs
    keeps taking the one-copy path; a kept output stays valid while later dispatches run."""
    import gc
    kernels = buf._backend.intranode()
    free0 = kernels.arena.free_bytes
    R, me = buf.num_ranks, buf.rank
    xs, _, idxs, _ = make_inputs(77, R, 512, 2048, 8, 256, "random", False, False)
    idx_g = to_gpu(idxs[me])
    layout = buf.get_dispatch_layout(idx_g, 256)
    kw = dict(topk_idx=idx_g, num_tokens_per_rank=layout[0], is_token_in_rank=layout[3],
              num_tokens_per_expert=layout[2])
    kept = buf.dispatch(to_gpu(xs[me]), **kw)[0]
    kept_host = host(kept).copy()
    directs, aheads = [], []
    for _ in range(5):
        out = buf.dispatch(to_gpu(xs[me]), **kw)
        directs.append(kernels.last_dispatch_direct)
        aheads.append(kernels.last_dispatch_ahead)   # the data kernel queued before the host's poll
        del out
    gc.collect()
    ok = all(directs) and all(aheads) and np.array_equal(host(kept).view(np.uint16), kept_host.view(np.uint16))
    del kept
    gc.collect()
    ok = ok and kernels.arena.free_bytes == free0
    assert_all_ranks(world(), ok, f"direct each time: {directs}; queued ahead of the poll: {aheads}; arena free "
                                  f"{kernels.arena.free_bytes} vs {free0} at the start")


@pytest.mark.parametrize("with_weights", [True, False], ids=["weights", "no-weights"])
@pytest.mark.parametrize("tokens,hidden,kind", [(4096, 7168, "random"), (129, 2048, "hot")])
@pytest.mark.parametrize("combine_mode", ["pull", "push", "mixed"])
def test_combine_pull_push_modes(buf, combine_mode, tokens, hidden, kind, with_weights):
    """Combine of the direct dispatch's own outputs: x (and the weights) in the receive arena, so
    peers read the rows in place (pull); x copied to ordinary memory, so this rank pushes them into
    the peers' staging (push); rank 0 pushing while the others pull (mixed). Bit-exact against the
    reference, and the mode each rank took is the expected one. Twice, the first outputs dropped
    before the second dispatch, so the second reuses the arena blocks the first combine's peers read."""
    import gc
    import cupy as cp
    from deepep_cupy import reference
    kernels = buf._backend.intranode()
    R, me, K, E = buf.num_ranks, buf.rank, 8, 256
    push = combine_mode == "push" or (combine_mode == "mixed" and me == 0)
    problems = []
    for it in range(2):
        gc.collect()
        seed = 6000 + tokens + hidden + 2 * it + (1 if with_weights else 0)
        xs, _, idxs, ws = make_inputs(seed, R, tokens, hidden, K, E, kind, False, with_weights)
        tag = f"{combine_mode} T={tokens} H={hidden} {kind} w={with_weights} it={it} rank {me}"
        idx_g = to_gpu(idxs[me])
        w_g = to_gpu(ws[me]) if with_weights else None
        per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx_g, E)
        recv_x, _, recv_w, _, handle, _ = buf.dispatch(to_gpu(xs[me]), topk_idx=idx_g, topk_weights=w_g,
                                                       num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                                       num_tokens_per_expert=per_expert)
        if not kernels.last_dispatch_direct:
            problems.append(f"{tag}: the dispatch did not write the arena")
        x_in = cp.array(recv_x) if push else recv_x
        got, got_w, _ = buf.combine(x_in, handle, topk_weights=recv_w if with_weights else None)
        if kernels.last_combine_pull != (not push):
            problems.append(f"{tag}: combine pull={kernels.last_combine_pull}, expected {not push}")
        res = reference.dispatch(xs, idxs, ws, E)
        want, want_w = reference.combine([r.recv_x for r in res], res,
                                         topk_weights=[r.recv_topk_weights for r in res] if with_weights else None)[me]
        if not np.array_equal(host(got).view(np.uint16), want.view(np.uint16)):
            diff = np.abs(host(got).astype(np.float32) - want.astype(np.float32)).max() if want.size else 0
            problems.append(f"{tag}: combine differs (max abs {diff})")
        if with_weights and not np.array_equal(host(got_w), want_w):
            problems.append(f"{tag}: combined weights differ")
        if not with_weights and got_w is not None:
            problems.append(f"{tag}: combined weights returned without weights")
        del recv_x, recv_w, x_in, got, got_w, handle
    assert_all_ranks(world(), not problems, "\n".join(problems[:6]))


def test_num_experts_changing_between_calls_keeps_notify_seq_apart():
    """The host polls the notify's sequence word. It used to sit right after the receive layout, so
    its position moved with the local expert count, and a call with fewer experts than the last one
    polled where the last call had left per-expert counts. Here the first call (16 local experts)
    leaves counts {s + 2, 0} exactly where the old code put the second call's (8 local experts)
    seq word, s + 2: the old poll saw no change and timed out. Both calls must finish and count right."""
    import cupy as cp
    import deepep_cupy as ep
    comm = world()
    R = comm.Get_size()
    old = ep.settings.timeout_seconds
    ep.settings.timeout_seconds = 3.0
    b = ep.Buffer(comm, num_nvl_bytes=ep.Buffer.get_intranode_size_hint(256, 2048, R), backend="gpu")
    try:
        kernels = b._backend.intranode()
        s0 = int(kernels.seq.get()[0])
        big_local, small_local = 16, 8
        a = small_local + 1             # the old seq word for 8 local experts: counts of local experts 9, 10
        need = s0 + 2                   # the second call's seq
        per_rank = [need // R + (1 if s < need % R else 0) for s in range(R)]
        assert max(per_rank) <= 256, f"seq {s0} too large for this test's buffer"
        T = max(per_rank)
        problems = []
        # call 1: rank s's first per_rank[s] tokens go to local expert `a` of every rank (one top-k slot per rank)
        idx = np.full((T, R), -1, dtype=np.int64)
        idx[:per_rank[b.rank]] = np.arange(R) * big_local + a
        x = to_gpu(np.ones((T, 2048), BF16))
        idx_g = to_gpu(idx)
        layout = b.get_dispatch_layout(idx_g, R * big_local)
        recv_x, _, _, counts, _, _ = b.dispatch(x, topk_idx=idx_g, num_tokens_per_rank=layout[0],
                                                is_token_in_rank=layout[3], num_tokens_per_expert=layout[2])
        expect = [0] * big_local
        expect[a] = need
        if list(counts) != expect:
            problems.append(f"call 1 per-expert counts {list(counts)} != {expect}")
        if int(kernels.seq.get()[0]) != s0 + 1:
            problems.append(f"call 1 moved seq from {s0} to {int(kernels.seq.get()[0])}, expected one step")
        # call 2: fewer local experts; every token to local expert 0 of rank 0
        idx2 = np.full((T, 1), -1, dtype=np.int64)
        idx2[:per_rank[b.rank], 0] = 0
        idx2_g = to_gpu(idx2)
        layout2 = b.get_dispatch_layout(idx2_g, R * small_local)
        recv_x2, _, _, counts2, _, _ = b.dispatch(x, topk_idx=idx2_g, num_tokens_per_rank=layout2[0],
                                                  is_token_in_rank=layout2[3], num_tokens_per_expert=layout2[2])
        expect2 = [need if b.rank == 0 else 0] + [0] * (small_local - 1)
        if list(counts2) != expect2 or recv_x2.shape[0] != (need if b.rank == 0 else 0):
            problems.append(f"call 2 counts {list(counts2)} rows {recv_x2.shape[0]}, expected {expect2}")
        cp.cuda.Device().synchronize()
        kernels.check_errors("num_experts change")
        assert_all_ranks(comm, not problems, "; ".join(problems))
    finally:
        ep.settings.timeout_seconds = old
        comm.Barrier()
        b.destroy()
