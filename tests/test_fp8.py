#!/usr/bin/env python3
"""FP8 against BF16 dispatch, side by side: the error FP8 costs, the bytes it saves, the time.

    python tests/test_fp8.py [--num-processes 2] [--num-tokens 4096 --hidden 7168 --num-topk 8
                              --num-experts 256 --ll-num-tokens 128]
    mpirun -n 2 python tests/test_fp8.py

The same tokens and routing are dispatched as BF16 and as FP8 (e4m3, one float32 scale per 128
channels, cast once at the source): by the high-throughput ``dispatch`` (``--num-tokens`` per rank),
and by ``low_latency_dispatch`` (the first ``--ll-num-tokens`` of them; FP8 plain, with
``round_scale`` and with packed UE8M0 scales). Every result is checked bit for bit against
``deepep_cupy.reference`` (the FP8 bytes and scales too). Then, against the BF16 rows received in
the same place, the received FP8 rows dequantized: the error per 128-channel block (largest
``|fp8 - bf16|`` / the block's largest ``|bf16|``), its maximum and mean over blocks, and DeepEP's
``calc_diff``; it must stay below 1/16 (e4m3 keeps 3 mantissa bits). Rank 0 prints one row per
format: the bytes this rank receives, the time per call and the bandwidth (bytes / time), and the
errors. Exit status 1 on a mismatch or an error above the bound.

Under pytest: one rank in process and 2 ranks in the shared mpiexec launch of tests/seed_scripts.py,
on the reference backend.
"""

import sys

import seed_scripts as ss

SMALL = ["--num-tokens", "64", "--hidden", "512", "--num-topk", "4", "--num-experts", "16",
         "--ll-num-tokens", "24", "--num-tests", "2"]
LL_MODES = (("BF16", False, False, False), ("FP8", True, False, False), ("FP8 round_scale", True, True, False),
            ("FP8 UE8M0", True, True, True))
# e4m3 keeps 3 mantissa bits: an element rounds by at most 1/16 of itself, so of its block's largest
# value too (scaled to at most 448); the slack covers the float32 rounding of the dequantization
BOUND = 1.0 / 16 * (1 + 1e-6)


def build_parser():
    ap = ss.parser("FP8 vs BF16 dispatch side by side (deepep_cupy): error, bytes, time",
                   num_tokens=4096, hidden=7168, num_topk=8, num_experts=256)
    ap.add_argument("--ll-num-tokens", type=int, default=128,
                    help="tokens per rank of the low-latency dispatches (num_max_dispatch_tokens_per_rank; default 128)")
    return ap


def run(args, ctx) -> list:
    import numpy as np
    import deepep_cupy as ep
    from deepep_cupy import reference
    R, me, T, H, K = ctx.num_ranks, ctx.rank, args.num_tokens, args.hidden, args.num_topk
    E = ctx.experts(args.num_experts)
    M = min(args.ll_num_tokens, T)
    ctx.say(f"[config] num_tokens={T} (low latency: {M}), hidden={H}, num_topk={K}, num_experts={E}, ranks={R}, "
            f"backend={ctx.backend}")
    ht = ep.Buffer(ctx.comm, num_nvl_bytes=ep.Buffer.get_intranode_size_hint(T, H, R, K) if ctx.gpu else 0,
                   backend=ctx.backend)
    ll = None
    try:
        ll = ep.Buffer(ctx.comm, num_rdma_bytes=ep.Buffer.get_low_latency_rdma_size_hint(M, H, R, E),
                       low_latency_mode=True, backend=ctx.backend)
        xs, idxs, ws = ss.world_inputs(args.seed, R, T, H, K, E, "random")
        qs, scales = ss.fp8_pairs(xs)
        problems = []
        rows = []

        # high throughput: BF16 and FP8 of the same tokens; rows land in the same order
        found, bf16 = ss.dispatch_round(ctx, ht, "dispatch BF16", xs, idxs, ws, E, cached=False)
        problems += found
        found, fp8 = ss.dispatch_round(ctx, ht, "dispatch FP8", qs, idxs, ws, E, scales=scales, cached=False)
        problems += found
        ctx.say(f"[testing] high-throughput dispatch, BF16 and FP8 against the reference ... "
                f"{'passed' if not problems else 'FAILED'}")
        n = bf16["num_recv"]
        want = ctx.host(bf16["recv_x"]).astype(np.float32)
        q = ctx.host(fp8["recv_x"][0]).view(reference.FP8)
        got = reference.fp8_to_float(q, ctx.host(fp8["recv_x"][1]))
        calls = [("dispatch BF16", bf16["x"], bf16["kwargs"], 2 * H, (0.0, 0.0, 0.0)),
                 ("dispatch FP8", fp8["x"], fp8["kwargs"], H + H // 128 * 4, ss.fp8_error(got, want))]
        del bf16, fp8     # free their outputs (on the GPU, blocks of the receive arena) before timing
        for label, x_in, kwargs, row_bytes, err in calls:
            avg, lo, hi = ss.avg_min_max(ss.bench(ctx, lambda: ht.dispatch(x_in, **kwargs)))
            rows.append((label, n * row_bytes / 1e6, avg, lo, hi, ss.gbps(n * row_bytes, avg)) + err)

        # low latency: BF16, then each FP8 flavour of the same first M tokens
        lx = [x[:M] for x in xs]
        lidx = [i[:M] for i in idxs]
        x, idx = ctx.dev(lx[me]), ctx.dev(lidx[me])
        base = None
        for label, use_fp8, round_scale, ue8m0 in LL_MODES:
            ref = ss.ll_reference(lx, lidx, [w[:M] for w in ws], me, M, E, use_fp8, round_scale, ue8m0)[0]
            call = lambda: ll.low_latency_dispatch(x, idx, M, E, use_fp8=use_fp8, round_scale=round_scale,
                                                   use_ue8m0=ue8m0)
            recv, count, handle, _, _ = call()
            found = ss.ll_dispatch_problems(ctx, f"low_latency_dispatch {label}", (recv, count, handle), ref, use_fp8)
            problems += found
            ctx.say(f"[testing] low_latency_dispatch {label} against the reference ... "
                    f"{'passed' if not found else 'FAILED'}")
            counts = ctx.host(count)
            # the received entries of every local expert, in slot order (the same for every format)
            mine = np.concatenate([ss.dequantized(ref.recv_x[l, :c], ref.recv_x_scales[l, :c] if use_fp8 else None,
                                                  ue8m0) for l, c in enumerate(counts)]).astype(np.float32)
            if base is None:
                base, err = mine, (0.0, 0.0, 0.0)
            else:
                err = ss.fp8_error(mine, base)
            entries = int(counts.sum())
            row_bytes = (2 * H if not use_fp8 else H + (4 * -(-H // 512) if ue8m0 else H // 128 * 4))
            avg, lo, hi = ss.avg_min_max(ss.bench(ctx, call))
            rows.append((f"low_latency_dispatch {label}", entries * row_bytes / 1e6, avg, lo, hi,
                         ss.gbps(entries * row_bytes, avg)) + err)

        for row in rows:
            if row[6] > BOUND:
                problems.append(f"{row[0]}: FP8 error {row[6]:.4f} of a block's largest value, above 1/16")
        ctx.say("")
        ctx.say(f"[timing] {ss.backend_note(ctx)}; {ctx.num_tests} calls each. Errors: FP8 against the BF16 rows "
                "received in the same place, per 128-channel block (|fp8 - bf16| max / block max |bf16|)")
        ss.table(ctx, ("op (rank 0)", "recv MB", "avg us", "min us", "max us", "GB/s", "max rel err",
                       "mean rel err", "calc_diff"),
                 [r[:6] + (f"{r[6]:.2e}", f"{r[7]:.2e}", f"{r[8]:.2e}") for r in rows])
        ctx.say("")
        return problems
    finally:
        if ll is not None:
            ll.destroy()
        ht.destroy()


def test_fp8_in_process():
    """The script's checks on one rank (MPI.COMM_SELF), reference backend, small sizes."""
    ss.run_in_process(sys.modules[__name__])


@ss.mark.mpi
@ss.mark.mpi_session(2)
def test_fp8_under_mpiexec():
    """The script's small case on 2 ranks, in the shared mpiexec launch of tests/seed_scripts.py."""
    ss.check_under_mpiexec("test_fp8")


if __name__ == "__main__":
    sys.exit(ss.script_main(sys.modules[__name__]))
