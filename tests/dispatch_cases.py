"""Inputs of the high-throughput dispatch tests (intranode and internode): routings, including
adversarial ones, and every rank's tokens built from a shared seed, so each rank can compute the
reference result of all of them."""

import ml_dtypes
import numpy as np

BF16, FP8 = ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn


def routing(kind, num_tokens, num_topk, num_experts, num_ranks, rng):
    """topk_idx [T, K] of one rank: random, with -1 holes, a hot expert 0, only rank 0's experts
    (every other rank receives nothing), or no expert at all."""
    per_rank = num_experts // num_ranks
    if num_tokens == 0:
        return np.zeros((0, num_topk), np.int64)
    if kind in ("random", "holes"):
        idx = np.argsort(rng.random((num_tokens, num_experts)), axis=1)[:, :num_topk].astype(np.int64)
        if kind == "holes":
            idx[rng.random(idx.shape) < 0.3] = -1
        return idx
    if kind == "hot":
        idx = np.argsort(rng.random((num_tokens, num_experts)), axis=1)[:, :num_topk].astype(np.int64)
        idx[:, 0] = 0
        idx[:, 1:][idx[:, 1:] == 0] = num_experts - 1
        return idx
    if kind == "rank0_only":   # every other rank receives nothing
        return np.stack([rng.permutation(per_rank)[:num_topk] for _ in range(num_tokens)]).astype(np.int64)
    if kind == "all_minus_one":
        return np.full((num_tokens, num_topk), -1, np.int64)
    raise ValueError(kind)


def make_inputs(case_seed, num_ranks, tokens, hidden, num_topk, num_experts, kind, fp8, with_weights):
    """Inputs of every rank (numpy), identical on every rank."""
    xs, scales, idxs, ws = [], [], [], []
    from deepep_cupy import reference
    for r in range(num_ranks):
        rng = np.random.default_rng(case_seed * 1000 + r)
        t = tokens if r % 2 == 0 else max(0, tokens - 3 * (r % 3))   # uneven token counts
        x = (rng.standard_normal((t, hidden), dtype=np.float32) * (1 + r)).astype(BF16)
        if fp8:
            q, s = reference.per_token_cast_to_fp8(x)
            xs.append(q)
            scales.append(s)
        else:
            xs.append(x)
        idxs.append(routing(kind, t, num_topk, num_experts, num_ranks, rng))
        ws.append(rng.random((t, num_topk), dtype=np.float32) if with_weights else None)
    return xs, (scales if fp8 else None), idxs, (ws if with_weights else None)


def to_gpu(a):
    """numpy -> CuPy (FP8 as its uint8 storage)."""
    import cupy as cp
    if a is None:
        return None
    if a.dtype == FP8:
        return cp.asarray(a.view(np.uint8))
    return cp.asarray(a)


def host(a):
    """CuPy -> numpy (None stays None)."""
    import cupy as cp
    return None if a is None else cp.asnumpy(a)
