#!/usr/bin/env python3
"""What the cross-rank agreement costs per call (issue #15): host time of each public call with
``settings.check_agreement`` off and on, same buffer, same inputs, in one run.

    mpirun -n 2 python scripts/bench_agreement.py [--backend auto|gpu|reference] [--iters 200]

The agreement adds one small non-blocking message to every peer and a poll for theirs before the
call launches (``deepep_cupy/agreement.py``), so its cost is host time: this script times how long
each call takes to *return* (median and p90 over ``--iters`` calls, the ranks kept in step by a
barrier every call, outside the timed region). On the GPU the calls are eager and asynchronous, so
the figure is launch overhead plus, with the agreement on, the round trip; the GPU's own time is not
changed by the agreement. The default shapes are small (decode-sized) so that the host part is what
shows: 128 tokens per rank, hidden 2048, top-8 of 64 experts.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="auto", choices=("auto", "gpu", "reference"))
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--iters", type=int, default=200)
    args = ap.parse_args()

    from mpi4py import MPI
    import ml_dtypes
    import numpy as np
    import deepep_cupy as ep

    comm = MPI.COMM_WORLD
    rank, R = comm.Get_rank(), comm.Get_size()
    say = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    T, H, K, E = args.tokens, args.hidden, args.topk, args.experts
    nvl = ep.Buffer.get_intranode_size_hint(T, H, R, K)
    rdma = ep.Buffer.get_low_latency_rdma_size_hint(T, H, R, E)
    buf = ep.Buffer(comm, num_nvl_bytes=nvl, num_rdma_bytes=rdma, low_latency_mode=True, backend=args.backend)
    gpu = buf.backend_name == "gpu"
    if gpu:
        import cupy as xp
        ep.settings.check_values = False       # a hot loop runs without the host-side value check
    else:
        xp = np
    sync = (lambda: xp.cuda.Device().synchronize()) if gpu else (lambda: None)

    rng = np.random.default_rng(rank)
    x = xp.asarray(rng.standard_normal((T, H), dtype=np.float32).astype(ml_dtypes.bfloat16))
    idx = xp.asarray(np.argsort(rng.random((T, E)), axis=1)[:, :K].astype(np.int64))
    w = xp.asarray(rng.random((T, K), dtype=np.float32))
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
    recv_x, _, _, _, handle, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w, num_tokens_per_rank=per_rank,
                                              num_tokens_per_expert=per_expert, is_token_in_rank=in_rank)
    ll_x, _, ll_handle, _, _ = buf.low_latency_dispatch(x, idx, T, E, use_fp8=False)
    ll_out = xp.empty_like(ll_x)
    ll_out[...] = ll_x
    sync()

    calls = {
        "get_dispatch_layout": lambda: buf.get_dispatch_layout(idx, E),
        "dispatch": lambda: buf.dispatch(x, topk_idx=idx, topk_weights=w, num_tokens_per_rank=per_rank,
                                         num_tokens_per_expert=per_expert, is_token_in_rank=in_rank),
        "dispatch (cached)": lambda: buf.dispatch(x, handle=handle),
        "combine": lambda: buf.combine(recv_x, handle),
        "low_latency_dispatch": lambda: buf.low_latency_dispatch(x, idx, T, E, use_fp8=False),
        "low_latency_combine": lambda: buf.low_latency_combine(ll_out, idx, w, ll_handle),
    }
    say(f"bench_agreement: backend {buf.backend_name}, {R} ranks, {T} tokens x hidden {H}, "
        f"top-{K} of {E}, {args.iters} calls each; host microseconds per call (median / p90)")
    say(f"{'call':22s} {'agreement off':>20s} {'agreement on':>20s} {'added (median)':>15s}")
    rows = []
    for name, fn in calls.items():
        results = {}
        for mode in (False, True):
            ep.settings.check_agreement = mode
            for _ in range(5):                       # warm-up (JIT, caches, first messages)
                fn()
            sync()
            samples = []
            for _ in range(args.iters):
                comm.Barrier()                       # ranks in step: the timed call waits on no straggler
                t0 = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t0) * 1e6)
                sync()
            samples.sort()
            results[mode] = (statistics.median(samples), samples[int(0.9 * (len(samples) - 1))])
        off, on = results[False], results[True]
        rows.append((name, off, on))
        say(f"{name:22s} {off[0]:10.1f} / {off[1]:7.1f} {on[0]:10.1f} / {on[1]:7.1f} {on[0] - off[0]:+15.1f}")
    ep.settings.check_agreement = "auto"
    say("SUMMARY agreement added host us (median): "
        + ", ".join(f"{n} {on[0] - off[0]:+.1f}" for n, off, on in rows))
    buf.destroy()


if __name__ == "__main__":
    main()
