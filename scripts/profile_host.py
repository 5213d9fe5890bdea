#!/usr/bin/env python3
"""Host cost of each high-throughput call, by Python function (a diagnostic, not a benchmark).

    mpirun -n 2 python scripts/profile_host.py [--tokens 4096 --hidden 7168 --iters 200] [--top 30]

Runs each operation (fresh dispatch BF16 and FP8, cached dispatch BF16 and FP8, combine) ``--iters``
times with the GPU idle between calls (a synchronize after each) and prints, on rank 0, the median
host microseconds per call without a profiler, then a cProfile of the same calls: the ``--top``
functions by own time and by cumulative time, in microseconds per call (the profiler's overhead
inflates them about twofold; read them for the ranking, and the plain medians for the cost).
"""

import argparse
import cProfile
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

OPS = ("dispatch_bf16", "dispatch_fp8", "cached_bf16", "cached_fp8", "combine")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--sms", type=int, default=24)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--ops", default=",".join(OPS), help="comma-separated, of: " + ", ".join(OPS))
    args = ap.parse_args()
    if args.iters < 1:
        ap.error("--iters: at least 1")
    for name in args.ops.split(","):   # before any GPU work: a typo costs no device time
        if name not in OPS:
            ap.error(f"--ops: unknown {name!r} (known: {', '.join(OPS)})")
    from mpi4py import MPI
    import cupy as cp
    import deepep_cupy as ep
    from benchutil import intranode_case, summarize

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    case = intranode_case(comm, args.tokens, args.hidden)
    buf, idx, w, x, fp8 = case.buf, case.idx, case.w, case.x, case.fp8
    per_rank, per_expert, in_rank = case.per_rank, case.per_expert, case.in_rank
    cfg = ep.Config(num_sms=args.sms)

    def fresh(inp):
        return lambda: buf.dispatch(inp, topk_idx=idx, topk_weights=w, num_tokens_per_rank=per_rank,
                                    is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, config=cfg)
    ops = {
        "dispatch_bf16": fresh(x),
        "dispatch_fp8": fresh(fp8),
        "cached_bf16": lambda: buf.dispatch(x, handle=handle, config=cfg),
        "cached_fp8": lambda: buf.dispatch(fp8, handle=handle, config=cfg),
        "combine": lambda: buf.combine(recv, handle, topk_weights=recv_w, config=cfg),
    }
    recv, _, recv_w, _, handle, _ = fresh(x)()   # what the cached dispatches and the combine reuse
    for name in args.ops.split(","):
        op = ops[name]
        times = []
        for i in range(args.iters + 10):
            cp.cuda.Device().synchronize()
            comm.Barrier()
            t0 = time.perf_counter()
            op()
            t1 = time.perf_counter()
            if i >= 10:
                times.append((t1 - t0) * 1e6)
        cp.cuda.Device().synchronize()
        prof = cProfile.Profile()
        for i in range(args.iters):
            cp.cuda.Device().synchronize()
            comm.Barrier()
            prof.enable()
            op()
            prof.disable()
        cp.cuda.Device().synchronize()
        if rank != 0:
            continue
        med, p10, p90 = summarize(times)
        print(f"\n=== {name}: host {med:.1f} us per call (median of {len(times)}, p10 {p10:.1f}, p90 {p90:.1f}), "
              f"rank 0")
        stats = pstats.Stats(prof).stats
        rows = []
        for (path, line, fn), (cc, nc, tt, ct, _) in stats.items():
            where = f"{os.path.basename(path)}:{line}({fn})" if line else fn
            rows.append((tt / args.iters * 1e6, ct / args.iters * 1e6, nc / args.iters, where))
        for title, key in (("own us/call", 0), ("cumulative us/call", 1)):
            print(f"  -- top {args.top} by {title}")
            for tt, ct, n, where in sorted(rows, key=lambda r: -r[key])[:args.top]:
                print(f"    own {tt:7.1f}  cum {ct:7.1f}  calls {n:5.1f}  {where}")
    comm.Barrier()


if __name__ == "__main__":
    main()
