"""One rank of the dead-rank test (tests/test_dead_rank_reference.py), run under
``mpiexec -disable-auto-cleanup -n N``; not a pytest file (the multirank suite does not collect it).

Usage: python dead_rank_worker.py OP TIMEOUT_S OUT_DIR

Every rank builds a reference-backend ``Buffer``; the last rank dies (``os._exit(1)``) at the
point OP names, and every other rank makes the call, which must raise ``DeepEPTimeout`` naming the
dead rank. Each survivor writes ``OUT_DIR/rank<r>.json`` (exception type, message, seconds the call
took, seconds ``destroy`` took) twice: after the call, and again once the buffer is destroyed, so
the test can tell a hang in the call from a hang in ``destroy``. The files, not mpiexec's exit
status, carry the result: the dead rank makes mpiexec exit non-zero.

OP:
    dispatch              the rank dies before dispatch.
    dispatch_mid          the rank dies inside dispatch: after the count exchange, before it sends
                          its rows.
    combine               dispatch succeeds everywhere; the rank dies before combine.
    low_latency_dispatch  the rank dies before low_latency_dispatch.
    low_latency_combine   low_latency_dispatch succeeds; the rank dies before low_latency_combine.
"""

import json
import os
import sys
import time

import numpy as np
from mpi4py import MPI

import deepep_cupy
from deepep_cupy import reference as ref

OPS = ("dispatch", "dispatch_mid", "combine", "low_latency_dispatch", "low_latency_combine")
HIDDEN, TOKENS, EXPERTS_PER_RANK, M = 128, 4, 2, 8


def write(out_dir, rank, result):
    """Write ``result`` atomically (the test may read while this rank is still destroying)."""
    path = os.path.join(out_dir, f"rank{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)


def unlink_mpi_shm():
    """Unlink MPICH's shared-memory segments this process maps: MPI_Finalize would, and without it
    every run leaves megabytes in /dev/shm. Safe once MPI is up (every local rank has attached;
    the memory lives on while mapped)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {tok for line in f for tok in line.split() if tok.startswith("/dev/shm/mpich")}
    except OSError:
        return  # no /proc: not Linux
    for path in paths:
        try:
            os.unlink(path)
        except OSError:
            pass  # already unlinked by a peer or by MPICH


def die():
    """Leave at once, no MPI_Finalize: the peers see a rank that stopped talking."""
    unlink_mpi_shm()
    sys.stdout.flush()
    os._exit(1)


def main():
    op, timeout, out_dir = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    assert op in OPS, op
    comm = MPI.COMM_WORLD
    rank, n = comm.Get_rank(), comm.Get_size()
    dead = n - 1
    deepep_cupy.settings.timeout_seconds = timeout   # the Buffer's route: the same knob as the GPU
    buf = deepep_cupy.Buffer(comm, backend="reference", low_latency_mode=op.startswith("low"))
    rng = np.random.default_rng(rank)
    num_experts = EXPERTS_PER_RANK * n
    x = rng.standard_normal((TOKENS, HIDDEN)).astype(ref.BF16)
    # token t goes to expert t % 2 of every rank: each rank expects rows from each peer
    idx = np.array([[r * EXPERTS_PER_RANK + t % EXPERTS_PER_RANK for r in range(n)]
                    for t in range(TOKENS)], dtype=np.int64)
    weights = np.ones(idx.shape, np.float32)

    if op == "dispatch_mid" and rank == dead:
        # die between the dispatch's two exchanges (counts went out, rows never do)
        exchange, calls = buf._backend._exchange, []

        def dying_exchange(pieces, phase):
            calls.append(phase)
            if len(calls) == 2:
                die()
            return exchange(pieces, phase)
        buf._backend._exchange = dying_exchange

    handle = ll_handle = None
    if op == "combine":
        per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, num_experts)
        recv_x, _, _, _, handle, _ = buf.dispatch(x, topk_idx=idx, topk_weights=weights,
                                                  num_tokens_per_rank=per_rank,
                                                  num_tokens_per_expert=per_expert,
                                                  is_token_in_rank=in_rank)
    if op == "low_latency_combine":
        recv, _, ll_handle, _, _ = buf.low_latency_dispatch(x, idx, M, num_experts, use_fp8=False)
    if rank == dead and op != "dispatch_mid":
        die()

    result = {"rank": rank, "op": op, "error": None, "message": "", "seconds": None,
              "destroyed": False, "destroy_seconds": None}
    start = time.monotonic()
    try:
        if op in ("dispatch", "dispatch_mid"):
            per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, num_experts)
            buf.dispatch(x, topk_idx=idx, topk_weights=weights, num_tokens_per_rank=per_rank,
                         num_tokens_per_expert=per_expert, is_token_in_rank=in_rank)
        elif op == "combine":
            buf.combine(recv_x, handle)
        elif op == "low_latency_dispatch":
            buf.low_latency_dispatch(x, idx, M, num_experts, use_fp8=False)
        else:
            buf.low_latency_combine(recv, idx, weights, ll_handle)
    except Exception as e:  # reported to the test, which checks the type
        result.update(error=type(e).__name__, message=str(e))
    result["seconds"] = time.monotonic() - start
    write(out_dir, rank, result)

    start = time.monotonic()
    buf.destroy()
    result.update(destroyed=True, destroy_seconds=time.monotonic() - start)
    write(out_dir, rank, result)
    # no MPI_Finalize: with a dead peer MPICH's waits for it forever (seen with MPICH 5.0.2)
    unlink_mpi_shm()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
