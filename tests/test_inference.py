#!/usr/bin/env python3
"""Decode latency: low-latency dispatch + combine over batch sizes and hidden sizes, with and
without the receive hook.

    python tests/test_inference.py [--num-processes 2] [--batch-size 1,8,32,64,128]
                                   [--hidden-size 2048,4096,7168] [--num-topk 8 --num-experts 288]
    mpirun -n 2 python tests/test_inference.py --batch_size 128 --hidden_size 7168

One decode step of an MoE layer per rank: an FP8 ``low_latency_dispatch`` of ``batch`` tokens to
their top-k experts, then the weighted BF16 ``low_latency_combine`` of the experts' outputs (here the
dequantized rows they received). One buffer for the whole sweep, sized for the largest batch and
hidden size (``num_max_dispatch_tokens_per_rank`` = ``--num-tokens``, default the largest batch, as a
serving engine fixes it); a change of hidden size re-lays it. For every (hidden, batch) the step is
first checked bit for bit against ``deepep_cupy.reference`` (dispatch and combine, once without and
once with the hook), then timed: dispatch, combine and the whole step called plainly; and the step
with ``return_recv_hook=True``, each half timed on its own (send: the call returns once the sends are
issued; recv: ``hook()``), the step total being the four halves back to back. Rank 0 prints one row
per (hidden, batch). Exit status 1 on any mismatch on any rank.

Under pytest: one rank in process and 2 ranks in the shared mpiexec launch of tests/seed_scripts.py,
on the reference backend, with a small sweep.
"""

import sys

import seed_scripts as ss

SMALL = ["--batch-size", "1,16", "--hidden-size", "256,512", "--num-topk", "4", "--num-experts", "16",
         "--num-tests", "2"]


def int_list(text: str) -> list:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"expected positive integers, got {text!r}")
    return values


def build_parser():
    ap = ss.parser("Decode latency of low-latency dispatch + combine over batch and hidden sizes (deepep_cupy)",
                   num_topk=8, num_experts=288)
    ap.add_argument("--batch-size", "--batch_size", type=int_list, default=[1, 8, 32, 64, 128],
                    help="tokens per rank per decode step, comma-separated (default: 1,8,32,64,128)")
    ap.add_argument("--hidden-size", "--hidden_size", type=int_list, default=[2048, 4096, 7168],
                    help="hidden sizes, comma-separated multiples of 128 up to 8192 (default: 2048,4096,7168)")
    ap.add_argument("--num-tokens", type=int, default=None,
                    help="num_max_dispatch_tokens_per_rank (default: the largest --batch-size)")
    return ap


def run(args, ctx) -> list:
    import deepep_cupy as ep
    R, me, K = ctx.num_ranks, ctx.rank, args.num_topk
    E = ctx.experts(args.num_experts)
    batches, hiddens = sorted(set(args.batch_size)), sorted(set(args.hidden_size))
    M = args.num_tokens or max(batches)
    if M < max(batches):
        return [f"--num-tokens {M} is smaller than the largest --batch-size {max(batches)}"]
    hint = ep.Buffer.get_low_latency_rdma_size_hint(M, max(hiddens), R, E)
    ctx.say(f"[config] batch sizes {batches}, hidden sizes {hiddens}, num_topk={K}, num_experts={E}, ranks={R}, "
            f"num_max_dispatch_tokens_per_rank={M}, backend={ctx.backend}; buffer {hint / 1e6:.1f} MB per rank")
    buf = ep.Buffer(ctx.comm, num_rdma_bytes=hint, low_latency_mode=True, backend=ctx.backend)
    problems, rows = [], []
    try:
        for H in hiddens:
            for B in batches:
                xs, idxs, ws = ss.ll_inputs(args.seed + B + H, R, B, H, K, E)
                x, idx, w = ctx.dev(xs[me]), ctx.dev(idxs[me]), ctx.dev(ws[me])
                mine, want = ss.ll_reference(xs, idxs, ws, me, M, E)
                y = ctx.dev(ss.simulated_gemm(mine))
                found = []
                for hook_mode in (False, True):
                    tag = f"B={B} H={H} {'with' if hook_mode else 'without'} hook"
                    recv, count, handle, _, hook = buf.low_latency_dispatch(x, idx, M, E, use_fp8=True,
                                                                            return_recv_hook=hook_mode)
                    if hook_mode:
                        hook()
                    found += ss.ll_dispatch_problems(ctx, tag, (recv, count, handle), mine, True)
                    out, _, hook = buf.low_latency_combine(y, idx, w, handle, return_recv_hook=hook_mode)
                    if hook_mode:
                        hook()
                    if not ss.same_bits(ctx.host(out), want):
                        found.append(f"{tag}: combine differs from the reference")
                problems += found

                latest, pending = {}, []

                def dispatch():
                    latest["handle"] = buf.low_latency_dispatch(x, idx, M, E, use_fp8=True)[2]

                def combine():
                    buf.low_latency_combine(y, idx, w, latest["handle"])

                def dispatch_send():
                    pending.append(buf.low_latency_dispatch(x, idx, M, E, use_fp8=True, return_recv_hook=True)[4])

                def combine_send():
                    pending.append(buf.low_latency_combine(y, idx, w, latest["handle"], return_recv_hook=True)[2])

                receive = lambda: pending.pop()()
                t = {}
                for name, fn, before, after in (
                        ("dispatch", dispatch, None, None), ("combine", combine, None, None),
                        ("step", lambda: (dispatch(), combine()), None, None),
                        ("d send", dispatch_send, None, receive), ("d recv", receive, dispatch_send, None),
                        ("c send", combine_send, dispatch, receive),
                        ("c recv", receive, lambda: (dispatch(), combine_send()), None)):
                    t[name] = ss.avg_min_max(ss.bench(ctx, fn, before=before, after=after))[0]
                hooked = t["d send"] + t["d recv"] + t["c send"] + t["c recv"]
                rows.append((B, H, t["dispatch"], t["combine"], t["step"], t["d send"], t["d recv"], t["c send"],
                             t["c recv"], hooked, "ok" if not found else "MISMATCH"))
                ctx.say(f"[testing] batch {B}, hidden {H}: FP8 dispatch + BF16 combine, with and without the hook "
                        f"... {'passed' if not found else 'FAILED'}")
        ctx.say("")
        ctx.say(f"[timing] {ss.backend_note(ctx)}; avg us of {ctx.num_tests} calls; rank 0's view")
        ss.table(ctx, ("batch", "hidden", "dispatch", "combine", "step", "hook: d send", "d recv", "c send",
                       "c recv", "hook step", "check"), rows)
        ctx.say("")
        return problems
    finally:
        buf.destroy()


def test_inference_in_process():
    """The script's sweep on one rank (MPI.COMM_SELF), reference backend, small sizes."""
    ss.run_in_process(sys.modules[__name__])


@ss.mark.mpi
@ss.mark.mpi_session(2)
def test_inference_under_mpiexec():
    """The script's small sweep on 2 ranks, in the shared mpiexec launch of tests/seed_scripts.py."""
    ss.check_under_mpiexec("test_inference")


if __name__ == "__main__":
    sys.exit(ss.script_main(sys.modules[__name__]))
