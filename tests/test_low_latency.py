#!/usr/bin/env python3
"""DeepEP's tests/test_low_latency.py for deepep_cupy: low-latency (decode) dispatch and combine.

    python tests/test_low_latency.py [--num-processes 2] [--num-tokens 128 --hidden 7168
                                      --num-topk 8 --num-experts 288] [--disable-nvlink]
    mpirun -n 2 python tests/test_low_latency.py

Every rank dispatches ``--num-tokens`` tokens (also ``num_max_dispatch_tokens_per_rank``, as in
DeepEP's test) with ten top-k slots masked to -1, in every mode (BF16; FP8; FP8 with
``round_scale``; FP8 with packed UE8M0 scales), with and without the receive hook, and checks, bit for
bit against ``deepep_cupy.reference``: the received rows and scales of each local expert, the
counts, the handle's source indices and layout ranges (and, where the handle has DeepEP's tuple view,
DeepEP's own invariants read through ``handle[0]`` / ``handle[1]``); then the weighted combine of the
dequantized rows (as DeepEP's "simulated GEMM"), into ``out=``, with and without ``zero_copy``.
Then rank 0 prints DeepEP's figures: dispatch + combine, dispatch and combine alone (FP8 dispatch,
BF16 combine) with their bandwidth (DeepEP's byte counts: per valid top-k selection, FP8
hidden + hidden / 128 * 4 + 16 bytes, BF16 2 * hidden), and the send / receive halves with the hook.
``--disable-nvlink`` sends everything through NVSHMEM puts (DeepEP's flag). Exit status 1 on any
mismatch on any rank.

Under pytest: the same logic on one rank and under ``mpiexec -n 2`` (the shared launch of
tests/seed_scripts.py) on the reference backend, and a DeepEP v1 snippet that indexes the handle as
DeepEP's tuple, run unchanged.
"""

import sys

import seed_scripts as ss

SMALL = ["--num-tokens", "24", "--hidden", "256", "--num-topk", "4", "--num-experts", "16", "--num-tests", "2"]
MODES = (("BF16", False, False, False), ("FP8", True, False, False), ("FP8 round_scale", True, True, False),
         ("FP8 UE8M0", True, True, True))
INT_MASK = (1 << 32) - 1


def build_parser():
    ap = ss.parser("Test low-latency EP kernels (deepep_cupy's take on DeepEP's tests/test_low_latency.py)",
                   num_tokens=128, hidden=7168, num_topk=8, num_experts=288,
                   tokens_help="tokens per rank, also num_max_dispatch_tokens_per_rank")
    ap.add_argument("--disable-nvlink", action="store_true",
                    help="NVSHMEM puts for every peer, NVLink peers included (allow_nvlink_for_low_latency_mode=False)")
    return ap


def has_tuple_view(handle) -> bool:
    """Whether the handle is indexable as DeepEP's 5-tuple (the GPU's is; the reference's soon)."""
    return hasattr(type(handle), "__getitem__")


def deepep_v1_handle_checks(packed_recv_count, handle, all_topk_idx, rank, num_ranks, num_local_experts,
                            num_max_dispatch_tokens_per_rank, hidden, num_experts):
    """DeepEP v1's checks of a low-latency dispatch, written against its tuple handle: ``handle[0]``
    the source token of each slot, ``handle[1]`` the packed ``(begin << 32) | count`` per source,
    ``handle[2:]`` M, hidden, num_experts. Arrays may be numpy or CuPy. Returns problems."""
    problems = []
    src_info, layout_range, m, h, e = handle            # unpacks like DeepEP's tuple
    if (len(handle), m, h, e) != (5, num_max_dispatch_tokens_per_rank, hidden, num_experts):
        problems.append(f"handle[2:] = {(m, h, e)}, expected {(num_max_dispatch_tokens_per_rank, hidden, num_experts)}")
    for i in range(num_local_experts):
        expert_id = rank * num_local_experts + i
        recv_count, recv_src_info, recv_layout_range = packed_recv_count[i], handle[0][i], handle[1][i]
        num_valid_tokens = int(recv_count.item())
        if num_valid_tokens != int((recv_layout_range & INT_MASK).sum().item()):
            problems.append(f"expert {expert_id}: recv_count {num_valid_tokens} != the layout ranges' counts")
        if num_valid_tokens != int((all_topk_idx == expert_id).sum()):
            problems.append(f"expert {expert_id}: recv_count {num_valid_tokens} != its top-k selections")
        for j in range(num_ranks):
            begin, count = int((recv_layout_range[j] >> 32).item()), int((recv_layout_range[j] & INT_MASK).item())
            if count != int((all_topk_idx[j] == expert_id).sum()):
                problems.append(f"expert {expert_id}: {count} entries from rank {j}, expected "
                                f"{int((all_topk_idx[j] == expert_id).sum())}")
            elif count and int(recv_src_info[begin:begin + count].max().item()) >= all_topk_idx.shape[1]:
                problems.append(f"expert {expert_id}: a source index from rank {j} is out of range")
    return problems


def run(args, ctx) -> list:
    import numpy as np
    import deepep_cupy as ep
    from deepep_cupy import reference
    R, me, M, H, K = ctx.num_ranks, ctx.rank, args.num_tokens, args.hidden, args.num_topk
    E = ctx.experts(args.num_experts)
    ctx.say(f"[config] num_tokens={M} (num_max_dispatch_tokens_per_rank), hidden={H}, num_topk={K}, "
            f"num_experts={E}, ranks={R}, backend={ctx.backend}")
    hint = ep.Buffer.get_low_latency_rdma_size_hint(M, H, R, E)
    ctx.say(f"[config] buffer: {hint / 1e6:.1f} MB per rank (Buffer.get_low_latency_rdma_size_hint)")
    buf = ep.Buffer(ctx.comm, num_rdma_bytes=hint, low_latency_mode=True, backend=ctx.backend,
                    allow_nvlink_for_low_latency_mode=not args.disable_nvlink)
    try:
        xs, idxs, ws = ss.ll_inputs(args.seed, R, M, H, K, E)
        x, idx, w = ctx.dev(xs[me]), ctx.dev(idxs[me]), ctx.dev(ws[me])
        all_topk_idx = np.stack(idxs)
        problems = []
        tuple_checked = False
        stats = ctx.dev(np.zeros(E // R, np.int32))   # DeepEP's cumulative_local_expert_recv_stats
        want_stats, num_dispatches = np.zeros(E // R, np.int64), 0
        for label, use_fp8, round_scale, ue8m0 in MODES:
            mine, want = ss.ll_reference(xs, idxs, ws, me, M, E, use_fp8, round_scale, ue8m0)
            y_mine = ss.simulated_gemm(mine)
            for hook_mode in (False, True):
                tag = f"{label}, {'with' if hook_mode else 'without'} the receive hook"
                found = []
                recv, count, handle, event, hook = buf.low_latency_dispatch(
                    x, idx, M, E, use_fp8=use_fp8, round_scale=round_scale, use_ue8m0=ue8m0,
                    async_finish=not hook_mode, return_recv_hook=hook_mode,
                    cumulative_local_expert_recv_stats=stats)
                hook() if hook_mode else event.current_stream_wait()
                want_stats += mine.recv_count
                num_dispatches += 1
                found += ss.ll_dispatch_problems(ctx, tag, (recv, count, handle), mine, use_fp8)
                if has_tuple_view(handle):
                    tuple_checked = True
                    found += [f"{tag}: DeepEP handle check: {p}" for p in deepep_v1_handle_checks(
                        count, handle, ctx.dev(all_topk_idx) if ctx.gpu else all_topk_idx, me, R, E // R, M, H, E)]
                for zero_copy in (False, True):
                    y = ctx.dev(y_mine)
                    if zero_copy:
                        target = buf.get_next_low_latency_combine_buffer(handle)
                        target[...] = y
                        y = target
                    out = ctx.dev(np.empty((M, H), reference.BF16))
                    combined, event, hook = buf.low_latency_combine(y, idx, w, handle, zero_copy=zero_copy,
                                                                    async_finish=not hook_mode,
                                                                    return_recv_hook=hook_mode, out=out)
                    hook() if hook_mode else event.current_stream_wait()
                    if combined is not out:
                        found.append(f"{tag}: combine did not return out=")
                    if not ss.same_bits(ctx.host(combined), want):
                        found.append(f"{tag}: combine (zero_copy={zero_copy}) differs from the reference")
                problems += found
                checks = "dispatch (and DeepEP's handle[0] / handle[1] checks)" if has_tuple_view(handle) else "dispatch"
                ctx.say(f"[testing] {tag}: {checks}, combine (zero_copy False/True) ... "
                        f"{'passed' if not found else 'FAILED'}")
        got_stats = ctx.host(stats).astype(np.int64)
        stats_ok = np.array_equal(got_stats, want_stats)
        if not stats_ok:
            problems.append(f"cumulative_local_expert_recv_stats {got_stats[:6]} != the sum of {num_dispatches} "
                            f"reference recv_count {want_stats[:6]}")
        ctx.say(f"[testing] cumulative_local_expert_recv_stats after {num_dispatches} dispatches ... "
                f"{'passed' if stats_ok else 'FAILED'}")
        if not tuple_checked:
            ctx.say("[testing] DeepEP's handle[0] / handle[1] checks skipped: this backend's handle has no "
                    "tuple view yet")
        ctx.say("")

        # timing, as DeepEP's test_func: FP8 dispatch, then combine of the simulated GEMM output
        y = ctx.dev(ss.simulated_gemm(ss.ll_reference(xs, idxs, ws, me, M, E)[0]))
        selections = int((idxs[me] >= 0).sum())
        dispatch_bytes = selections * (H + H / 128 * 4 + 16)
        combine_bytes = selections * H * 2
        latest = {}

        def dispatch():
            latest["handle"] = buf.low_latency_dispatch(x, idx, M, E, use_fp8=True)[2]

        def step():
            dispatch()
            buf.low_latency_combine(y, idx, w, latest["handle"])

        pending = []

        def dispatch_send():
            pending.append(buf.low_latency_dispatch(x, idx, M, E, use_fp8=True, return_recv_hook=True)[4])

        def combine_send():
            pending.append(buf.low_latency_combine(y, idx, w, latest["handle"], return_recv_hook=True)[2])

        receive = lambda: pending.pop()()
        # (name, timed call, untimed before / after it, bytes); a combine uses the latest dispatch's handle
        ops = [
            ("dispatch + combine", step, None, None, dispatch_bytes + combine_bytes),
            ("dispatch FP8", dispatch, None, None, dispatch_bytes),
            ("combine BF16", lambda: buf.low_latency_combine(y, idx, w, latest["handle"]), None, None, combine_bytes),
            ("dispatch send (hook)", dispatch_send, None, receive, None),
            ("dispatch recv (hook)", receive, dispatch_send, None, None),
            ("combine send (hook)", combine_send, dispatch, receive, None),
            ("combine recv (hook)", receive, lambda: (dispatch(), combine_send()), None, None),
        ]
        rows = []
        for name, fn, before, after, nbytes in ops:
            avg, lo, hi = ss.avg_min_max(ss.bench(ctx, fn, before=before, after=after))
            rows.append((name, avg, lo, hi, "" if nbytes is None else ss.gbps(nbytes, avg)))
        ctx.say(f"[timing] {ss.backend_note(ctx)}; rank 0: {selections} top-k selections; "
                f"{ctx.num_tests} calls each")
        ss.table(ctx, ("op", "avg us", "min us", "max us", "GB/s"), rows)
        t = {name: avg for name, avg, *_ in rows}
        ctx.say(f"[rank 0] Dispatch send/recv time: {t['dispatch send (hook)']:.2f} + {t['dispatch recv (hook)']:.2f} us"
                f" | Combine send/recv time: {t['combine send (hook)']:.2f} + {t['combine recv (hook)']:.2f} us")
        ctx.say("")
        return problems
    finally:
        buf.destroy()


def test_low_latency_in_process():
    """The script's checks on one rank (MPI.COMM_SELF), reference backend, small sizes."""
    ss.run_in_process(sys.modules[__name__])


@ss.mark.mpi
@ss.mark.mpi_session(2)
def test_low_latency_under_mpiexec():
    """The script's small case on 2 ranks, in the shared mpiexec launch of tests/seed_scripts.py."""
    ss.check_under_mpiexec("test_low_latency")


def test_deepep_v1_handle_indexing_runs_unchanged():
    """A DeepEP v1 snippet that reads the low-latency handle as its tuple (``handle[0]`` source info,
    ``handle[1]`` layout ranges, unpacking into five) runs unchanged on the reference backend."""
    import numpy as np
    from mpi4py import MPI
    import deepep_cupy as ep
    M, H, K, E = 16, 256, 4, 8
    xs, idxs, _ = ss.ll_inputs(3, 1, M, H, K, E)
    buf = ep.Buffer(MPI.COMM_SELF, backend="reference")
    try:
        packed_recv_x, packed_recv_count, handle, event, hook = buf.low_latency_dispatch(
            xs[0], idxs[0], M, E, use_fp8=False)
        try:
            problems = deepep_v1_handle_checks(packed_recv_count, handle, np.stack(idxs), 0, 1, E, M, H, E)
        except TypeError as e:
            if not has_tuple_view(handle):
                ss.pytest.xfail(f"the reference backend's {type(handle).__name__} has no DeepEP tuple view yet "
                                f"(handle[0], handle[1], unpacking; the GPU's LowLatencyHandle has it): {e}")
            raise
        assert not problems, "\n".join(problems)
    finally:
        buf.destroy()


if __name__ == "__main__":
    sys.exit(ss.script_main(sys.modules[__name__]))
