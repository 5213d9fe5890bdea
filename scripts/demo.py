#!/usr/bin/env python3
"""The main job: a dispatch/combine demo with a check, on the GPUs when present, else on the CPU.

    python scripts/demo.py            # launches itself under mpiexec (one rank per GPU, or 2 on CPUs)
    mpirun -n 2 python scripts/demo.py

On every rank it routes a batch of tokens to top-k experts and checks the dispatch layout against
the numpy reference model, then dispatches and combines and checks that every token comes back as
the sum of its copies with its weights intact. On the GPUs it first runs the symmetric-memory
exchange (NVSHMEM puts + NVLink stores between all ranks).
Exit code 0 only if every check passed on every rank; the last line starts with "DEMO".
"""

import argparse
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def launched_by_mpi() -> bool:
    return any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_RANK", "PMIX_RANK",
                                         "MPI_LOCALNRANKS", "HYDI_CONTROL_FD"))


def relaunch(num_ranks: int) -> int:
    """Re-run this script under mpiexec with ``num_ranks`` ranks."""
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    import shutil
    mpiexec = here if os.path.isfile(here) else (shutil.which("mpiexec") or shutil.which("mpirun"))
    if mpiexec is None:
        print("no mpiexec found: running on 1 rank (pip install mpich for more)", flush=True)
        return -1
    cmd = [mpiexec, "-n", str(num_ranks), sys.executable, os.path.abspath(__file__), *sys.argv[1:]]
    version = subprocess.run([mpiexec, "--version"], capture_output=True, text=True).stdout
    if "Open MPI" in version or "OpenRTE" in version:   # Open MPI refuses root and tight slots
        cmd[1:1] = ["--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    print("launching:", " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def main() -> int:
    ap = argparse.ArgumentParser(description="deepep_cupy demo and check")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--backend", default="auto", choices=("auto", "gpu", "reference"))
    ap.add_argument("--ranks", type=int, default=0, help="ranks when self-launching (default: GPUs, or 2)")
    ap.add_argument("--ranks-per-node", type=int, default=None,
                    help="fewer than the rank count makes one host act as several nodes, so dispatch and "
                         "combine take the hierarchical (internode) path")
    args = ap.parse_args()

    if not launched_by_mpi():
        from deepep_cupy import discovery
        n = args.ranks or discovery.gpu_count() or 2
        rc = relaunch(n)
        if rc >= 0:
            return rc

    import numpy as np
    from mpi4py import MPI
    import deepep_cupy as ep
    from deepep_cupy import reference

    comm = MPI.COMM_WORLD
    rank, num_ranks = comm.Get_rank(), comm.Get_size()
    log = lambda msg: print(f"[rank {rank}/{num_ranks}] {msg}", flush=True)
    experts = args.experts - args.experts % num_ranks or num_ranks
    checks = []

    per_node = args.ranks_per_node
    if per_node is not None and per_node < num_ranks:   # the hierarchical path needs both regions
        nvl_bytes, rdma_bytes = ep.Buffer.get_internode_size_hint(args.tokens, args.hidden, num_ranks, per_node,
                                                                  args.topk)
    else:
        nvl_bytes = max(8 << 20, ep.Buffer.get_intranode_size_hint(args.tokens, args.hidden, num_ranks, args.topk))
        rdma_bytes = 0
    ll_tokens = min(128, args.tokens)
    ll_bytes = ep.Buffer.get_low_latency_rdma_size_hint(ll_tokens, args.hidden, num_ranks, experts)
    # two buffers, as with DeepEP: high-throughput, and low-latency (whose RDMA region is its own)
    with ep.Buffer(comm, num_nvl_bytes=nvl_bytes, num_rdma_bytes=rdma_bytes, ranks_per_node=per_node,
                   backend=args.backend) as buf, \
            ep.Buffer(comm, num_rdma_bytes=ll_bytes, low_latency_mode=True, backend=args.backend) as ll_buf:
        log(f"Buffer up: backend={buf.backend_name}, {buf.num_nodes} node(s) x {buf.ranks_per_node} ranks")
        if buf.backend_name == "gpu":
            from deepep_cupy import selftest
            report = selftest.symmetric_exchange(buf, num_bytes=2 << 20)
            log(f"symmetric exchange: {report}")
            checks.append(("symmetric exchange", report.ok))

        rng = np.random.default_rng(1234 + rank)
        topk_idx = np.argsort(rng.random((args.tokens, experts)), axis=1)[:, :args.topk].astype(np.int64)
        topk_idx[rng.random(topk_idx.shape) < 0.1] = -1
        if buf.backend_name == "gpu":
            import cupy as cp
            outs = buf.get_dispatch_layout(cp.asarray(topk_idx), experts)
            outs = [None if o is None else cp.asnumpy(o) for o in outs[:4]]
        else:
            outs = list(buf.get_dispatch_layout(topk_idx, experts)[:4])
        want = reference.get_dispatch_layout(topk_idx, experts, num_ranks,
                                             buf.ranks_per_node if buf.num_nodes > 1 else None)
        ok = all((a is None and b is None) or np.array_equal(a, b) for a, b in zip(outs, want))
        log(f"layout: tokens per rank {outs[0].tolist()} -> {'OK' if ok else 'MISMATCH'}")
        checks.append(("layout", ok))

        # dispatch + combine (GPU kernels or the reference backend): every token comes back as the
        # sum of its copies, i.e. x times the number of ranks it went to; weights come back whole
        import ml_dtypes
        x = rng.standard_normal((args.tokens, args.hidden)).astype(np.float32).astype(ml_dtypes.bfloat16)
        weights = rng.random(topk_idx.shape).astype(np.float32)
        if buf.backend_name == "gpu":
            import cupy as cp
            to_dev, to_host = cp.asarray, cp.asnumpy
        else:
            to_dev = to_host = (lambda a: a)
        recv_x, recv_idx, recv_w, per_expert, handle, _ = buf.dispatch(
            to_dev(x), topk_idx=to_dev(topk_idx), topk_weights=to_dev(weights),
            num_tokens_per_rank=to_dev(want[0]), is_token_in_rank=to_dev(want[3]),
            num_tokens_per_expert=to_dev(want[2]))
        combined, combined_w, _ = buf.combine(recv_x, handle, topk_weights=recv_w)
        combined, combined_w = to_host(combined), to_host(combined_w)
        copies = want[3].sum(axis=1, keepdims=True).astype(np.float32)
        err = np.abs(combined.astype(np.float32) - x.astype(np.float32) * copies).max() if len(x) else 0.0
        valid = topk_idx >= 0
        ok = err <= 0.05 * max(1.0, float(np.abs(x.astype(np.float32)).max()) * copies.max()) and \
            np.allclose(combined_w[valid], weights[valid], rtol=1e-6)
        path = "internode" if buf.num_nodes > 1 else "intranode"
        log(f"dispatch/combine ({buf.backend_name} backend, {path}): received {len(recv_x)} tokens, "
            f"per local expert {per_expert[:8]}..., combine max err {err:.3g} -> {'OK' if ok else 'MISMATCH'}")
        checks.append(("dispatch/combine", ok))

        # low-latency (decode) round trip with the receive hook: FP8 dispatch, the "experts" return
        # what they received (dequantized), weighted BF16 combine; checked bit for bit against the
        # reference model gathered from every rank
        ll_x, ll_idx, ll_w = x[:ll_tokens], topk_idx[:ll_tokens], weights[:ll_tokens]
        recv, count, ll_handle, _, hook = ll_buf.low_latency_dispatch(
            to_dev(ll_x), to_dev(ll_idx), ll_tokens, experts, use_fp8=True, return_recv_hook=True)
        hook()                                   # compute could run between the sends and this
        everyone = comm.allgather((ll_x, ll_idx, ll_w))
        ref = reference.low_latency_dispatch([e[0] for e in everyone], [e[1] for e in everyone], ll_tokens,
                                             experts, use_fp8=True)
        mine = ref[rank]
        q, scales, n = to_host(recv[0]), to_host(recv[1]), to_host(count)
        ok = np.array_equal(n, mine.recv_count) and all(
            np.array_equal(q[l, :c].view(np.uint8), mine.recv_x[l, :c].view(np.uint8))
            and np.array_equal(scales[l, :c], mine.recv_x_scales[l, :c]) for l, c in enumerate(n))
        ys = [reference.fp8_to_float(r.recv_x, r.recv_x_scales).astype(ml_dtypes.bfloat16) for r in ref]
        out, _, _ = ll_buf.low_latency_combine(to_dev(ys[rank]), to_dev(ll_idx), to_dev(ll_w), ll_handle)
        want = reference.low_latency_combine(ys, [e[1] for e in everyone], [e[2] for e in everyone], ref)[rank]
        ok = ok and np.array_equal(to_host(out).view(np.uint16), want.view(np.uint16))
        log(f"low-latency FP8 dispatch + BF16 combine ({ll_tokens} tokens, hook): received "
            f"{int(n.sum())} expert entries -> {'OK' if ok else 'MISMATCH'}")
        checks.append(("low-latency", ok))

    failed = [name for name, ok in checks if not ok]
    all_failed = comm.allgather(failed)
    if rank == 0:
        bad = {r: f for r, f in enumerate(all_failed) if f}
        print(f"DEMO {'PASSED' if not bad else 'FAILED'}: {len(checks)} checks on each of {num_ranks} "
              f"ranks{'' if not bad else f'; failures {bad}'}", flush=True)
    return 0 if not any(all_failed) else 1


if __name__ == "__main__":
    sys.exit(main())
