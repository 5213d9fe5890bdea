#!/usr/bin/env python3
"""Benchmark high-throughput dispatch/combine inside one node or across nodes; prints a table.

    mpirun -n 2 python scripts/bench_intranode.py [--tokens 4096 --hidden 7168 --topk 8
                                                    --experts 256 --sms 8,16,24]
    mpirun -n 4 python scripts/bench_intranode.py --ranks-per-node 2     (hierarchical: 2 nodes of 2)

For each SM budget: dispatch BF16 and FP8 (normal, and cached with a handle as in DeepEP's tuning
sweep) and combine BF16, timed DeepEP's way (L2 flushed, CUDA events around each call, median of
many calls after warm-up), and NCCL all-to-all (PyTorch all_to_all_single) moving the same rows,
for comparison. Rows are bf16 (hidden x 2 bytes) or FP8 (hidden + hidden/128 x 4 bytes of scales);
combine always counts bf16 rows. Columns (all per rank, in GB/s = bytes / median time):

  * "DeepEP NVL GB/s" (DeepEP's metric, ../shared/ANCHORS.md; its internode test prints the same
    figure as "NVL"): rows this rank receives in dispatch (own tokens included) x row bytes; combine
    counts the same rows.
  * "NVLink GB/s": rows written over NVLink into this GPU.
      one node: dispatch, the rows it receives from other ranks; combine, the copies of its own
      tokens coming back from other ranks (the rows it sent in dispatch).
      --ranks-per-node (NVLink stage only): dispatch, the rows it receives from the other
      forwarders of its node (those of sources whose local index differs from its own); combine,
      the copies coming back to it as a forwarder (the rows it forwarded to other ranks of its node).
  * "RDMA GB/s" (--ranks-per-node only): rows of this rank's tokens that cross between nodes: for
    each token, the number of OTHER nodes holding at least one of its experts (node of expert e =
    e // (experts / nodes)); dispatch sends them to those nodes' forwarders, combine gets the node
    sums back. DeepEP's test_internode counts every node with an expert, its own included, so its
    "RDMA" figure is higher for the same run. When the "nodes" share one host (a smaller
    --ranks-per-node than the host's rank count) NVSHMEM carries these puts over NVLink too.
  * "vs DeepEP" (one node only): median time / DeepEP v1.2.1's time on the same machine.
  * "host us": the median host time of the Python call (a non-cached dispatch includes its wait
    for the receive count).
  * "SM MB", "GB/s/SM" (one node only): the bytes this rank's SMs read and write in the operation
    (``sm_bytes``), and those bytes / median time / SMs: how hard each SM works.
  * ``--dispatch-kernels``: the dispatch rows of every kernel named, the first unmarked and the
    others as "[staged]" etc., in one run (old and new side by side).
  * NCCL row: bytes received from all other ranks (any link), in the NVLink column.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DEEPEP = {"dispatch_fp8": 258.0, "dispatch_bf16": 353.0, "combine_bf16": 403.0}   # us, same machine, one node


def sm_bytes(op, tokens_sent, own_rows, sent_remote, recv_remote, row_bytes, pull=False):
    """Bytes one rank's SMs read and write in ``op`` (one node), from the rows it moves:
    ``tokens_sent`` tokens with at least one destination, ``own_rows`` rows that stay on the rank,
    ``sent_remote`` rows it sends to (and in combine gets back from) other ranks, ``recv_remote``
    rows it receives from them. docs/intranode.md explains each term.

      dispatch, direct: x read once a token; each row written once where it belongs.
      dispatch, staged: x read once a destination; own rows written into recv_x, remote rows into the
          peers' staging; the receiver reads its staging rows and writes them into recv_x.
      combine: the rows received in dispatch, sent back (read x, write the peer's staging); then the
          reduce reads own rows in place and the staging rows, and writes one row a token.
          ``pull`` (x in the arena): no send back; the reduce reads the peers' rows in place."""
    if op.startswith("combine"):
        return ((0 if pull else 2 * recv_remote) + own_rows + sent_remote + tokens_sent) * row_bytes
    if "[staged]" in op:
        return (2 * (own_rows + sent_remote) + 2 * recv_remote) * row_bytes
    return (tokens_sent + own_rows + sent_remote) * row_bytes


def parse_dispatch_kind(kind: str):
    """A --dispatch-kernels entry as (intranode_dispatch, intranode_copy, intranode_notify), or None
    when it names no kind: "staged", "direct" (the direct kernel, register copies) or
    "direct-<path>", the direct kernel with settings.intranode_copy = <path>: "direct-registers8"
    (8 loads a lane in flight), "direct-tma" / "direct-tma-grid" (TMA bulk copies over block ranges /
    grid-strided); a "+notify-kernel" suffix: settings.intranode_notify = "kernel" (fresh dispatches
    run the notify kernel first instead of the fused count exchange)."""
    from deepep_cupy.intranode import COPY_PATHS
    base, _, notify = kind.partition("+notify-")
    copy = base.removeprefix("direct-") if base.startswith("direct-") else "registers"
    if base not in ("direct", "staged") and not base.startswith("direct-") or copy not in COPY_PATHS \
            or notify not in ("", "kernel"):
        return None
    return ("direct" if base.startswith("direct") else base), copy, notify or "fused"


def use_dispatch_kernel(settings, kind: str) -> None:
    """Select a --dispatch-kernels entry (``parse_dispatch_kind``)."""
    settings.intranode_dispatch, settings.intranode_copy, settings.intranode_notify = parse_dispatch_kind(kind)


def rows_to_other_nodes(topk, num_experts, num_nodes, node):
    """Rows of one rank's tokens that cross between nodes (host side, numpy): for each token, the
    number of nodes other than ``node`` holding at least one of its experts (``topk`` int [T, K],
    -1 = no expert; node of expert e = e // (num_experts // num_nodes))."""
    import numpy as np
    topk = np.asarray(topk)
    dest = np.where(topk >= 0, topk // (num_experts // num_nodes), num_nodes)   # num_nodes: no expert
    hit = np.zeros((topk.shape[0], num_nodes + 1), dtype=bool)
    hit[np.arange(topk.shape[0])[:, None], dest] = True
    hit[:, [node, num_nodes]] = False
    return int(hit.sum())


def nvlink_stage_rows(counts, rank, ranks_per_node):
    """Rows the NVLink stage of the hierarchical path writes into ``rank``'s GPU.

    ``counts[s][d]``: rows source rank s sends to rank d (tokens of s with an expert on d). A row
    from s to d is forwarded inside d's node by the rank of that node with s's local index.
    Returns (dispatch: rows from the other forwarders of its node, combine: rows it forwarded to
    the other ranks of its node, which come back to it)."""
    L = ranks_per_node
    node, local = divmod(rank, L)
    R = len(counts)
    into = sum(int(counts[s][rank]) for s in range(R) if s % L != local)
    back = sum(int(counts[s][d]) for s in range(R) if s % L == local
               for d in range(node * L, node * L + L) if d != rank)
    return into, back


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--sms", default="8,16,24,32")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--no-nccl", action="store_true")
    ap.add_argument("--dispatch-kernels", default="direct,direct+notify-kernel,direct-tma,staged",
                    help="dispatch kernels to time side by side (one node only): direct (one copy per "
                         "row into the receivers' arenas, 16-byte register copies, the fused count "
                         "exchange), direct-<path> (the same kernel with settings.intranode_copy = "
                         "<path>: direct-registers8, direct-tma, direct-tma-grid), a +notify-kernel "
                         "suffix (fresh dispatches run the notify kernel first) and staged (the earlier "
                         "kernel, two copies); the first is also the one combine follows")
    ap.add_argument("--ranks-per-node", type=int, default=None,
                    help="ranks per node; fewer than the rank count benchmarks the hierarchical "
                         "(internode) path with the ranks split into nodes of this many "
                         "(default: all ranks on one node)")
    args = ap.parse_args()
    for kind in args.dispatch_kernels.split(","):   # before any GPU work: a typo costs no device time
        if parse_dispatch_kind(kind) is None:
            ap.error(f"--dispatch-kernels: unknown kind {kind!r}")

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
    L = args.ranks_per_node
    if L is not None and (L < 1 or R % L or (R // L > 1 and E % (R // L))):
        say(f"--ranks-per-node {L}: expected a divisor of the {R} ranks (and of --experts {E})")
        sys.exit(2)
    internode = L is not None and L < R
    if internode:
        num_nodes = R // L
        nvl_bytes, rdma_bytes = ep.Buffer.get_internode_size_hint(T, H, R, L, K)
        buf = ep.Buffer(comm, num_nvl_bytes=nvl_bytes, num_rdma_bytes=rdma_bytes, ranks_per_node=L,
                        backend="gpu")
        say(f"buffer: NVL {nvl_bytes / 2**20:.0f} MiB + RDMA {rdma_bytes / 2**20:.0f} MiB symmetric per rank "
            f"(Buffer.get_internode_size_hint, {num_nodes} nodes of {L} ranks)")
    else:
        nbytes = ep.Buffer.get_intranode_size_hint(T, H, R, K)
        if L is None:
            buf = ep.Buffer(comm, num_nvl_bytes=nbytes, backend="gpu")
        else:
            buf = ep.Buffer(comm, num_nvl_bytes=nbytes, ranks_per_node=L, backend="gpu")
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
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
    in_rank_host = cp.asnumpy(in_rank)
    sent_remote = int(in_rank_host[:, [j for j in range(R) if j != rank]].sum())
    recv_counts = comm.allgather(in_rank_host.sum(axis=0))        # [src][dst]
    recv_rows = int(sum(c[rank] for c in recv_counts))
    recv_remote = int(sum(c[rank] for s, c in enumerate(recv_counts) if s != rank))
    own_rows = int(in_rank_host[:, rank].sum())
    tokens_sent = int(in_rank_host.any(axis=1).sum())
    bf16_row, fp8_row = H * 2, H + H // 128 * 4
    if internode:
        rdma_rows = rows_to_other_nodes(topk, E, num_nodes, rank // L)
        nvl_into, nvl_back = nvlink_stage_rows(recv_counts, rank, L)
        say(f"{T} tokens/rank, hidden {H}, top-{K} of {E}, {R} ranks in {num_nodes} nodes of {L}: rank 0 "
            f"receives {recv_rows} rows ({nvl_into} over NVLink from other forwarders), sends {rdma_rows} to "
            f"other nodes (RDMA), forwards {nvl_back} to other ranks of its node")
    else:
        say(f"{T} tokens/rank, hidden {H}, top-{K} of {E}, {R} ranks: rank 0 receives {recv_rows} rows "
            f"({recv_remote} over NVLink), sends {sent_remote} over NVLink")

    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    if internode:
        layout["num_tokens_per_rdma_rank"] = per_rdma
    ep.settings.check_values = False      # DeepEP checks nothing; time the same work
    rows = []
    host_times = {}
    counter = [0]
    for sms in [int(s) for s in args.sms.split(",")]:
        cfg = ep.Config(num_sms=sms)

        def disp(x, cached=False):
            def run():
                counter[0] += 1
                xi = x[counter[0] % len(x)]
                if cached:
                    return buf.dispatch(xi, handle=handle_box[0], config=cfg)
                return buf.dispatch(xi, topk_idx=idx, topk_weights=weights, config=cfg, **layout)
            return run

        handle_box = [None]
        results = {}
        kinds = ["direct"] if internode else args.dispatch_kernels.split(",")
        for kind in kinds:
            use_dispatch_kernel(ep.settings, kind)
            suffix = "" if kind == kinds[0] else f"[{kind}]"
            say(f"  num_sms={sms}, {kind} dispatch: timing ...")
            handle_box[0] = buf.dispatch(xs[0], topk_idx=idx, topk_weights=weights, config=cfg, **layout)[4]
            for name, fn in (("dispatch_bf16", disp(xs)), ("dispatch_bf16_cached", disp(xs, True)),
                             ("dispatch_fp8", disp(fp8s)), ("dispatch_fp8_cached", disp(fp8s, True))):
                host_times[name + suffix] = []
                # a fresh direct dispatch queues its data kernel before the host's poll unless the arena
                # cannot hold its worst-case blocks; then the GPU waits for the poll (count the calls)
                ahead = []
                track = (not internode and kind.startswith("direct") and "cached" not in name)
                after = (lambda: ahead.append(buf._backend.intranode().last_dispatch_ahead)) if track else None
                results[name + suffix] = time_calls(fn, num_tests=args.iters, host_us=host_times[name + suffix],
                                                    after=after)
                if track:   # (`after` also runs after the warm-ups: count the timed calls only)
                    timed = ahead[-args.iters:]
                    say(f"    {name}: data kernel queued before the poll in {sum(timed)} of {len(timed)} timed calls")
        use_dispatch_kernel(ep.settings, kinds[0])
        handle_box[0] = buf.dispatch(xs[0], topk_idx=idx, topk_weights=weights, config=cfg, **layout)[4]
        recv_x = buf.dispatch(xs[0], handle=handle_box[0], config=cfg)[0]
        host_times["combine_bf16"] = []
        # recv_x is the dispatch's arena output, as DeepEP's test passes it back: the pull combine
        results["combine_bf16"] = time_calls(lambda: buf.combine(recv_x, handle_box[0], config=cfg),
                                             num_tests=args.iters, host_us=host_times["combine_bf16"])
        pulled = {"combine_bf16": not internode and buf._backend.intranode().last_combine_pull}
        # the same rows in ordinary memory (an expert output a GEMM allocated): the push combine
        if not internode:
            plain_x = recv_x.copy()
            host_times["combine_bf16[push]"] = []
            results["combine_bf16[push]"] = time_calls(lambda: buf.combine(plain_x, handle_box[0], config=cfg),
                                                       num_tests=args.iters, host_us=host_times["combine_bf16[push]"])
        for name, samples in results.items():
            med = summarize(samples)[0]
            row_bytes = fp8_row if "fp8" in name else bf16_row
            deepep_metric = recv_rows * row_bytes / med / 1e3          # GB/s
            if internode:
                nvlink = (nvl_into if "dispatch" in name else nvl_back) * row_bytes / med / 1e3
                rdma = rdma_rows * row_bytes / med / 1e3
            else:
                nvlink = (recv_remote if "dispatch" in name else sent_remote) * row_bytes / med / 1e3
                rdma = None
            pull = pulled.get(name, False)
            moved = sm_bytes(name, tokens_sent, own_rows, sent_remote, recv_remote, row_bytes, pull)
            rows.append((sms, name, samples, deepep_metric, nvlink, rdma, summarize(host_times[name])[0], moved))

    nccl_rows = []
    if not args.no_nccl:
        one_host = True    # the NCCL comparison meets at 127.0.0.1
        if internode:
            local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
            one_host = comm.allreduce(local.Get_size(), op=MPI.MIN) == R
            local.Free()
        if not one_host:
            say("NCCL comparison skipped: the ranks span more than one host")
        else:
            try:
                nccl_rows = nccl_all_to_all(comm, in_rank_host, H, args.iters)
            except Exception as e:  # noqa: BLE001 - report and carry on
                say(f"NCCL comparison skipped: {type(e).__name__}: {e}")

    say("")
    if internode:
        say(f"{'SMs':>4} {'op':22s} {'median (p10-p90)':34s} {'DeepEP NVL GB/s':>16} {'NVLink GB/s':>12} "
            f"{'RDMA GB/s':>10} {'host us':>8}")
        for sms, name, samples, m1, m2, m3, hst, _ in rows:
            say(f"{sms:>4} {name:22s} {fmt_us(samples):34s} {m1:16.1f} {m2:12.1f} {m3:10.1f} {hst:8.1f}")
    else:
        say(f"{'SMs':>4} {'op':28s} {'median (p10-p90)':34s} {'DeepEP NVL GB/s':>16} {'NVLink GB/s':>12} "
            f"{'vs DeepEP':>10} {'host us':>8} {'SM MB':>7} {'GB/s/SM':>8}")
        for sms, name, samples, m1, m2, _, hst, moved in rows:
            base = DEEPEP.get(name.split("[")[0].replace("_cached", ""))
            ratio = f"{summarize(samples)[0] / base:.2f}x" if base else ""
            per_sm = moved / summarize(samples)[0] / 1e3 / sms
            say(f"{sms:>4} {name:28s} {fmt_us(samples):34s} {m1:16.1f} {m2:12.1f} {ratio:>10} {hst:8.1f} "
                f"{moved / 1e6:7.1f} {per_sm:8.1f}")
    for name, samples, gbps in nccl_rows:
        say(f"{'':>4} {name:22s} {fmt_us(samples):34s} {'':>16} {gbps:12.1f}")
    say("")
    if internode:
        say(f"SUMMARY bench_internode ({num_nodes} nodes of {L} ranks, {T} tokens/rank, hidden {H}, "
            f"top-{K} of {E}; no DeepEP internode figure measured here)")
    else:
        say("SUMMARY bench_intranode (DeepEP v1.2.1: dispatch FP8 258 us, BF16 353 us, combine 403 us)")
    best = {}
    for sms, name, samples, m1, m2, m3, _, _ in rows:
        med = summarize(samples)[0]
        if name not in best or med < best[name][0]:
            best[name] = (med, sms, m2, m3)
    for name, (med, sms, m2, m3) in best.items():
        rdma = "" if m3 is None else f"  RDMA {m3:6.1f} GB/s"
        say(f"  {name:22s} {med:8.1f} us at {sms} SMs  NVLink {m2:6.1f} GB/s{rdma}")
    buf.destroy()


if __name__ == "__main__":
    main()
