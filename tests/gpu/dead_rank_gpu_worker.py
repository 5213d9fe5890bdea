"""One rank of the GPU dead-rank test (tests/test_dead_rank_gpu.py); not a pytest file.

Usage: python dead_rank_gpu_worker.py OP TIMEOUT_S OUT_DIR

Every rank builds a GPU ``Buffer`` and runs OP once with every rank present (compiles, and shows
the ranks in step); then the last rank dies (``os._exit``, no MPI_Finalize) at the point OP names
and every other rank makes the call and then ``Buffer.check()``: one of the two must raise
``DeepEPTimeout`` naming the dead rank. Each survivor writes ``OUT_DIR/rank<r>.json`` after the
call and again after ``destroy`` (which must return: its barrier gives up after the timeout).

OP:
    dispatch              the rank dies before dispatch (survivors wait in notify: phase 10).
    dispatch_mid          the rank runs the dispatch's notify (its counts reach the survivors) and
                          dies before its data kernel (survivors wait for its output addresses:
                          phase 16).
    combine               the rank dies before combine (phases 16/17: the combine handshake).
    low_latency_dispatch  the rank dies before low_latency_dispatch (phase 20).
    low_latency_combine   the rank dies before low_latency_combine (phase 21).
"""

import json
import os
import sys
import time

import numpy as np
from mpi4py import MPI

OPS = ("dispatch", "dispatch_mid", "combine", "low_latency_dispatch", "low_latency_combine")
HIDDEN, TOKENS, EXPERTS_PER_RANK, M = 2048, 64, 4, 64


def write(out_dir, rank, result):
    """Write ``result`` atomically (the test may read while this rank is still destroying)."""
    path = os.path.join(out_dir, f"rank{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)


def die():
    """Leave at once, no MPI_Finalize and no NVSHMEM teardown: the peers see a rank that vanished."""
    sys.stdout.flush()
    os._exit(0)


def main():
    import cupy as cp
    import ml_dtypes
    import deepep_cupy as ep

    op, timeout, out_dir = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    assert op in OPS, op
    comm = MPI.COMM_WORLD
    rank, n = comm.Get_rank(), comm.Get_size()
    dead = n - 1
    ep.settings.timeout_seconds = timeout
    low_latency = op.startswith("low")
    num_experts = EXPERTS_PER_RANK * n
    if low_latency:
        buf = ep.Buffer(comm, num_rdma_bytes=ep.Buffer.get_low_latency_rdma_size_hint(M, HIDDEN, n, num_experts),
                        low_latency_mode=True, backend="gpu")
    else:
        buf = ep.Buffer(comm, num_nvl_bytes=ep.Buffer.get_intranode_size_hint(TOKENS, HIDDEN, n), backend="gpu")
    rng = np.random.default_rng(rank)
    x = cp.asarray(rng.standard_normal((TOKENS, HIDDEN)).astype(ml_dtypes.bfloat16))
    # token t goes to one expert of every rank: each rank expects rows from each peer
    idx = cp.asarray(np.array([[r * EXPERTS_PER_RANK + t % EXPERTS_PER_RANK for r in range(n)]
                               for t in range(TOKENS)], dtype=np.int64))
    weights = cp.ones(idx.shape, cp.float32)

    def dispatch(worst=0):
        per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, num_experts)
        return buf.dispatch(x, topk_idx=idx, topk_weights=weights, num_tokens_per_rank=per_rank,
                            num_tokens_per_expert=per_expert, is_token_in_rank=in_rank, num_worst_tokens=worst)

    def run():
        if op in ("dispatch", "dispatch_mid"):
            return dispatch()
        if op == "combine":
            return buf.combine(recv_x, handle)
        if op == "low_latency_dispatch":
            return buf.low_latency_dispatch(x, idx, M, num_experts, use_fp8=False)
        return buf.low_latency_combine(ll_recv, idx, weights, ll_handle)

    recv_x = handle = ll_recv = ll_handle = None
    if op == "combine":
        recv_x, _, _, _, handle, _ = dispatch()
    if op == "low_latency_combine":
        ll_recv, _, ll_handle, _, _ = buf.low_latency_dispatch(x, idx, M, num_experts, use_fp8=False)
    run()                                   # once with everyone (the kernels are compiled and in step)
    if op == "combine":
        recv_x, _, _, _, handle, _ = dispatch()
    if op == "low_latency_combine":
        ll_recv, _, ll_handle, _, _ = buf.low_latency_dispatch(x, idx, M, num_experts, use_fp8=False)
    buf.check()
    comm.Barrier()
    if rank == dead:
        if op == "dispatch_mid":
            # the notify only: counts go out (the survivors' notify completes), rows never do
            per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, num_experts)
            stream = cp.cuda.get_current_stream()
            buf._backend.intranode()._launch_notify(in_rank, per_rank, per_expert, num_experts, 1, False, stream)
            stream.synchronize()
        die()

    result = {"rank": rank, "op": op, "error": None, "message": "", "seconds": None,
              "destroyed": False, "destroy_seconds": None}
    start = time.monotonic()
    try:
        run()
        buf.check()
    except Exception as e:  # reported to the test, which checks the type
        result.update(error=type(e).__name__, message=str(e))
    result["seconds"] = time.monotonic() - start
    write(out_dir, rank, result)

    start = time.monotonic()
    buf.destroy()
    result.update(destroyed=True, destroy_seconds=time.monotonic() - start)
    write(out_dir, rank, result)
    sys.stdout.flush()
    os._exit(0)   # no MPI_Finalize: it would wait for the dead rank


if __name__ == "__main__":
    main()
