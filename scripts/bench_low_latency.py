#!/usr/bin/env python3
"""Benchmark the low-latency kernels (decode); prints a table.

    mpirun -n 2 python scripts/bench_low_latency.py [--tokens 128 --hidden 7168 --topk 8 --experts 256]

Drives deepep_cupy.low_latency directly (Buffer wiring is pending, issue #4). Times, DeepEP's way
(L2 flushed, CUDA events around each call, median of many calls):
  * dispatch (FP8 and BF16) and combine (BF16) as whole operations (send + receive);
  * the send and the receive halves separately, as with return_recv_hook;
  * NCCL all-to-all (PyTorch all_to_all_single) of the same token bytes;
and reports the FP8-vs-BF16 round-trip error against the float32 input. DeepEP v1.2.1 on the same
machine: dispatch 28.3 us (send 19.5 + recv 8.3), combine 40.5 us (send 32.3 + recv 9.7).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DEEPEP = {"dispatch": 28.3, "combine": 40.5}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--force-puts", action="store_true", help="NVSHMEM puts for every peer")
    args = ap.parse_args()

    from mpi4py import MPI
    import cupy as cp
    import ml_dtypes
    import numpy as np
    import deepep_cupy as ep
    from deepep_cupy import low_latency, reference
    from benchutil import fmt_us, nccl_all_to_all, summarize, time_calls

    comm = MPI.COMM_WORLD
    rank, R = comm.Get_rank(), comm.Get_size()
    say = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    T, H, K, E = args.tokens, args.hidden, args.topk, args.experts
    buf = ep.Buffer(comm, num_nvl_bytes=1 << 20,
                    num_rdma_bytes=ep.Buffer.get_low_latency_rdma_size_hint(T, H, R, E), backend="gpu")
    kernels = low_latency.LowLatencyKernels(buf._backend, T, H, E, force_puts=args.force_puts)
    stream = cp.cuda.get_current_stream()
    rng = np.random.default_rng(rank)
    x32 = rng.standard_normal((T, H), dtype=np.float32)
    x = cp.asarray(x32.astype(ml_dtypes.bfloat16))
    idx = cp.asarray(np.argsort(rng.random((T, E)), axis=1)[:, :K].astype(np.int64))
    w = cp.asarray(rng.random((T, K), dtype=np.float32))
    say(f"low-latency: {T} tokens/rank, hidden {H}, top-{K} of {E}, {R} ranks, "
        f"{'puts' if args.force_puts else 'NVLink stores'}; buffer {kernels.layout.total_bytes / 2**20:.0f} MiB")

    rows = []
    for fp8 in (True, False):
        name = "fp8" if fp8 else "bf16"

        def dispatch():
            kernels.dispatch_send(x, idx, fp8, False, False, stream)
            return kernels.dispatch_recv(stream)

        rows.append((f"dispatch_{name}", time_calls(dispatch, num_tests=args.iters)))
        rows.append((f"dispatch_{name}_send", time_calls(
            lambda: kernels.dispatch_send(x, idx, fp8, False, False, stream), num_tests=args.iters,
            after=lambda: kernels.dispatch_recv(stream))))
        rows.append((f"dispatch_{name}_recv", time_calls(
            lambda: kernels.dispatch_recv(stream), num_tests=args.iters,
            before=lambda: kernels.dispatch_send(x, idx, fp8, False, False, stream))))

    kernels.dispatch_send(x, idx, False, False, False, stream)
    recv_x, _, _, handle = kernels.dispatch_recv(stream)

    def combine():
        kernels.combine_send(recv_x, handle, stream)
        return kernels.combine_recv(idx, w, handle, None, stream)

    rows.append(("combine_bf16", time_calls(combine, num_tests=args.iters)))
    rows.append(("combine_bf16_send", time_calls(lambda: kernels.combine_send(recv_x, handle, stream),
                                                 num_tests=args.iters,
                                                 after=lambda: kernels.combine_recv(idx, w, handle, None, stream))))
    rows.append(("combine_bf16_recv", time_calls(lambda: kernels.combine_recv(idx, w, handle, None, stream),
                                                 num_tests=args.iters,
                                                 before=lambda: kernels.combine_send(recv_x, handle, stream))))

    # FP8 vs BF16 round trip: dispatch, experts return their input, combine with weights 1
    errors = {}
    ones = cp.ones((T, K), dtype=cp.float32)
    valid = cp.asnumpy(idx >= 0).sum(axis=1, keepdims=True).astype(np.float32)
    for fp8 in (True, False):
        kernels.dispatch_send(x, idx, fp8, False, False, stream)
        rx, rs, _, h = kernels.dispatch_recv(stream)
        if fp8:   # dequantize what arrived, as an expert would before its GEMM
            q = cp.asnumpy(rx).view(ml_dtypes.float8_e4m3fn)
            deq = reference.fp8_to_float(q, cp.asnumpy(rs)).astype(ml_dtypes.bfloat16)
            rx = cp.asarray(deq)
        kernels.combine_send(rx, h, stream)
        out = cp.asnumpy(kernels.combine_recv(idx, ones, h, None, stream)).astype(np.float32)
        ref = x32 * valid
        errors["fp8" if fp8 else "bf16"] = float(np.abs(out - ref).max() / max(1e-6, np.abs(ref).max()))

    nccl_rows = []
    try:   # the same token rows (bf16) moved by NCCL
        in_rank = np.zeros((T, R), dtype=bool)
        host_idx = cp.asnumpy(idx)
        for r in range(R):
            in_rank[:, r] = ((host_idx >= 0) & (host_idx // (E // R) == r)).any(axis=1)
        nccl_rows = nccl_all_to_all(comm, in_rank, H, args.iters)
    except Exception as e:  # noqa: BLE001 - report and carry on
        say(f"NCCL comparison skipped: {type(e).__name__}: {e}")

    say("")
    say(f"{'op':22s} {'median (p10-p90)':34s} {'vs DeepEP':>10}")
    for name, samples in rows:
        base = DEEPEP.get(name.split("_")[0]) if name.count("_") == 1 else None
        ratio = f"{summarize(samples)[0] / base:.2f}x" if base else ""
        say(f"{name:22s} {fmt_us(samples):34s} {ratio:>10}")
    for name, samples, gbps in nccl_rows:
        say(f"{name:22s} {fmt_us(samples):34s}   NVLink {gbps:.1f} GB/s")
    say(f"round-trip max relative error: fp8 {errors['fp8']:.3e}, bf16 {errors['bf16']:.3e}")
    say("")
    say("SUMMARY bench_low_latency (DeepEP v1.2.1: dispatch 28.3 us, combine 40.5 us; goal 20 / 28 us)")
    for name, samples in rows:
        if name in ("dispatch_fp8", "combine_bf16"):
            say(f"  {name:14s} {summarize(samples)[0]:8.1f} us")
    buf.destroy()


if __name__ == "__main__":
    main()
