#!/usr/bin/env python3
"""Benchmark get_dispatch_layout (and the JIT) on the GPUs; prints a table.

    mpirun -n 2 python scripts/bench_layout.py [--tokens 4096 --topk 8 --experts 256]

Reports, per rank 0:
  * JIT: first compile of every kernel (fresh cache) and warm-cache load (a new in-process load
    from the disk cache), against the 30 s / 1 s goals;
  * layout per call through Buffer.get_dispatch_layout, DeepEP's method (L2 flushed, CUDA events
    around each Python call), with value checks on and off;
  * the kernel alone (one call captured in a CUDA graph, replayed);
  beside DeepEP v1.2.1's 38 us on the same machine (../shared/ANCHORS.md).
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DEEPEP_LAYOUT_US = 38.0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--skip-jit", action="store_true", help="skip the JIT timing table")
    ap.add_argument("--skip-graph", action="store_true", help="skip the CUDA-graph timing")
    args = ap.parse_args()

    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    say = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)

    import deepep_cupy as ep
    from deepep_cupy import jit, kernels
    from benchutil import fmt_us, summarize, time_calls

    # ---- layout -------------------------------------------------------------------------------
    import cupy as cp
    import numpy as np
    buf = ep.Buffer(comm, num_nvl_bytes=1 << 20, backend="gpu")
    rng = np.random.default_rng(rank)
    inputs = [cp.asarray(np.argsort(rng.random((args.tokens, args.experts)), axis=1)[:, :args.topk]
                         .astype(np.int64)) for _ in range(8)]
    counter = [0]

    # ---- JIT: cold compile into a fresh cache, then a warm load as users hit it: build (cache
    # hit) + module load + NVSHMEM registration (with the runtime up, as in real use) ------------
    cold_dir = tempfile.mkdtemp(prefix=f"deepep_jit_r{rank}_")
    old_dir = ep.settings.cache_dir
    ep.settings.cache_dir = cold_dir
    say("JIT: compiling every kernel into a fresh cache (progress per kernel)")
    jit_rows = []
    for spec in ([] if args.skip_jit else kernels.all_specs()):
        for route in ("nvrtc", "nvcc"):
            t0 = time.perf_counter()
            compiled = jit.build(spec, jit.JitOptions(route=route))
            cold = time.perf_counter() - t0
            jit._digest_memo.clear()
            jit.forget_loaded(lambda m: m.compiled.cubin_path == compiled.cubin_path)
            t0 = time.perf_counter()
            loaded = jit.load(spec, jit.JitOptions(route=route))
            if spec.uses_nvshmem:
                buf._backend.runtime.register_module(loaded)
            warm = time.perf_counter() - t0
            assert loaded.compiled.from_cache and not compiled.from_cache
            regs = {k: v.get("registers") for k, v in compiled.resources.items()}
            say(f"  {spec.source:12s} {route:5s} {dict(spec.defines).get('DEEPEP_NUM_RANKS', '-'):>4} ranks  "
                f"cold {cold:6.2f} s   warm load {warm * 1000:7.1f} ms   regs {regs}")
            jit_rows.append((spec.source, route, cold, warm))
    ep.settings.cache_dir = old_dir
    worst_cold = max((r[2] for r in jit_rows), default=float("nan"))
    worst_warm = max((r[3] for r in jit_rows), default=float("nan"))

    def call():
        counter[0] += 1
        buf.get_dispatch_layout(inputs[counter[0] % len(inputs)], args.experts)

    results = {}
    for checks in (False, True):
        ep.settings.check_values = checks
        results[checks] = time_calls(call, num_tests=args.iters)
    # back to back without the L2 flush: the check waits on the stream, so a flush before each
    # call lands inside its wait
    ep.settings.check_values = True
    checks_no_flush = time_calls(call, num_tests=args.iters, flush_l2=False)
    # the value check alone, back to back (no L2 flush): what check_values=True adds
    check_only = time_calls(lambda: buf._backend.check_index_range(inputs[0], "topk_idx", -1, args.experts),
                            num_tests=args.iters, flush_l2=False)
    ep.settings.check_values = False

    # kernel alone: one call captured in a graph, replayed with events around each replay
    stream = cp.cuda.Stream(non_blocking=True)
    graph, graph_samples = None, [float("nan")]
    if not args.skip_graph:
        with stream:
            stream.begin_capture()
            graph_outputs = buf.get_dispatch_layout(inputs[0], args.experts)
            graph = stream.end_capture()
            graph_samples = time_calls(lambda: graph.launch(stream), num_tests=args.iters)
        assert graph_outputs is not None   # the replays wrote into these: alive until here

    all_results = comm.gather({k: summarize(v)[0] for k, v in results.items()}, root=0)
    say("")
    say(f"get_dispatch_layout, {args.tokens} tokens, top-{args.topk} of {args.experts} experts, "
        f"{comm.Get_size()} ranks (rank 0; medians of {args.iters} calls, L2 flushed)")
    say(f"  per call, value checks off : {fmt_us(results[False])}")
    say(f"  per call, value checks on  : {fmt_us(results[True])}")
    say(f"  kernel alone (graph replay): {fmt_us(graph_samples)}")
    say(f"  value check alone          : {fmt_us(check_only)}")
    say(f"  checks on, no L2 flush     : {fmt_us(checks_no_flush)}")
    say(f"  DeepEP v1.2.1, same machine: {DEEPEP_LAYOUT_US:8.2f} us")
    if rank == 0:
        say(f"  per-rank medians (checks off): {[round(r[False], 2) for r in all_results]}")
    say("")
    say("SUMMARY bench_layout")
    say(f"  layout per call (checks off) : {summarize(results[False])[0]:.2f} us  vs DeepEP 38 us, goal 20 us")
    say(f"  layout kernel (graph replay) : {summarize(graph_samples)[0]:.2f} us")
    say(f"  JIT worst cold compile       : {worst_cold:.2f} s (goal < 30 s)")
    say(f"  JIT worst warm load          : {worst_warm * 1000:.1f} ms (goal < 1000 ms)")
    say(f"  layout per call (checks on)  : {summarize(results[True])[0]:.2f} us")
    graph = stream = None      # the graph goes before the buffer it writes into
    buf.destroy()


if __name__ == "__main__":
    main()
