#!/usr/bin/env python3
"""DeepEP's tests/test_internode.py for deepep_cupy: the hierarchical dispatch and combine (RDMA
between nodes, then NVLink inside a node), with one host split into "nodes".

    python tests/test_internode.py [--num-processes 2] [--ranks-per-node 1] [--num-tokens 4096
                                    --hidden 7168 --num-topk 8 --num-experts 256 --num-topk-groups 2]
    mpirun -n 4 python tests/test_internode.py --ranks-per-node 2     # two "nodes" of two ranks

``--ranks-per-node`` (default: half the ranks) makes ``Buffer(ranks_per_node=...)`` treat one host
as several nodes, so the internode path runs on one machine (scripts/demo.py --ranks-per-node does
the same); with one rank there is one node and the intranode path runs. Routing as in DeepEP's test:
each token's top-k experts lie on at most ``--num-topk-groups`` nodes (default min(nodes, 4)).

Checks, bit for bit against ``deepep_cupy.reference`` on every rank: the layout (with
``num_tokens_per_rdma_rank``), a BF16 dispatch with top-k and weights, its combine with a bias pair
(on the GPU's hierarchical path the combine rounds once per node and once more, so its oracle is the
reference combine taken node by node, as in tests/gpu/test_internode_gpu.py), a cached dispatch;
FP8; a dispatch without top-k; a routing with empty slots and ``expert_alignment=128``. Then rank 0
prints the time per call with DeepEP's two figures: "RDMA" GB/s, the (token, node) pairs this rank
sends to nodes holding one of its experts (DeepEP's ``num_rdma_token_sent``, its own node included)
x row bytes / time, and "NVL" GB/s, the rows this rank receives x row bytes / time. When the "nodes"
share a host, NVSHMEM carries the RDMA stage over NVLink too. Exit status 1 on any mismatch.

Under pytest: one rank in process (one node), and 2 ranks (two nodes of one) in the shared mpiexec
launch of tests/seed_scripts.py, on the reference backend.
"""

import sys

import seed_scripts as ss

SMALL = ["--num-tokens", "96", "--hidden", "256", "--num-topk", "4", "--num-experts", "16", "--num-tests", "2"]


def build_parser():
    ap = ss.parser("Test internode EP dispatch/combine (deepep_cupy's take on DeepEP's tests/test_internode.py)",
                   num_tokens=4096, hidden=7168, num_topk=8, num_experts=256)
    ap.add_argument("--ranks-per-node", type=int, default=None,
                    help="ranks per simulated node (default: half the ranks, so two nodes; 1 rank: one node)")
    ap.add_argument("--num-topk-groups", type=int, default=None,
                    help="nodes a token's experts may span (default: min(nodes, 4), as DeepEP)")
    return ap


def run(args, ctx) -> list:
    import deepep_cupy as ep
    from deepep_cupy import reference
    R, T, H, K = ctx.num_ranks, args.num_tokens, args.hidden, args.num_topk
    L = args.ranks_per_node or (R // 2 if R >= 2 and R % 2 == 0 else R)
    if L < 1 or R % L:
        return [f"--ranks-per-node {L}: expected a divisor of the {R} ranks"]
    nodes = R // L
    E = ctx.experts(args.num_experts)
    groups = args.num_topk_groups or min(nodes, 4)
    ctx.say(f"[config] num_tokens={T}, hidden={H}, num_topk_groups={groups}, num_topk={K}, num_experts={E}, "
            f"ranks={R} in {nodes} node(s) of {L}, backend={ctx.backend}")
    if nodes == 1:
        ctx.say("[config] one node: the intranode path runs (launch an even number of ranks for two nodes)")
    if ctx.gpu:
        nvl, rdma = ep.Buffer.get_internode_size_hint(T, H, R, L, K) if nodes > 1 else \
            (ep.Buffer.get_intranode_size_hint(T, H, R, K), 0)
        buf = ep.Buffer(ctx.comm, num_nvl_bytes=nvl, num_rdma_bytes=rdma, ranks_per_node=L, backend="gpu")
        ctx.say(f"[config] buffer: NVL {nvl / 2**20:.0f} MiB + RDMA {rdma / 2**20:.0f} MiB symmetric per rank "
                "(Buffer.get_internode_size_hint)")
    else:
        buf = ep.Buffer(ctx.comm, ranks_per_node=L, backend=ctx.backend)
    try:
        # the GPU's hierarchical combine rounds per node; one node, or the reference backend: once
        oracle = ss.two_level_oracle(L) if ctx.gpu and buf.num_nodes > 1 else ss.rank_order_oracle
        route = ss.grouped_route(K, E, nodes, groups)
        xs, idxs, ws = ss.world_inputs(args.seed, R, T, H, K, E, route=route)
        qs, scales = ss.fp8_pairs(xs)
        problems = []

        def report(what, found):
            problems.extend(found)
            ctx.say(f"[testing] {what} ... {'passed' if not found else 'FAILED'}"
                    + ("" if R == 1 else " (rank 0; every rank checks its own)"))

        found, bf16 = ss.dispatch_round(ctx, buf, "BF16 with top-k", xs, idxs, ws, E, bias=ss.bias_pairs(xs),
                                        oracle=oracle)
        report("BF16, with top-k: layout, dispatch, combine with a bias pair, cached dispatch", found)
        found, fp8 = ss.dispatch_round(ctx, buf, "FP8 with top-k", qs, idxs, ws, E, scales=scales, oracle=oracle)
        report("FP8, with top-k: dispatch, cached dispatch", found)
        report("BF16, without top-k (is_token_in_rank only): dispatch, combine",
               ss.rank_mask_round(ctx, buf, "without top-k", xs, idxs, E, oracle=oracle))
        hx, hidx, hw = ss.world_inputs(args.seed + 7, R, T, H, K, E, "holes")
        found, _ = ss.dispatch_round(ctx, buf, "holes/align128", hx, hidx, hw, E, alignment=128, oracle=oracle,
                                     cached=False)
        report("BF16, top-k with -1 slots, expert_alignment=128", found)
        ctx.say("")

        kwargs = bf16["kwargs"]
        idx = kwargs["topk_idx"]
        per_rdma = kwargs["num_tokens_per_rdma_rank"]
        rdma_tokens = int(ctx.host(per_rdma).sum()) if per_rdma is not None else 0
        rows_recv = bf16["num_recv"]
        fp8_row = H + H // reference.FP8_BLOCK * 4
        ops = [
            ("layout", lambda: buf.get_dispatch_layout(idx, E), 0),
            ("dispatch BF16", lambda: buf.dispatch(bf16["x"], **kwargs), 2 * H),
            ("dispatch BF16 (cached)", lambda: buf.dispatch(bf16["x"], handle=bf16["handle"]), 2 * H),
            ("dispatch FP8", lambda: buf.dispatch(fp8["x"], **fp8["kwargs"]), fp8_row),
            ("dispatch FP8 (cached)", lambda: buf.dispatch(fp8["x"], handle=fp8["handle"]), fp8_row),
            ("combine BF16", lambda: buf.combine(bf16["recv_x"], bf16["handle"]), 2 * H),
        ]
        rows = []
        for name, fn, row_bytes in ops:
            avg, lo, hi = ss.avg_min_max(ss.bench(ctx, fn))
            rdma = ss.gbps(rdma_tokens * row_bytes, avg) if row_bytes and nodes > 1 else ""
            nvl = ss.gbps(rows_recv * row_bytes, avg) if row_bytes else ""
            rows.append((name, avg, lo, hi, rdma, nvl))
        ctx.say(f"[timing] {ss.backend_note(ctx)}; rank 0 sends {rdma_tokens} (token, node) pairs over RDMA and "
                f"receives {rows_recv} rows; {ctx.num_tests} calls each")
        ss.table(ctx, ("op", "avg us", "min us", "max us", "RDMA GB/s", "NVL GB/s"), rows)
        ctx.say("")
        return problems
    finally:
        buf.destroy()


def test_internode_in_process():
    """The script's checks on one rank (one node: the intranode path), reference backend."""
    ss.run_in_process(sys.modules[__name__])


@ss.mark.mpi
@ss.mark.mpi_session(2)
def test_internode_under_mpiexec():
    """Two ranks as two nodes of one, in the shared mpiexec launch of tests/seed_scripts.py."""
    ss.check_under_mpiexec("test_internode")


if __name__ == "__main__":
    sys.exit(ss.script_main(sys.modules[__name__]))
