#!/usr/bin/env python3
"""Row-scatter throughput on one GPU: the direct dispatch's copy with 16-byte register copies vs TMA
bulk copies; prints a table.

    python scripts/bench_copy_paths.py [--tokens 4096] [--sms 24] [--iters 40]

Why: at 2 ranks the direct dispatch moves, per rank, T rows read once and written twice (own receive
array, the peer's), about 176 MB at DeepEP's shape, and on the one-GPU proxy it reaches about
1.7 TB/s of HBM traffic for both ranks together (H100, 2026-12-07), under half of what the GPU's
copy engine does. This probe runs that traffic alone: two "ranks" are two streams of one process,
each a grid of --sms blocks, launched together, so the copy loop can be chosen from numbers before
the dispatch kernel changes. Kernels: cuda_src/copy_probe.cu, through the package's JIT. Each
variant's receive arrays are checked against the expected rows.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

PROBE = ("copy_probe.cu", ("scatter_regs16", "scatter_regs16_pf", "scatter_regs8", "scatter_regs16_flat",
                           "scatter_tma"))
MAX_DYNAMIC_SMEM = 227 * 1024 - 2048   # the H100/H200 opt-in limit less the kernel's static mbarriers


def probe_spec():
    """The JIT instance of cuda_src/copy_probe.cu."""
    from deepep_cupy import jit
    return jit.KernelSpec.make(PROBE[0], PROBE[1])


def tma_variants(row_bytes):
    """(producers per block, stages per producer) pairs whose rings fit shared memory (stages >= 2:
    the ring refills one row behind)."""
    out = []
    for producers in (1, 2, 4, 8):
        stages = min(15, MAX_DYNAMIC_SMEM // (producers * row_bytes))
        if stages >= 2:
            out.append((producers, stages))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--row-bytes", default="14336,7168", help="comma-separated (BF16 and FP8 rows of hidden 7168)")
    ap.add_argument("--sms", type=int, default=24, help="blocks per rank")
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--perm", default="random", choices=("random", "identity"),
                    help="destination row of source row t: a random permutation, or t itself (the dispatch's "
                         "own pattern: a receiver's rows from one source are in token order)")
    args = ap.parse_args()

    import cupy as cp
    import numpy as np
    from deepep_cupy import jit
    from benchutil import summarize

    mod = jit.load(probe_spec())
    T, grid = args.tokens, args.sms
    streams = [cp.cuda.Stream(non_blocking=True) for _ in range(2)]
    main_stream = cp.cuda.Stream(non_blocking=True)
    flush = cp.empty(256_000_000 // 4, dtype=cp.int32)
    rng = np.random.default_rng(7)

    def timed(launches):
        """Per-iteration us of running every launch (one per stream) at once, after an L2 flush."""
        samples = []
        for it in range(args.iters + 5):
            with main_stream:
                flush.fill(0)
                start = main_stream.record()
            ends = []
            for s, fn in zip(streams, launches):
                s.wait_event(start)
                with s:
                    fn()
                    ends.append(s.record())
            for e in ends:
                main_stream.wait_event(e)
            end = main_stream.record()
            end.synchronize()
            if it >= 5:
                samples.append(cp.cuda.get_elapsed_time(start, end) * 1e3)
        return samples

    print(f"{T} rows per rank, 2 ranks as 2 streams, {grid} blocks each, {args.perm} destination rows; "
          f"SM bytes per rank = 3 x rows x row",
          flush=True)
    print(f"{'row B':>6} {'variant':<22} {'median us':>10} {'p10':>8} {'p90':>8} {'SM GB/s/rank':>13} "
          f"{'HBM TB/s':>9}  check")
    for row_bytes in (int(v) for v in args.row_bytes.split(",")):
        x = [cp.asarray(rng.integers(0, 256, size=(T, row_bytes), dtype=np.uint8)) for _ in range(2)]
        recv = [cp.zeros((2 * T, row_bytes), dtype=cp.uint8) for _ in range(2)]
        perm = [cp.asarray((rng.permutation(T) if args.perm == "random" else np.arange(T)).astype(np.int32))
                for _ in range(2)]
        nbytes = 3 * T * row_bytes

        def check():
            ok = True
            for a in range(2):   # rank a's rows: its own recv at perm, the peer's at T + perm
                ok &= bool((recv[a][perm[a]] == x[a]).all()) and bool((recv[1 - a][T + perm[a]] == x[a]).all())
            return ok

        def regs(name):
            k = mod[name]
            return [lambda a=a: k((grid,), (512,), (x[a], recv[a], recv[1 - a], perm[a], cp.int32(T),
                                                  cp.int32(row_bytes), cp.int64(T))) for a in range(2)]

        def tma(producers, stages, chunked=0):
            k = mod["scatter_tma"]
            smem = producers * stages * row_bytes
            k.max_dynamic_shared_size_bytes = smem
            return [lambda a=a: k((grid,), (32 * producers,), (x[a], recv[a], recv[1 - a], perm[a], cp.int32(T),
                                                               cp.int32(row_bytes), cp.int64(T), cp.int32(stages),
                                                               cp.int32(chunked)),
                                  shared_mem=smem) for a in range(2)]

        doubled = [cp.concatenate([x[a], x[a]]) for a in range(2)]

        def copy_engine():   # reference: each rank's 2 x T rows through cudaMemcpyAsync (1 read, 1 write)
            return [lambda a=a: cp.cuda.runtime.memcpyAsync(recv[a].data.ptr, doubled[a].data.ptr, 2 * T * row_bytes,
                                                             cp.cuda.runtime.memcpyDeviceToDevice, streams[a].ptr)
                    for a in range(2)]

        variants = [("regs16", regs("scatter_regs16")), ("regs16 L2::256B", regs("scatter_regs16_pf")),
                    ("regs8", regs("scatter_regs8")), ("regs16 flat", regs("scatter_regs16_flat"))]
        variants += [(f"tma {p}x{s} stages", tma(p, s)) for p, s in tma_variants(row_bytes)]
        # the dispatch's chunk split (blocks differ by up to one chunk of rows): 32-row chunks as today,
        # and smaller ones, which even the blocks out at the cost of more chunk flags
        variants += [(f"tma {p}x{s} chunk {c}", tma(p, s, c)) for p, s in tma_variants(row_bytes) if p in (2, 4)
                     for c in (32, 16, 8, 4, 2) if c % p == 0]
        # balanced splits without chunks: a contiguous row range per block (its producers interleaved),
        # and a contiguous range per producer
        variants += [(f"tma {p}x{s} block-range", tma(p, s, -1)) for p, s in tma_variants(row_bytes) if p in (1, 2, 4)]
        variants += [(f"tma {p}x{s} producer-range", tma(p, s, -2)) for p, s in tma_variants(row_bytes) if p in (2, 4)]
        for name, launches in variants:
            for r in recv:
                r.fill(0)
            samples = timed(launches)
            ok = check()
            med, lo, hi = summarize(samples)
            print(f"{row_bytes:6d} {name:<22} {med:10.1f} {lo:8.1f} {hi:8.1f} {nbytes / med / 1e3:13.1f} "
                  f"{2 * nbytes / med / 1e6:9.2f}  {'ok' if ok else 'WRONG DATA'}", flush=True)
        # the copy engine's rate on the same number of written bytes (reads 2 x T rows, not T)
        samples = timed(copy_engine())
        med, lo, hi = summarize(samples)
        print(f"{row_bytes:6d} {'copy engine D2D 2T':<22} {med:10.1f} {lo:8.1f} {hi:8.1f} "
              f"{4 * T * row_bytes / med / 1e3:13.1f} {2 * 4 * T * row_bytes / med / 1e6:9.2f}  (read+write bytes)",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
