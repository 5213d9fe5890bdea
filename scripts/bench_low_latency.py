#!/usr/bin/env python3
"""Benchmark the low-latency kernels (decode) through ``Buffer``; prints a table.

    mpirun -n 2 python scripts/bench_low_latency.py [--tokens 128 --hidden 7168 --topk 8 --experts 256]
                                                     [--force-puts] [--iters 300]

Each operation is captured in a CUDA graph (as decode runs it) and the graph launch is timed with
CUDA events, L2 flushed before each sample, median of many: this is the GPU time of the kernels,
comparable with DeepEP's kernel times (its test times the kernels with the profiler). Rows:
  * dispatch (FP8 and BF16) and combine (BF16) as whole operations;
  * the send and the receive halves (``return_recv_hook``), each in its own graph; the receive is
    timed once every rank's send has finished (a stream sync and a barrier before each sample), as
    after a GEMM long enough for the data to arrive (DeepEP's way). Until 2026-12-07 a 256 MiB
    byte fill stood in for the GEMM; under MPS the ranks then drifted apart by a fill (~1.3 ms)
    and some runs' receive medians were that fill, not the kernel;
  * the same operations called eagerly from Python (launch overhead included);
  * ``_x10``: ten operations back to back in one graph, time per operation (steady decode, L2
    flushed once per ten);
  * ``combine_bf16_r<n>``: the fused combine with n reducer warps per 16-warp block
    (``settings.ll_combine_reduce_warps``; ``--reduce-warps`` lists the values swept; 0 = every warp
    sends, then reduces);
  * ``combine_bf16_tma`` / ``_tma_send``: the combine with TMA bulk stores to NVLink peers
    (``settings.ll_combine_tma``), whole and send half;
  * NCCL all-to-all (PyTorch all_to_all_single) of the same token rows.
Also the FP8-vs-BF16 round-trip error (dispatch, dequantize, combine with weight 1, against the
input). DeepEP v1.2.1 on this machine: dispatch 28.3 us (send 19.5 + recv 8.3), combine 40.5 us
(send 32.3 + recv 9.7).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DEEPEP = {"dispatch_fp8": 28.3, "combine_bf16": 40.5, "dispatch_fp8_send": 19.5, "dispatch_fp8_recv": 8.3,
          "combine_bf16_send": 32.3, "combine_bf16_recv": 9.7}


def capture(stream, fn):
    """A CUDA graph of whatever ``fn`` launches on ``stream``."""
    with stream:
        stream.begin_capture()
        fn()
        return stream.end_capture()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--force-puts", action="store_true", help="NVSHMEM puts for every peer")
    ap.add_argument("--reduce-warps", default="0,2,8",
                    help="comma-separated reducer-warp counts of the fused combine to time besides the default")
    args = ap.parse_args()

    from mpi4py import MPI
    import cupy as cp
    import ml_dtypes
    import numpy as np
    import deepep_cupy as ep
    from deepep_cupy import reference
    from benchutil import fmt_us, nccl_all_to_all, summarize, time_calls

    comm = MPI.COMM_WORLD
    rank, R = comm.Get_rank(), comm.Get_size()
    say = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    T, H, K, E = args.tokens, args.hidden, args.topk, args.experts
    L = E // R
    hint = ep.Buffer.get_low_latency_rdma_size_hint(T, H, R, E)
    buf = ep.Buffer(comm, num_rdma_bytes=hint, low_latency_mode=True, backend="gpu",
                    allow_nvlink_for_low_latency_mode=not args.force_puts)
    ep.settings.check_values = False          # a decode loop runs without the host-side value check
    stream = cp.cuda.Stream(non_blocking=True)
    rng = np.random.default_rng(rank)
    x32 = rng.standard_normal((T, H), dtype=np.float32)
    x = cp.asarray(x32.astype(ml_dtypes.bfloat16))
    idx_host = np.argsort(rng.random((T, E)), axis=1)[:, :K].astype(np.int64)
    idx = cp.asarray(idx_host)
    w = cp.asarray(rng.random((T, K), dtype=np.float32))
    say(f"low-latency: {T} tokens/rank, hidden {H}, top-{K} of {E}, {R} ranks, "
        f"{'NVSHMEM puts' if args.force_puts else 'NVLink stores'}; buffer {hint / 2**20:.0f} MiB "
        f"(DeepEP's hint for this shape: 1908 MB at 2 ranks)")

    # bytes that cross NVLink per rank: dispatch messages to other ranks, combine rows back
    dest = np.where(idx_host >= 0, idx_host // L, -1)
    remote_tokens = sum(int((dest == r).any(axis=1).sum()) for r in range(R) if r != rank)
    remote_entries = sum(int((dest == r).sum()) for r in range(R) if r != rank)
    bytes_out = {"dispatch_fp8": remote_tokens * (H + H // 32), "dispatch_bf16": remote_tokens * 2 * H,
                 "combine_bf16": remote_entries * 2 * H}

    def send_and_settle(g_send):
        """The send half, then wait until every rank's send is done: the timed receive then finds
        its data arrived and its peers in step."""
        g_send.launch(stream)
        stream.synchronize()
        comm.Barrier()
    rows = []

    def timed(name, fn, before=None, after=None, iters=args.iters):
        comm.Barrier()
        with stream:
            rows.append((name, time_calls(fn, num_tests=iters, before=before, after=after)))
        say(f"  measured {name}")

    for fp8 in (True, False):
        name = "dispatch_fp8" if fp8 else "dispatch_bf16"
        with stream:
            recv, _, handle, _, _ = buf.low_latency_dispatch(x, idx, T, E, use_fp8=fp8)   # warm-up, JIT
            stream.synchronize()
        g_whole = capture(stream, lambda: buf.low_latency_dispatch(x, idx, T, E, use_fp8=fp8))
        hooks = []
        g_send = capture(stream, lambda: hooks.append(buf.low_latency_dispatch(x, idx, T, E, use_fp8=fp8,
                                                                               return_recv_hook=True)[4]))
        g_recv = capture(stream, lambda: hooks[-1]())
        timed(name, lambda: g_whole.launch(stream))
        timed(f"{name}_send", lambda: g_send.launch(stream), after=lambda: g_recv.launch(stream))
        timed(f"{name}_recv", lambda: g_recv.launch(stream),
              before=lambda: send_and_settle(g_send))
        with stream:
            timed(f"{name}_eager", lambda: buf.low_latency_dispatch(x, idx, T, E, use_fp8=fp8))
        g_ten = capture(stream, lambda: [buf.low_latency_dispatch(x, idx, T, E, use_fp8=fp8) for _ in range(10)])
        timed(f"{name}_x10", lambda: g_ten.launch(stream), iters=max(20, args.iters // 5))

    with stream:
        recv, _, handle, _, _ = buf.low_latency_dispatch(x, idx, T, E, use_fp8=False)
        buf.low_latency_combine(recv, idx, w, handle)
        stream.synchronize()
    g_whole = capture(stream, lambda: buf.low_latency_combine(recv, idx, w, handle))
    hooks = []
    g_send = capture(stream, lambda: hooks.append(buf.low_latency_combine(recv, idx, w, handle,
                                                                          return_recv_hook=True)[2]))
    g_recv = capture(stream, lambda: hooks[-1]())
    timed("combine_bf16", lambda: g_whole.launch(stream))
    timed("combine_bf16_send", lambda: g_send.launch(stream), after=lambda: g_recv.launch(stream))
    timed("combine_bf16_recv", lambda: g_recv.launch(stream), before=lambda: send_and_settle(g_send))
    with stream:
        timed("combine_bf16_eager", lambda: buf.low_latency_combine(recv, idx, w, handle))
    g_ten = capture(stream, lambda: [buf.low_latency_combine(recv, idx, w, handle) for _ in range(10)])
    timed("combine_bf16_x10", lambda: g_ten.launch(stream), iters=max(20, args.iters // 5))
    default_split = ep.settings.ll_combine_reduce_warps
    for n in (int(v) for v in args.reduce_warps.split(",") if v.strip()):
        ep.settings.ll_combine_reduce_warps = n      # read when the launch is captured
        g_split = capture(stream, lambda: buf.low_latency_combine(recv, idx, w, handle))
        timed(f"combine_bf16_r{n}", lambda: g_split.launch(stream))
    ep.settings.ll_combine_reduce_warps = default_split
    if not args.force_puts:     # TMA bulk stores to NVLink peers (an experiment; settings.ll_combine_tma)
        ep.settings.ll_combine_tma = True
        g_tma = capture(stream, lambda: buf.low_latency_combine(recv, idx, w, handle))
        g_tma_send = capture(stream, lambda: hooks.append(buf.low_latency_combine(recv, idx, w, handle,
                                                                                  return_recv_hook=True)[2]))
        g_tma_recv = capture(stream, lambda: hooks[-1]())
        ep.settings.ll_combine_tma = False
        timed("combine_bf16_tma", lambda: g_tma.launch(stream))
        timed("combine_bf16_tma_send", lambda: g_tma_send.launch(stream), after=lambda: g_tma_recv.launch(stream))

    # FP8 vs BF16 round trip: dispatch, experts return their (dequantized) input, combine with weight 1
    errors = {}
    ones = cp.ones((T, K), dtype=cp.float32)
    ref = x32 * (idx_host >= 0).sum(axis=1, keepdims=True)
    for fp8 in (True, False):
        with stream:
            got, _, h, _, _ = buf.low_latency_dispatch(x, idx, T, E, use_fp8=fp8)
            if fp8:
                q = cp.asnumpy(got[0]).view(ml_dtypes.float8_e4m3fn)
                got = cp.asarray(reference.fp8_to_float(q, cp.asnumpy(got[1])).astype(ml_dtypes.bfloat16))
            out, _, _ = buf.low_latency_combine(got, idx, ones, h)
            out = cp.asnumpy(out).astype(np.float32)
        errors["fp8" if fp8 else "bf16"] = float(np.abs(out - ref).max() / np.abs(ref).max())

    nccl_rows = []
    try:   # the same token rows (bf16) moved by NCCL
        in_rank = np.zeros((T, R), dtype=bool)
        for r in range(R):
            in_rank[:, r] = (dest == r).any(axis=1)
        nccl_rows = nccl_all_to_all(comm, in_rank, H, args.iters)
    except Exception as e:  # noqa: BLE001 - report and carry on
        say(f"NCCL comparison skipped: {type(e).__name__}: {e}")

    say("")
    say(f"{'op (CUDA graph unless eager)':30s} {'median (p10-p90)':34s} {'vs DeepEP':>10} {'NVLink GB/s':>12}")
    rows = [(n, [v / 10 for v in smp]) if n.endswith("_x10") else (n, smp) for n, smp in rows]
    for name, samples in rows:
        med = summarize(samples)[0]
        base = DEEPEP.get(name)
        ratio = f"{med / base:.2f}x" if base else ""
        whole_combine = name.startswith(("combine_bf16_r", "combine_bf16_tma")) and not name.endswith("_send")
        nbytes = bytes_out["combine_bf16"] if whole_combine else bytes_out.get(name)
        gbps = f"{nbytes / med / 1e3:.1f}" if nbytes else ""
        say(f"{name:30s} {fmt_us(samples):34s} {ratio:>10} {gbps:>12}")
    for name, samples, gbps in nccl_rows:
        say(f"{name:30s} {fmt_us(samples):34s} {'':>10} {gbps:>12.1f}")
    say(f"round-trip max error relative to max |x|: fp8 {errors['fp8']:.3e}, bf16 {errors['bf16']:.3e}")
    say("")
    say("SUMMARY bench_low_latency (DeepEP v1.2.1: dispatch 28.3 us, combine 40.5 us; goal 20 / 28 us; "
        f"combine_bf16 is r={default_split})")
    for name, samples in rows:
        if name in ("dispatch_fp8", "combine_bf16", "dispatch_fp8_send", "dispatch_fp8_recv") or \
                name.startswith("combine_bf16_r") or name.startswith("combine_bf16_tma"):
            say(f"  {name:20s} {summarize(samples)[0]:8.1f} us")
    buf.destroy()


if __name__ == "__main__":
    main()
