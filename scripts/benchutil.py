"""Timing helpers for scripts/bench_*.py (benchmarks are scripts, never timed tests).

``time_calls`` follows DeepEP's method so figures compare: flush L2 before each call, CUDA events
around each call (so host overhead that delays the GPU counts), many calls after warm-up; it
returns every sample so the caller can report the median and the spread.
"""

import os
import statistics


def time_calls(fn, num_warmups=20, num_tests=200, flush_l2=True, before=None, after=None, host_us=None):
    """Per-call times in microseconds (list), events on the current stream around each call.

    ``before`` / ``after`` run untimed around every call (e.g. the send before a timed receive,
    or the receive after a timed send, so collective halves stay paired). ``host_us``: a list that
    receives each call's host time (how long ``fn`` took to return), to tell host overhead from
    GPU time."""
    import time
    import cupy as cp
    # DeepEP's flush: zero 256 MB of int32 (a cudaMemset, ~70 us). A byte-wise fill kernel took ~2 ms
    # and, under MPS, ended at different times on each rank, which the timed call then absorbed.
    cache = cp.empty(256_000_000 // 4, dtype=cp.int32) if flush_l2 else None
    for _ in range(num_warmups):
        if before:
            before()
        fn()
        if after:
            after()
    cp.cuda.Device().synchronize()
    starts = [cp.cuda.Event() for _ in range(num_tests)]
    ends = [cp.cuda.Event() for _ in range(num_tests)]
    for i in range(num_tests):
        if cache is not None:
            cache.fill(0)
        if before:
            before()
        starts[i].record()
        t0 = time.perf_counter()
        fn()
        if host_us is not None:
            host_us.append((time.perf_counter() - t0) * 1e6)
        ends[i].record()
        if after:
            after()
    cp.cuda.Device().synchronize()
    return [cp.cuda.get_elapsed_time(s, e) * 1000.0 for s, e in zip(starts, ends)]


def summarize(samples):
    """(median, p10, p90) of a list of numbers."""
    s = sorted(samples)
    pick = lambda q: s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]
    return statistics.median(s), pick(0.1), pick(0.9)


def fmt_us(samples):
    """'12.3 us (p10 11.9, p90 13.0)'."""
    med, lo, hi = summarize(samples)
    return f"{med:8.2f} us (p10 {lo:.2f}, p90 {hi:.2f})"


def nccl_all_to_all(comm, in_rank_host, hidden, iters):
    """PyTorch/NCCL all_to_all_single moving the dispatch's rows (bf16), timed the same way."""
    import numpy as np
    import torch
    import torch.distributed as dist
    rank, R = comm.Get_rank(), comm.Get_size()
    port = comm.bcast(29500 + (os.getpid() % 1000) if rank == 0 else None, root=0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=R,
                            device_id=torch.device("cuda", torch.cuda.current_device()))
    send_counts = [int(c) for c in in_rank_host.sum(axis=0)]
    recv_counts = [int(c[rank]) for c in comm.allgather(np.array(send_counts))]
    inp = torch.randn(sum(send_counts), hidden, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(sum(recv_counts), hidden, device="cuda", dtype=torch.bfloat16)
    run = lambda: dist.all_to_all_single(out, inp, recv_counts, send_counts)
    samples = time_calls(run, num_tests=iters)
    med = statistics.median(samples)
    remote = sum(c for s, c in enumerate(recv_counts) if s != rank) * hidden * 2
    dist.destroy_process_group()
    return [("nccl_all_to_all_bf16", samples, remote / med / 1e3)]


def intranode_case(comm, tokens, hidden, num_topk=8, num_experts=256):
    """The diagnostics' common case (trace_dispatch.py, profile_host.py): a GPU ``Buffer`` sized for
    ``tokens`` x ``hidden``, a random top-k routing seeded by the rank, BF16 ``x`` and its FP8 pair,
    and ``get_dispatch_layout``'s outputs. Returns a ``types.SimpleNamespace`` with ``buf``, ``idx``,
    ``w``, ``x``, ``fp8``, ``per_rank``, ``per_expert``, ``in_rank`` and ``num_experts``."""
    import types
    import cupy as cp
    import ml_dtypes
    import numpy as np
    import deepep_cupy as ep
    from deepep_cupy import reference

    rank, num_ranks = comm.Get_rank(), comm.Get_size()
    buf = ep.Buffer(comm, num_nvl_bytes=ep.Buffer.get_intranode_size_hint(tokens, hidden, num_ranks, num_topk),
                    backend="gpu")
    rng = np.random.default_rng(rank)
    idx = cp.asarray(np.argsort(rng.random((tokens, num_experts)), axis=1)[:, :num_topk].astype(np.int64))
    w = cp.asarray(rng.random((tokens, num_topk), dtype=np.float32))
    x = cp.asarray(rng.standard_normal((tokens, hidden), dtype=np.float32).astype(ml_dtypes.bfloat16))
    q, scales = reference.per_token_cast_to_fp8(cp.asnumpy(x))
    fp8 = (cp.asarray(q.view(np.uint8)), cp.asarray(scales))
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, num_experts)
    return types.SimpleNamespace(buf=buf, idx=idx, w=w, x=x, fp8=fp8, per_rank=per_rank, per_expert=per_expert,
                                 in_rank=in_rank, num_experts=num_experts)
