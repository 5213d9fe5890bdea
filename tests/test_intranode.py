#!/usr/bin/env python3
"""DeepEP's tests/test_intranode.py for deepep_cupy: high-throughput dispatch and combine on one node.

    python tests/test_intranode.py [--num-processes 2] [--num-tokens 4096 --hidden 7168
                                    --num-topk 8 --num-experts 256] [--backend auto|gpu|reference]
    mpirun -n 2 python tests/test_intranode.py

Started alone it relaunches itself under mpiexec (one rank per GPU, or 2 ranks on the CPU reference
backend). Every rank builds every rank's tokens from a shared seed and checks its own results bit
for bit against ``deepep_cupy.reference``: the layout, a BF16 dispatch with top-k and weights, its
combine and a cached dispatch of new data; the same for FP8 (dispatch and cached dispatch); a
dispatch without top-k (routed by ``is_token_in_rank``) and its combine; and a routing with empty
slots, ``expert_alignment=128`` and a bias pair on the combine. Then rank 0 prints the time per
call of the layout, dispatch (BF16 and FP8, normal and cached) and combine with DeepEP's "NVL"
bandwidth: rows this rank receives x row bytes / time (BF16 rows 2 * hidden bytes, FP8 rows
hidden + hidden / 128 * 4; combine counts the BF16 rows). Exit status 1 on any mismatch on any rank.

Under pytest: the same logic on a world of one (in process), and under ``mpiexec -n 2`` (all five
DeepEP-style scripts share one launch: tests/seed_scripts.py), both on the reference backend.
"""

import sys

import seed_scripts as ss

# the pytest runs' sizes (a second or less on the reference backend)
SMALL = ["--num-tokens", "96", "--hidden", "256", "--num-topk", "4", "--num-experts", "16", "--num-tests", "2"]


def build_parser():
    return ss.parser("Test intranode EP dispatch/combine (deepep_cupy's take on DeepEP's tests/test_intranode.py)",
                     num_tokens=4096, hidden=7168, num_topk=8, num_experts=256)


def run(args, ctx) -> list:
    """Check and time on ``ctx``'s communicator; returns this rank's problems (prints from rank 0)."""
    import deepep_cupy as ep
    from deepep_cupy import reference
    R, T, H, K = ctx.num_ranks, args.num_tokens, args.hidden, args.num_topk
    E = ctx.experts(args.num_experts)
    ctx.say(f"[config] num_tokens={T}, hidden={H}, num_topk={K}, num_experts={E}, ranks={R}, backend={ctx.backend}")
    nbytes = ep.Buffer.get_intranode_size_hint(T, H, R, K) if ctx.gpu else 0
    buf = ep.Buffer(ctx.comm, num_nvl_bytes=nbytes, backend=ctx.backend)
    try:
        if ctx.gpu:
            ctx.say(f"[config] buffer: {nbytes / 2**20:.0f} MiB symmetric per rank (Buffer.get_intranode_size_hint)")
        xs, idxs, ws = ss.world_inputs(args.seed, R, T, H, K, E, "random")
        qs, scales = ss.fp8_pairs(xs)
        problems = []

        def report(what, found):
            problems.extend(found)
            ctx.say(f"[testing] {what} ... {'passed' if not found else 'FAILED'}"
                    + ("" if R == 1 else " (rank 0; every rank checks its own)"))

        found, bf16 = ss.dispatch_round(ctx, buf, "BF16 with top-k", xs, idxs, ws, E)
        report("BF16, with top-k: layout, dispatch, combine, cached dispatch", found)
        found, fp8 = ss.dispatch_round(ctx, buf, "FP8 with top-k", qs, idxs, ws, E, scales=scales)
        report("FP8, with top-k: dispatch, cached dispatch", found)
        report("BF16, without top-k (is_token_in_rank only): dispatch, combine",
               ss.rank_mask_round(ctx, buf, "without top-k", xs, idxs, E))
        hx, hidx, hw = ss.world_inputs(args.seed + 7, R, T, H, K, E, "holes")
        bias = ss.bias_pairs(hx)
        found, _ = ss.dispatch_round(ctx, buf, "holes/align128/bias", hx, hidx, hw, E, alignment=128, bias=bias,
                                     cached=False)
        report("BF16, top-k with -1 slots, expert_alignment=128, combine with a bias pair", found)
        ctx.say("")

        # timing: the layout, then each format's dispatch (normal, cached) and the combine, on the routing
        # checked above. Only what one format needs stays alive while it is timed: on the GPU, outputs
        # held by the caller keep their blocks of the receive arena, which has room for two dispatches.
        idx, rows_recv = bf16["kwargs"]["topk_idx"], bf16["num_recv"]
        formats = [("BF16", bf16["x"], bf16["kwargs"], rows_recv * H * 2),
                   ("FP8", fp8["x"], fp8["kwargs"], rows_recv * (H + H // reference.FP8_BLOCK * 4))]
        del bf16, fp8
        avg, lo, hi = ss.avg_min_max(ss.bench(ctx, lambda: buf.get_dispatch_layout(idx, E)))
        rows = [("layout", avg, lo, hi, "")]
        for label, x_in, kwargs, nbytes_moved in formats:
            handle = buf.dispatch(x_in, **kwargs)[4]
            ops = [(f"dispatch {label}", lambda: buf.dispatch(x_in, **kwargs)),
                   (f"dispatch {label} (cached)", lambda: buf.dispatch(x_in, handle=handle))]
            recv_x = None
            if label == "BF16":   # the dispatch's own output passed back, as DeepEP's test does
                recv_x = buf.dispatch(x_in, handle=handle)[0]
                ops.append(("combine BF16", lambda: buf.combine(recv_x, handle)))
            for name, fn in ops:
                avg, lo, hi = ss.avg_min_max(ss.bench(ctx, fn))
                rows.append((name, avg, lo, hi, ss.gbps(nbytes_moved, avg)))
            handle = recv_x = None   # free their arena blocks before the next format
        ctx.say(f"[timing] {ss.backend_note(ctx)}; rank 0 receives {rows_recv} rows; {ctx.num_tests} calls each")
        ss.table(ctx, ("op", "avg us", "min us", "max us", "NVL GB/s"), rows)
        ctx.say("")
        return problems
    finally:
        buf.destroy()


def test_intranode_in_process():
    """The script's checks on one rank (MPI.COMM_SELF), reference backend, small sizes."""
    ss.run_in_process(sys.modules[__name__])


@ss.mark.mpi
@ss.mark.mpi_session(2)
def test_intranode_under_mpiexec():
    """The script's small case on 2 ranks, in the shared mpiexec launch of tests/seed_scripts.py."""
    ss.check_under_mpiexec("test_intranode")


if __name__ == "__main__":
    sys.exit(ss.script_main(sys.modules[__name__]))
