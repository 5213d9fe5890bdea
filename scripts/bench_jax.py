#!/usr/bin/env python3
"""Jitted JAX dispatch + combine (``deepep_cupy.jaxep``) beside the same work called eagerly through
``Buffer`` with CuPy arrays (issue #13): time per step and the host's share.

    mpirun -n 2 python scripts/bench_jax.py [--tokens 512 --hidden 2048 --topk 8 --experts 64 --iters 100]

One step = layout + dispatch (``num_worst_tokens`` = ranks x tokens, so no host wait) + combine of
the received rows. Three paths, same inputs:
  * ``eager cupy``: ``Buffer.get_dispatch_layout`` + ``Buffer.dispatch`` + ``Buffer.combine``;
  * ``eager jaxep``: the jaxep functions called without jit (one XLA executable per op);
  * ``jit jaxep``: one ``jax.jit`` program of dispatch + combine (each op a buffer_callback).
Per path: ``sync`` = wall time per step with a wait for the result after every step (latency of one
step, host overhead included); ``pipelined`` = wall time per step over ``--iters`` steps issued back
to back and waited for once (what a training loop sees when the host runs ahead); ``host`` = how long
issuing one step takes on the host. Median over 5 rounds. The jitted result is checked bit-equal to
the eager CuPy result first.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--profile", metavar="FILE", help="also profile the jitted path's host side (cProfile, "
                    "rank 0, --iters steps) and write the top functions by own time to FILE")
    args = ap.parse_args()

    from mpi4py import MPI
    import deepep_cupy.jaxep as epj
    epj.use_local_gpu()
    import cupy as cp
    import jax
    import ml_dtypes
    import numpy as np
    import deepep_cupy as ep

    comm = MPI.COMM_WORLD
    rank, R = comm.Get_rank(), comm.Get_size()
    say = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    T, H, K, E = args.tokens, args.hidden, args.topk, args.experts
    W = R * T
    buf = ep.Buffer(comm, num_nvl_bytes=ep.Buffer.get_intranode_size_hint(T, H, R, K), backend="gpu")
    ep.settings.check_values = False
    rng = np.random.default_rng(rank)
    x_host = rng.standard_normal((T, H), dtype=np.float32).astype(ml_dtypes.bfloat16)
    idx_host = np.argsort(rng.random((T, E)), axis=1)[:, :K].astype(np.int64)
    x_cp, idx_cp = cp.asarray(x_host), cp.asarray(idx_host)
    device = jax.devices("gpu")[0]          # use_local_gpu left JAX this rank's GPU only
    x_j = jax.device_put(x_host, device)
    idx_j = jax.device_put(idx_host.astype(np.int32), device)

    def eager_cupy():
        per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx_cp, E)
        recv_x, _, _, _, handle, _ = buf.dispatch(x_cp, topk_idx=idx_cp, num_tokens_per_rank=per_rank,
                                                  num_tokens_per_expert=per_expert, is_token_in_rank=in_rank,
                                                  num_worst_tokens=W)
        return buf.combine(recv_x, handle)[0]

    def step(x, i):
        recv_x, _, _, _, handle = epj.dispatch(buf, x, i, num_experts=E, num_worst_tokens=W)
        return epj.combine(buf, recv_x, handle)[0]

    jitted = jax.jit(step)
    paths = {"eager cupy": (eager_cupy, lambda: cp.cuda.Device().synchronize()),
             "eager jaxep": (lambda: step(x_j, idx_j), None),
             "jit jaxep": (lambda: jitted(x_j, idx_j), None)}

    want = cp.asnumpy(eager_cupy()).view(np.uint16)
    got = np.asarray(jitted(x_j, idx_j)).view(np.uint16)
    same = bool(np.array_equal(want, got))
    all_same = comm.allreduce(int(same), op=MPI.MIN)
    say(f"bench_jax: {R} ranks, {T} tokens x hidden {H}, top-{K} of {E}, num_worst_tokens {W}; "
        f"jit result bit-equal to eager cupy on every rank: {bool(all_same)}")

    say(f"{'path':14s} {'sync us/step':>14s} {'pipelined us/step':>18s} {'host us/step':>13s}")
    summary = []
    for name, (fn, sync_fn) in paths.items():
        last = [None]

        def run():
            last[0] = fn()

        def wait():
            if sync_fn is not None:
                sync_fn()
            else:
                jax.block_until_ready(last[0])
        for _ in range(10):
            run()
        wait()
        syncs, pipes, hosts = [], [], []
        for _ in range(5):
            comm.Barrier()
            t0 = time.perf_counter()
            for _ in range(args.iters):
                run()
                wait()
            syncs.append((time.perf_counter() - t0) / args.iters * 1e6)
            comm.Barrier()
            t0 = time.perf_counter()
            host = 0.0
            for _ in range(args.iters):
                h0 = time.perf_counter()
                run()
                host += time.perf_counter() - h0
            wait()
            pipes.append((time.perf_counter() - t0) / args.iters * 1e6)
            hosts.append(host / args.iters * 1e6)
        row = (statistics.median(syncs), statistics.median(pipes), statistics.median(hosts))
        summary.append((name, row))
        say(f"{name:14s} {row[0]:14.1f} {row[1]:18.1f} {row[2]:13.1f}")
    say("SUMMARY bench_jax us/step (sync / pipelined / host): "
        + "; ".join(f"{n} {r[0]:.0f} / {r[1]:.0f} / {r[2]:.0f}" for n, r in summary)
        + f"; bit-equal {bool(all_same)}")
    if args.profile:
        profile_host(lambda: jitted(x_j, idx_j), args.iters, args.profile if rank == 0 else None, comm)
    buf.destroy()


def profile_host(step, iters: int, path, comm):
    """cProfile ``iters`` back-to-back calls of ``step`` (every rank runs them: they are collective;
    the rank with a ``path`` records and writes its 30 most expensive functions by own time)."""
    import cProfile
    import io
    import pstats
    import jax
    prof = cProfile.Profile() if path else None
    comm.Barrier()
    if prof:
        prof.enable()
    out = [step() for _ in range(iters)]
    jax.block_until_ready(out)
    if prof:
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
        pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(30)
        with open(path, "w") as f:
            f.write(f"{iters} jitted steps\n" + text.getvalue())
        print(f"bench_jax: host profile of {iters} jitted steps in {path}", flush=True)
    comm.Barrier()


if __name__ == "__main__":
    main()
