"""A decode step of an MoE layer in two micro-batches that overlaps the low-latency receive hook with GEMMs.

Run it (one process per rank; one GPU per rank where CuPy sees GPUs, else the CPU reference backend):

    mpiexec -n 2 python3 examples/decode_overlap.py                         # GPUs if any, else CPU
    mpiexec -n 2 python3 examples/decode_overlap.py --backend reference     # CPU reference (numpy)
    mpiexec -n 8 python3 examples/decode_overlap.py --fp8 --num-tokens 128 --iters 200
    python3 examples/decode_overlap.py                                       # one rank

This is DeepEP's two-micro-batch overlap for decoding (as DeepSeek serves V3): each rank's decode
tokens are split into micro-batches A and B, and every ``low_latency_dispatch`` /
``low_latency_combine`` is called with ``return_recv_hook=True``. Such a call only launches the send
kernel and returns at once; the tokens travel while the GPU computes something else, and ``hook()``
launches the receive later, when the data has (nearly) arrived, so no SM spins waiting for peers.
One step, in stream order::

    attn(A) route(A) | send A | attn(B) route(B) | recv A  send B | FFN(A) | recv B  csend A | FFN(B)
       | crecv A  csend B | shared(A) shared(B) | crecv B
    tokens of A in flight:  ^^^^^^^^^^^^^^^^^^^
    tokens of B in flight:                           ^^^^^^^^^^^^^
    rows of A in flight:                                                  ^^^^^^^^^^^^^
    rows of B in flight:                                                                  ^^^^^^^^^^^^^^^^^^^^^

The layer: ``h = bf16(x @ W_attn)`` (a stand-in for attention's output projection), a softmax top-k
router on ``h``, one two-layer GELU FFN per routed expert on the received ``[local experts, R*M,
hidden]`` layout (DeepEP's masked layout: only the first ``recv_count[l]`` slots of expert ``l``
are rows; the rest are masked, on the device, without a host round trip), the top-k weighted sum in
``low_latency_combine``, plus a shared expert on ``h``. With ``--fp8`` the dispatch casts tokens to
e4m3 (one scale per 128 channels) and the experts dequantise them.

Every rank generates its tokens and the layer's weights from ``--seed`` (the same weights on every
rank; each rank keeps its ``E / R`` experts), runs the step with the hooks and once more with
blocking calls (each call receives before it returns), and checks both against the layer computed
densely in numpy in one process (float32, every expert on every token it routes to; with ``--fp8``
the experts see the same quantised tokens). On the GPU, ``--iters`` steps of each mode are then
timed with CUDA events (eagerly from Python: CuPy's GEMMs cannot be captured in a CUDA graph, see
``time_steps``), and the last step of each is checked too. Timing is skipped on the CPU.

Output (rank 0): one line per rank (tokens, rows received per local expert, largest error relative
to the largest output; per-step microseconds with the hook overlap and with blocking calls), then
``PASSED`` or ``FAILED``; the exit status is 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import sys
from types import SimpleNamespace

import ml_dtypes
import numpy as np
from mpi4py import MPI

import deepep_cupy as ep
from deepep_cupy import discovery
from deepep_cupy import reference as ref

BF16 = np.dtype(ml_dtypes.bfloat16)
FP8_BLOCK = 128                 # channels per FP8 scale
NEAR_TIE = 1e-4                 # router probabilities closer than this may order differently on the GPU


# ------------------------------------------------------------------------------------------ the layer
def gelu(xp, v):
    return 0.5 * v * (1.0 + xp.tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)))


def route(xp, router, h, topk):
    """Softmax top-k on float32 ``h``: (topk_idx int64 [T, K], renormalised weights float32 [T, K],
    probabilities [T, E]). Top-k by repeated argmax (K small reductions, no sort; the lowest index
    wins a tie, in numpy and CuPy alike, so both backends and the dense check choose alike)."""
    logits = h @ router
    probs = xp.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    work, rows, cols = probs.copy(), xp.arange(h.shape[0]), []
    for _ in range(topk):
        c = work.argmax(axis=1)
        cols.append(c)
        work[rows, c] = -1.0            # below every probability
    idx = xp.stack(cols, axis=1).astype(xp.int64)
    w = xp.take_along_axis(probs, idx, axis=1)
    return idx, (w / w.sum(axis=1, keepdims=True)).astype(xp.float32), probs


def ffn(xp, w1, w2, rows):
    """A two-layer GELU FFN on float32 rows; ``w1``/``w2`` may carry a leading expert axis (batched)."""
    return xp.matmul(gelu(xp, xp.matmul(rows, w1)), w2)


def make_weights(seed, hidden, ffn_dim, num_experts):
    """The layer's dense weights (float32), identical on every rank."""
    rng = np.random.default_rng([seed, 2])
    scale = lambda n: np.float32(1.0 / np.sqrt(n))  # noqa: E731  (unit-variance activations)
    return SimpleNamespace(
        attn=rng.standard_normal((hidden, hidden), dtype=np.float32) * scale(hidden),
        router=rng.standard_normal((hidden, num_experts), dtype=np.float32) * scale(hidden),
        s1=rng.standard_normal((hidden, ffn_dim), dtype=np.float32) * scale(hidden),
        s2=rng.standard_normal((ffn_dim, hidden), dtype=np.float32) * scale(ffn_dim))


def expert_weights(seed, e, hidden, ffn_dim):
    """Expert ``e``'s (w1 [H, F], w2 [F, H]), from its own stream so a rank makes only those it needs."""
    rng = np.random.default_rng([seed, 1, e])
    return (rng.standard_normal((hidden, ffn_dim), dtype=np.float32) * np.float32(1.0 / np.sqrt(hidden)),
            rng.standard_normal((ffn_dim, hidden), dtype=np.float32) * np.float32(1.0 / np.sqrt(ffn_dim)))


def make_tokens(seed, rank, num_tokens, hidden):
    """This rank's decode tokens, bf16 values held in float32."""
    rng = np.random.default_rng([seed, 0, rank])
    return rng.standard_normal((num_tokens, hidden), dtype=np.float32).astype(BF16).astype(np.float32)


# ------------------------------------------------------------------------------- the distributed step
def attention(ctx, x):
    """Stand-in for attention: one GEMM. Returns h as bf16 (what is dispatched) and as float32."""
    h = (x.astype(ctx.xp.float32) @ ctx.attn).astype(ctx.bf16)
    return h, h.astype(ctx.xp.float32)


def experts(ctx, recv_x, recv_count):
    """Every local expert on its slots of the received ``[L, R*M, H]`` layout -> bf16, same layout.

    All ``R*M`` slots go through one batched GEMM per layer (a masked grouped GEMM, as DeepGEMM's
    ``m_grouped_*_masked`` does for DeepEP): slots at or past ``recv_count[l]`` hold garbage (even
    NaN), so they are zeroed first with ``where`` (``0 * NaN`` is NaN), and ``recv_count`` never
    goes to the host: no synchronisation inside the step. The combine reads only the valid slots."""
    xp = ctx.xp
    if ctx.fp8:
        data, scales = recv_x
        vals = ctx.e4m3_to_float(data)
        num_local, slots, hidden = vals.shape
        rows = (vals.reshape(num_local, slots, hidden // FP8_BLOCK, FP8_BLOCK) * scales[..., None]
                ).reshape(num_local, slots, hidden)
    else:
        rows = recv_x.astype(xp.float32)
    valid = ctx.slot[None, :] < recv_count[:, None]
    rows = xp.where(valid[..., None], rows, xp.float32(0.0))
    return ffn(xp, ctx.w1, ctx.w2, rows).astype(ctx.bf16)


def decode_step(ctx, xa, xb, overlap: bool):
    """One decode step of the layer on micro-batches ``xa`` and ``xb`` (bf16 [T_a, H], [T_b, H]).

    ``overlap``: every low-latency call returns after its send, and its hook runs after the next
    piece of compute (the schedule in the module docstring). Without it the same calls in the same
    order block until they have received (DeepEP's plain mode), and nothing overlaps.
    Returns (out_a, out_b float32, topk_idx_a, topk_idx_b, recv_count_a, recv_count_b).
    """
    buf, xp = ctx.buf, ctx.xp

    def dispatch(h, idx):
        recv_x, recv_count, handle, _, hook = buf.low_latency_dispatch(
            h, idx, ctx.max_tokens, ctx.num_experts, use_fp8=ctx.fp8, return_recv_hook=overlap)
        return recv_x, recv_count, handle, hook

    def receive(hook):          # blocking calls have received already (no hook)
        if hook is not None:
            hook()

    ha, ha32 = attention(ctx, xa)
    idx_a, w_a, _ = route(xp, ctx.router, ha32, ctx.topk)
    ra = dispatch(ha, idx_a)                           # A's tokens in flight ...
    hb, hb32 = attention(ctx, xb)                      # ... under B's attention GEMM and router
    idx_b, w_b, _ = route(xp, ctx.router, hb32, ctx.topk)
    receive(ra[3])                                     # A's receive: its data has landed meanwhile
    rb = dispatch(hb, idx_b)                           # B's tokens in flight ...
    ya = experts(ctx, ra[0], ra[1])                    # ... under A's expert GEMMs
    receive(rb[3])
    ca, _, hook_ca = buf.low_latency_combine(ya, idx_a, w_a, ra[2], return_recv_hook=overlap)
    yb = experts(ctx, rb[0], rb[1])                    # A's expert rows in flight under B's experts
    receive(hook_ca)
    cb, _, hook_cb = buf.low_latency_combine(yb, idx_b, w_b, rb[2], return_recv_hook=overlap)
    sa = ffn(xp, ctx.s1, ctx.s2, ha32)                 # B's rows in flight under both shared experts
    sb = ffn(xp, ctx.s1, ctx.s2, hb32)
    receive(hook_cb)                                   # ca / cb are valid only after their hooks
    return ca.astype(xp.float32) + sa, cb.astype(xp.float32) + sb, idx_a, idx_b, ra[1], rb[1]


# ------------------------------------------------------------------------------------- the reference
def dense_layer(x, weights, experts_of, topk, fp8, forced_idx=None):
    """The layer on float32 tokens ``x`` [T, H] in one process (numpy, float32, every expert on the
    tokens routed to it). ``forced_idx``: rows to route as given (near-ties the GPU broke otherwise).
    Returns (out [T, H], topk_idx, probabilities)."""
    h = (x @ weights.attn).astype(BF16).astype(np.float32)
    idx, w, probs = route(np, weights.router, h, topk)
    if forced_idx is not None:
        rows = list(forced_idx)
        idx[rows] = np.stack([forced_idx[t] for t in rows])
        w = np.take_along_axis(probs, idx, axis=1)
        w = (w / w.sum(axis=1, keepdims=True)).astype(np.float32)
    x_in = ref.fp8_to_float(*ref.per_token_cast_to_fp8(h.astype(BF16))) if fp8 else h
    out = ffn(np, weights.s1, weights.s2, h)
    for e in np.unique(idx[idx >= 0]):
        hit = idx == e
        tokens = np.nonzero(hit.any(axis=1))[0]
        gate = np.where(hit, w, 0.0).sum(axis=1)[tokens]
        w1, w2 = experts_of(int(e))
        out[tokens] += gate[:, None] * ffn(np, w1, w2, x_in[tokens])
    return out, idx, probs


def check(x, got, got_idx, weights, experts_of, topk, fp8):
    """Largest error of ``got`` against the dense layer, relative to the largest output, and the
    number of near-tie tokens routed the distributed step's way (a different choice elsewhere
    counts as an error of 1.0)."""
    want, idx, probs = dense_layer(x, weights, experts_of, topk, fp8)
    differ = np.nonzero((np.sort(idx, axis=1) != np.sort(got_idx, axis=1)).any(axis=1))[0]
    if differ.size:
        ranked = -np.sort(-probs, axis=1)
        gap = ranked[:, topk - 1] - ranked[:, min(topk, probs.shape[1] - 1)]
        if (gap[differ] > NEAR_TIE).any():
            return 1.0, 0
        want = dense_layer(x, weights, experts_of, topk, fp8, {int(t): got_idx[t] for t in differ})[0]
    err = float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))
    return err, int(differ.size)


# ------------------------------------------------------------------------------------------- timing
def time_steps(ctx, xa, xb, overlap, iters, stream):
    """(GPU us, host us) per step over ``iters`` steps, and the last step's outputs: CUDA events on
    ``stream`` around the loop, and the host's time to issue it (when the two are close, Python's
    launches, not the GPU, set the pace, and the overlap can save little).

    Eager, not a CUDA graph: CuPy refuses cuBLAS calls while a stream captures
    (``NotImplementedError: calling cuBLAS API during stream capture``), so a step whose GEMMs are
    CuPy matmuls cannot be captured; deepep_cupy's own calls, hooks included, can be."""
    import time

    import cupy
    with stream:
        for _ in range(3):                              # warm-up (the kernels are compiled already)
            decode_step(ctx, xa, xb, overlap)
        stream.synchronize()
        ctx.comm.Barrier()                              # start together: a rank's receive waits for its peers
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        t0 = time.perf_counter()
        start.record(stream)
        for _ in range(iters):
            outs = decode_step(ctx, xa, xb, overlap)
        end.record(stream)
        host_s = time.perf_counter() - t0
        end.synchronize()
    return cupy.cuda.get_elapsed_time(start, end) * 1e3 / iters, host_s * 1e6 / iters, outs


# --------------------------------------------------------------------------------------------- main
def host(a):
    return np.asarray(a.get() if hasattr(a, "get") else a)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=("auto", "gpu", "reference"), default="auto",
                   help="auto: the GPU backend when CuPy sees a GPU, else the CPU reference backend")
    p.add_argument("--num-tokens", type=int, default=64, help="decode tokens per rank (two micro-batches)")
    p.add_argument("--hidden", type=int, default=None, help="a multiple of 128 (default 2048 on GPU, 256 on CPU)")
    p.add_argument("--ffn", type=int, default=None, help="expert FFN width (default hidden / 4)")
    p.add_argument("--num-experts", type=int, default=None, help="a multiple of the rank count (default 8 per rank)")
    p.add_argument("--num-topk", type=int, default=4)
    p.add_argument("--fp8", action="store_true", help="FP8 dispatch (e4m3, one scale per 128 channels)")
    p.add_argument("--iters", type=int, default=50, help="timed steps per mode on the GPU (0: no timing)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    comm = MPI.COMM_WORLD
    rank, num_ranks = comm.Get_rank(), comm.Get_size()
    backend = args.backend
    if backend == "auto":   # Buffer's own rule; resolved here because the default hidden size depends on it
        backend = "gpu" if discovery.gpu_count() > 0 else "reference"
    hidden = args.hidden or (2048 if backend == "gpu" else 256)
    ffn_dim = args.ffn or max(hidden // 4, 32)
    num_experts = args.num_experts or 8 * num_ranks
    topk, num_tokens = args.num_topk, args.num_tokens
    problems = []
    if num_experts % num_ranks:
        problems.append(f"--num-experts {num_experts} must be a multiple of {num_ranks} ranks")
    if not 1 <= topk <= min(num_experts, 16):
        problems.append(f"--num-topk {topk} must be in [1, min(num_experts, 16)]")
    if not 2 <= num_tokens <= 2048:
        problems.append(f"--num-tokens {num_tokens} must be in [2, 2048] (two micro-batches of at most 1024)")
    if hidden % 128:
        problems.append(f"--hidden {hidden} must be a multiple of 128")
    if problems:
        if rank == 0:
            print("decode_overlap.py: " + "; ".join(problems), file=sys.stderr)
        return 2

    max_tokens = (num_tokens + 1) // 2         # M: micro-batch A has ceil(T/2) tokens, B the rest
    num_local = num_experts // num_ranks
    weights = make_weights(args.seed, hidden, ffn_dim, num_experts)
    cache = {}

    def experts_of(e):
        if e not in cache:
            cache[e] = expert_weights(args.seed, e, hidden, ffn_dim)
        return cache[e]

    local = [experts_of(rank * num_local + l) for l in range(num_local)]
    x = make_tokens(args.seed, rank, num_tokens, hidden)

    with ep.Buffer(comm, num_rdma_bytes=ep.Buffer.get_low_latency_rdma_size_hint(
            max_tokens, hidden, num_ranks, num_experts), low_latency_mode=True, backend=backend) as buf:
        if buf.backend_name == "gpu":
            import cupy as xp
            table = xp.asarray(np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32))
            e4m3_to_float = lambda u8: table[u8]       # noqa: E731  (CuPy has no FP8 dtype: uint8 storage)
        else:
            xp = np
            e4m3_to_float = lambda q: (q.view(ml_dtypes.float8_e4m3fn) if q.dtype == np.uint8 else q  # noqa: E731
                                       ).astype(np.float32)
        ctx = SimpleNamespace(
            buf=buf, xp=xp, comm=comm, bf16=BF16, fp8=args.fp8, topk=topk, num_experts=num_experts,
            max_tokens=max_tokens, e4m3_to_float=e4m3_to_float,
            attn=xp.asarray(weights.attn), router=xp.asarray(weights.router),
            s1=xp.asarray(weights.s1), s2=xp.asarray(weights.s2),
            w1=xp.asarray(np.stack([w1 for w1, _ in local])), w2=xp.asarray(np.stack([w2 for _, w2 in local])),
            slot=xp.arange(num_ranks * max_tokens, dtype=xp.int32))
        xa = xp.asarray(x[:max_tokens]).astype(BF16)  # exact: the values are bf16 already
        xb = xp.asarray(x[max_tokens:]).astype(BF16)

        runs = {"hook": decode_step(ctx, xa, xb, overlap=True),
                "blocking": decode_step(ctx, xa, xb, overlap=False)}
        timing = "timing skipped on the CPU reference backend"
        if buf.backend_name == "gpu" and args.iters > 0:
            stream = xp.cuda.Stream(non_blocking=True)
            hook_us, hook_host, runs["hook, timed"] = time_steps(ctx, xa, xb, True, args.iters, stream)
            block_us, block_host, runs["blocking, timed"] = time_steps(ctx, xa, xb, False, args.iters, stream)
            timing = (f"step {hook_us:.1f} us with the hook overlap, {block_us:.1f} us blocking "
                      f"(CUDA events, {args.iters} steps; host issue {hook_host:.0f} / {block_host:.0f} us)")
        elif buf.backend_name == "gpu":
            timing = "timing skipped (--iters 0)"

        errors, ties = [], 0
        for name, (out_a, out_b, idx_a, idx_b, count_a, count_b) in runs.items():
            for part, out, idx in ((slice(0, max_tokens), out_a, idx_a), (slice(max_tokens, None), out_b, idx_b)):
                err, n = check(x[part], host(out), host(idx), weights, experts_of, topk, args.fp8)
                errors.append(err)
                ties = max(ties, n)
        count_a, count_b = host(runs["hook"][4]).tolist(), host(runs["hook"][5]).tolist()
        err = max(errors)
        tol = 2e-2 if args.fp8 else 1e-2       # observed: about 3e-3 on both backends
        ok = err <= tol
        line = (f"rank {rank}: {num_tokens} tokens as A {max_tokens} + B {num_tokens - max_tokens}, rows per local "
                f"expert A {count_a} B {count_b}, max error {err:.2e} (tol {tol:g}, {len(runs)} runs"
                + (f", {ties} near-tie token(s) routed as the {buf.backend_name} step did" if ties else "")
                + f"); {timing}")
        everyone = comm.gather((line, ok), root=0)
        passed = comm.allreduce(ok, op=MPI.LAND)
        if rank == 0:
            for text, _ in everyone:
                print(text)
            print(f"decode_overlap: backend {buf.backend_name}, {num_ranks} rank(s), hidden {hidden}, "
                  f"{num_experts} experts top-{topk}, {'fp8' if args.fp8 else 'bf16'} dispatch: "
                  f"{'PASSED' if passed else 'FAILED'}", flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
