"""A mixture-of-experts layer for inference with deepep_cupy's Buffer: CuPy on GPUs, numpy on CPUs.

Run it (one process per rank; the CPU reference backend where there is no GPU, one GPU per rank
where there are GPUs):

    python3 examples/cupy_moe_inference.py                 # one rank
    mpiexec -n 2 python3 examples/cupy_moe_inference.py
    mpiexec -n 3 python3 examples/cupy_moe_inference.py --fp8

Two forward passes of the same layer (router, softmax top-k, one two-layer GELU FFN per expert),
each checked against the dense model computed in one process (all tokens, all experts):

* prefill, the high-throughput path: ``get_dispatch_layout``, ``dispatch`` (bf16 tokens and their
  top-k weights), every local expert on its rows, the weighted rows summed per received token,
  ``combine`` back;
* decode, the low-latency path: ``low_latency_dispatch`` (bf16, or FP8 with ``--fp8``) into the fixed
  ``[local experts, R*M, H]`` layout, every local expert on its slots, ``low_latency_combine``
  (weighted by the top-k weights inside the kernel).

The arrays are CuPy arrays on the GPU backend and numpy arrays on the reference backend (``xp``
below); nothing else differs. On the GPU, the FP8 pair comes back as (uint8 storage, scales): CuPy
has no FP8 dtype.

Output (rank 0): the largest error of each pass against the dense model; exit status 1 when one is
above bf16 tolerance.
"""

from __future__ import annotations

import argparse
import sys

import ml_dtypes
import numpy as np
from mpi4py import MPI

import deepep_cupy as ep
from deepep_cupy import reference as ref

BF16 = np.dtype(ml_dtypes.bfloat16)


def init_problem(seed, num_tokens, hidden, ffn, num_experts):
    """Global tokens and weights (float32), identical on every rank whatever the rank count."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_tokens, hidden)).astype(np.float32)
    router = (rng.standard_normal((hidden, num_experts)) / np.sqrt(hidden)).astype(np.float32)
    w1 = (rng.standard_normal((num_experts, hidden, ffn)) / np.sqrt(hidden)).astype(np.float32)
    w2 = (rng.standard_normal((num_experts, ffn, hidden)) / np.sqrt(ffn)).astype(np.float32)
    return x, router, w1, w2


def gelu(xp, v):
    return 0.5 * v * (1.0 + xp.tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)))


def route(xp, router, x, topk):
    """Softmax top-k: (topk_idx int64 [T, K], renormalised weights float32 [T, K])."""
    logits = x.astype(xp.float32) @ router
    probs = xp.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    idx = xp.argsort(-probs, axis=1, kind="stable")[:, :topk].astype(xp.int64)
    w = xp.take_along_axis(probs, idx, axis=1)
    return idx, (w / w.sum(axis=1, keepdims=True)).astype(xp.float32)


def expert(xp, w1, w2, rows):
    """One expert on float32 rows."""
    return gelu(xp, rows @ w1) @ w2


def dense_layer(x, router, w1, w2, topk):
    """The reference: every token through its top-k experts in one process (float32, numpy)."""
    idx, w = route(np, router, x, topk)
    out = np.zeros_like(x)
    for e in range(w1.shape[0]):
        gate = np.where(idx == e, w, 0.0).sum(axis=1)
        out += gate[:, None] * expert(np, w1[e], w2[e], x)
    return out


def prefill(buf, xp, x, router, w1, w2, num_experts, topk):
    """The high-throughput path on this rank's tokens ``x`` (bf16); ``w1``/``w2`` hold its experts."""
    idx, weights = route(xp, router, x, topk)
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, _ = \
        buf.get_dispatch_layout(idx, num_experts)
    recv_x, recv_idx, recv_w, per_expert, handle, _ = buf.dispatch(
        x, num_tokens_per_rank=num_tokens_per_rank, num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
        is_token_in_rank=is_token_in_rank, num_tokens_per_expert=num_tokens_per_expert,
        topk_idx=idx, topk_weights=weights)
    rows = recv_x.astype(xp.float32)
    y = xp.zeros(rows.shape, dtype=xp.float32)
    for local in range(w1.shape[0]):
        hit = recv_idx == local                      # [N, K]: the rows (and slots) routed to this expert
        if per_expert[local] == 0:                   # the host list: no device round trip needed
            continue
        sel = xp.nonzero(hit.any(axis=1))[0]
        gate = xp.where(hit, recv_w, 0.0).sum(axis=1)[sel]
        y[sel] += gate[:, None] * expert(xp, w1[local], w2[local], rows[sel])
    out, _, _ = buf.combine(y.astype(x.dtype), handle)
    return out


def decode(buf, xp, x, router, w1, w2, num_experts, topk, max_tokens, use_fp8):
    """The low-latency path on this rank's decode tokens ``x`` (bf16, at most ``max_tokens``)."""
    idx, weights = route(xp, router, x, topk)
    recv_x, recv_count, handle, _, _ = buf.low_latency_dispatch(x, idx, max_tokens, num_experts, use_fp8=use_fp8)
    if use_fp8:              # dequantise: float32(e4m3) * the scale of each 128-channel block
        data, scales = recv_x
        data = data.view(ml_dtypes.float8_e4m3fn) if xp is np else _e4m3_to_float(data)
        rows = data.astype(xp.float32) * xp.repeat(scales, 128, axis=-1)
    else:
        rows = recv_x.astype(xp.float32)
    counts = recv_count.tolist()
    y = xp.zeros(rows.shape, dtype=xp.float32)          # slots past recv_count are ignored by combine
    for local, n in enumerate(counts):
        if n:
            y[local, :n] = expert(xp, w1[local], w2[local], rows[local, :n])
    out, _, _ = buf.low_latency_combine(y.astype(x.dtype), idx, weights, handle)
    return out


def _e4m3_to_float(u8):
    """float32 values of e4m3 bytes held as uint8 (CuPy has no FP8 dtype): a 256-entry table."""
    import cupy
    table = cupy.asarray(np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32))
    return table[u8]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=96, help="global prefill batch (a multiple of the rank count)")
    p.add_argument("--decode-tokens", type=int, default=8, help="decode tokens per rank")
    p.add_argument("--hidden", type=int, default=128, help="a multiple of 128 (low-latency kernels)")
    p.add_argument("--ffn", type=int, default=256)
    p.add_argument("--experts", type=int, default=12, help="a multiple of the rank count")
    p.add_argument("--topk", type=int, default=3)
    p.add_argument("--fp8", action="store_true", help="FP8 low-latency dispatch")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    comm = MPI.COMM_WORLD
    rank, num_ranks = comm.Get_rank(), comm.Get_size()
    if args.tokens % num_ranks or args.experts % num_ranks:
        raise SystemExit(f"--tokens {args.tokens} and --experts {args.experts} must be multiples of {num_ranks} ranks")
    t, num_local, m = args.tokens // num_ranks, args.experts // num_ranks, args.decode_tokens
    x_all, router, w1, w2 = init_problem(args.seed, args.tokens, args.hidden, args.ffn, args.experts)
    x_all = x_all.astype(BF16).astype(np.float32)       # the layer's input is bf16: compare on those values
    dec_all = init_problem(args.seed + 1, num_ranks * m, args.hidden, 1, 1)[0].astype(BF16).astype(np.float32)
    mine = slice(rank * num_local, (rank + 1) * num_local)

    with ep.Buffer(comm, num_nvl_bytes=ep.Buffer.get_intranode_size_hint(t, args.hidden, num_ranks, args.topk),
                   num_rdma_bytes=ep.Buffer.get_low_latency_rdma_size_hint(m, args.hidden, num_ranks, args.experts),
                   low_latency_mode=True) as buf:
        if buf.backend_name == "gpu":
            import cupy as xp
        else:
            xp = np
        bf16 = xp.dtype(BF16) if xp is not np else BF16
        put = (lambda a: xp.asarray(a)) if xp is not np else (lambda a: a)
        r_router, r_w1, r_w2 = put(router), put(w1[mine]), put(w2[mine])

        x = put(x_all[rank * t:(rank + 1) * t]).astype(bf16)       # exact: the values are bf16 already
        got = prefill(buf, xp, x, r_router, r_w1, r_w2, args.experts, args.topk)
        want = dense_layer(x_all, router, w1, w2, args.topk)[rank * t:(rank + 1) * t]
        err_prefill = _err(got, want)

        xd = put(dec_all[rank * m:(rank + 1) * m]).astype(bf16)
        got = decode(buf, xp, xd, r_router, r_w1, r_w2, args.experts, args.topk, m, args.fp8)
        if args.fp8:   # the dense model sees the same quantised tokens the experts got
            q, s = ref.per_token_cast_to_fp8(dec_all.astype(BF16))
            dec_in = ref.fp8_to_float(q, s)
        else:
            dec_in = dec_all
        want = dense_layer_on(dec_all, dec_in, router, w1, w2, args.topk)[rank * m:(rank + 1) * m]
        err_decode = _err(got, want)

        tol = 0.05 if args.fp8 else 0.02
        everyone = comm.allgather((err_prefill, err_decode))
        if rank == 0:
            for r, (a, b) in enumerate(everyone):
                print(f"rank {r}: prefill max error {a:.2e}, decode max error {b:.2e} (relative to the largest "
                      f"output; bf16 rounding, tolerance {tol})")
            ok = all(a < 0.02 and b < tol for a, b in everyone)
            print(f"backend {buf.backend_name}, {num_ranks} rank(s): {'ok' if ok else 'FAILED'}")
        ok = all(a < 0.02 and b < tol for a, b in everyone)
    return 0 if ok else 1


def dense_layer_on(x_route, x_in, router, w1, w2, topk):
    """Dense layer routed on ``x_route`` with experts applied to ``x_in`` (the FP8-dequantised
    tokens when the decode path quantises)."""
    idx, w = route(np, router, x_route, topk)
    out = np.zeros_like(x_in)
    for e in range(w1.shape[0]):
        gate = np.where(idx == e, w, 0.0).sum(axis=1)
        out += gate[:, None] * expert(np, w1[e], w2[e], x_in)
    return out


def _err(got, want) -> float:
    got = got.get() if hasattr(got, "get") else got
    got = np.asarray(got).astype(np.float32)
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))


if __name__ == "__main__":
    sys.exit(main())
