#!/usr/bin/env python3
"""Benchmark high-throughput dispatch/combine inside one node; prints a table.

    mpirun -n 2 python scripts/bench_intranode.py [--tokens 4096 --hidden 7168 --topk 8
                                                    --experts 256 --sms 8,16,24]

For each SM budget: dispatch BF16 and FP8 (normal, and cached with a handle as in DeepEP's tuning
sweep) and combine BF16, timed DeepEP's way (L2 flushed, CUDA events around each call, median of
many calls after warm-up), with both metrics of ../shared/ANCHORS.md:
  * DeepEP's "NVL GB/s": bytes this rank receives (own tokens included) / time;
  * NVLink GB/s: bytes that crossed NVLink into (dispatch) or out of (combine) this GPU / time;
and NCCL all-to-all (PyTorch all_to_all_single) moving the same rows, for comparison.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DEEPEP = {"dispatch_fp8": 258.0, "dispatch_bf16": 353.0, "combine_bf16": 403.0}   # us, same machine


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--sms", default="8,16,24,32")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--no-nccl", action="store_true")
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
    nbytes = ep.Buffer.get_intranode_size_hint(T, H, R, K)
    buf = ep.Buffer(comm, num_nvl_bytes=nbytes, backend="gpu")
    say(f"buffer: {nbytes / 2**20:.0f} MiB symmetric per rank (Buffer.get_intranode_size_hint)")

    rng = np.random.default_rng(rank)
    topk = np.argsort(rng.random((T, E)), axis=1)[:, :K].astype(np.int64)
    idx = cp.asarray(topk)
    weights = cp.asarray(rng.random((T, K), dtype=np.float32))
    xs = [cp.asarray(rng.standard_normal((T, H), dtype=np.float32).astype(ml_dtypes.bfloat16)) for _ in range(4)]
    fp8s = []
    for x in xs[:2]:
        q, s = reference.per_token_cast_to_fp8(cp.asnumpy(x))
        fp8s.append((cp.asarray(q.view(np.uint8)), cp.asarray(s)))
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
    in_rank_host = cp.asnumpy(in_rank)
    sent_remote = int(in_rank_host[:, [j for j in range(R) if j != rank]].sum())
    recv_counts = comm.allgather(in_rank_host.sum(axis=0))        # [src][dst]
    recv_rows = int(sum(c[rank] for c in recv_counts))
    recv_remote = int(sum(c[rank] for s, c in enumerate(recv_counts) if s != rank))
    bf16_row, fp8_row = H * 2, H + H // 128 * 4
    say(f"{T} tokens/rank, hidden {H}, top-{K} of {E}, {R} ranks: rank 0 receives {recv_rows} rows "
        f"({recv_remote} over NVLink), sends {sent_remote} over NVLink")

    ep.settings.check_values = False      # DeepEP checks nothing; time the same work
    rows = []
    counter = [0]
    for sms in [int(s) for s in args.sms.split(",")]:
        cfg = ep.Config(num_sms=sms)

        def disp(x, cached=False):
            def run():
                counter[0] += 1
                xi = x[counter[0] % len(x)]
                if cached:
                    return buf.dispatch(xi, handle=handle_box[0], config=cfg)
                return buf.dispatch(xi, topk_idx=idx, topk_weights=weights, num_tokens_per_rank=per_rank,
                                    is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, config=cfg)
            return run

        handle_box = [buf.dispatch(xs[0], topk_idx=idx, topk_weights=weights, num_tokens_per_rank=per_rank,
                                   is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, config=cfg)[4]]
        recv_x = buf.dispatch(xs[0], handle=handle_box[0], config=cfg)[0]
        results = {}
        say(f"  num_sms={sms}: timing ...")
        results["dispatch_bf16"] = time_calls(disp(xs), num_tests=args.iters)
        results["dispatch_bf16_cached"] = time_calls(disp(xs, True), num_tests=args.iters)
        results["dispatch_fp8"] = time_calls(disp(fp8s), num_tests=args.iters)
        results["dispatch_fp8_cached"] = time_calls(disp(fp8s, True), num_tests=args.iters)
        results["combine_bf16"] = time_calls(lambda: buf.combine(recv_x, handle_box[0], config=cfg),
                                             num_tests=args.iters)
        for name, samples in results.items():
            med = summarize(samples)[0]
            row_bytes = fp8_row if "fp8" in name else bf16_row
            deepep_metric = recv_rows * row_bytes / med / 1e3          # GB/s
            nvlink = (recv_remote if "dispatch" in name else sent_remote) * row_bytes / med / 1e3
            rows.append((sms, name, samples, deepep_metric, nvlink))

    nccl_rows = []
    if not args.no_nccl:
        try:
            nccl_rows = nccl_all_to_all(comm, in_rank_host, H, args.iters)
        except Exception as e:  # noqa: BLE001 - report and carry on
            say(f"NCCL comparison skipped: {type(e).__name__}: {e}")

    say("")
    say(f"{'SMs':>4} {'op':22s} {'median (p10-p90)':34s} {'DeepEP NVL GB/s':>16} {'NVLink GB/s':>12} {'vs DeepEP':>10}")
    for sms, name, samples, m1, m2 in rows:
        base = DEEPEP.get(name.replace("_cached", ""))
        ratio = f"{summarize(samples)[0] / base:.2f}x" if base else ""
        say(f"{sms:>4} {name:22s} {fmt_us(samples):34s} {m1:16.1f} {m2:12.1f} {ratio:>10}")
    for name, samples, gbps in nccl_rows:
        say(f"{'':>4} {name:22s} {fmt_us(samples):34s} {'':>16} {gbps:12.1f}")
    say("")
    say("SUMMARY bench_intranode (DeepEP v1.2.1: dispatch FP8 258 us, BF16 353 us, combine 403 us)")
    best = {}
    for sms, name, samples, m1, m2 in rows:
        med = summarize(samples)[0]
        if name not in best or med < best[name][0]:
            best[name] = (med, sms, m2)
    for name, (med, sms, m2) in best.items():
        say(f"  {name:22s} {med:8.1f} us at {sms} SMs  NVLink {m2:6.1f} GB/s")
    buf.destroy()


if __name__ == "__main__":
    main()
