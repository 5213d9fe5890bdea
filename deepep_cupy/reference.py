"""Exact numpy reference model of every deepep_cupy communication operation.

This module is the oracle that the GPU kernels are tested against, bit for bit. It needs only
numpy and ml_dtypes (no MPI, no CuPy). All ranks are simulated inside one process: every
per-rank input is a Python list indexed by rank, and every per-rank output is a list indexed by
rank as well.

Dtypes: BF16 arrays are numpy arrays of dtype ``ml_dtypes.bfloat16``; FP8 arrays are of dtype
``ml_dtypes.float8_e4m3fn``. All float32 -> bf16 / fp8 casts are round-to-nearest-even (what
``ml_dtypes`` does, and what ``__float2bfloat16_rn`` / ``__nv_cvt_float_to_fp8(..., __NV_SATFINITE,
__NV_E4M3)`` do on the GPU after the explicit clip below).

Expert placement: with ``E`` experts over ``R`` ranks, ``L = E // R`` experts live on every rank and
global expert ``e`` lives on rank ``e // L`` as local expert ``e % L``.

Every public operation is also split into per-rank pieces (``*_pack`` runs on the sending rank,
``*_unpack`` / ``*_reduce`` on the receiving rank) so that :mod:`deepep_cupy.reference_backend` can
run the very same logic across real MPI ranks, exchanging only the pieces.

Exact float32 rules (a CUDA kernel must follow them to match bit for bit; compile without fast
math, no FMA contraction of the named multiply-adds, no flush-to-zero):

* combine: ``acc = +0.0f``; ``acc += float32(b0)``; ``acc += float32(b1)``; then for every
  receiving rank ``r = 0, 1, ..., R-1`` that holds a copy, ``acc += float32(y_r)``; result
  ``cast(acc)`` with round-to-nearest-even into the dtype of the combined input. (Starting from
  ``+0.0f`` means a lone ``-0.0`` term gives ``+0.0``.)
* low-latency combine: ``acc = +0.0f``; for ``k = 0 .. K-1`` with ``topk_idx[t, k] >= 0``:
  ``p = float32(w[t, k]) * float32(y)`` (rounded to float32), ``acc = acc + p``; result
  ``bf16(acc)`` (RNE). Use ``__fmul_rn``/``__fadd_rn`` on the GPU to keep the two roundings.
* FP8 casting: see :func:`per_token_cast_to_fp8`.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

import ml_dtypes
import numpy as np

from .errors import DeepEPInvalid, DeepEPTypeError

__all__ = [
    "BF16",
    "FP8",
    "FP8_MAX",
    "FP8_BLOCK",
    "FP8_AMAX_MIN",
    # layout
    "token_in_rank",
    "pack_layout_range",
    "get_dispatch_layout",
    # high-throughput dispatch / combine
    "DispatchPiece",
    "DispatchResult",
    "CombinePiece",
    "rank_prefix_matrix_from_counts",
    "dispatch_pack",
    "dispatch_unpack",
    "dispatch",
    "combine_pack",
    "combine_reduce",
    "combine",
    # fp8
    "per_token_cast_to_fp8",
    "fp8_to_float",
    "pack_ue8m0",
    "unpack_ue8m0",
    # low latency
    "LowLatencyPiece",
    "LowLatencyDispatchResult",
    "low_latency_pack",
    "low_latency_unpack",
    "low_latency_dispatch",
    "low_latency_combine_pack",
    "low_latency_combine_reduce",
    "low_latency_combine",
]

BF16 = np.dtype(ml_dtypes.bfloat16)
"""numpy dtype of BF16 arrays (``ml_dtypes.bfloat16``)."""

FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
"""numpy dtype of FP8 arrays (``ml_dtypes.float8_e4m3fn``)."""

FP8_MAX = np.float32(448.0)
"""Largest finite float8_e4m3fn value, as float32."""

FP8_BLOCK = 128
"""Number of channels that share one FP8 scale."""

FP8_AMAX_MIN = np.float32(1e-4)
"""Lower clamp of the per-block absolute maximum in the FP8 cast (``np.float32(1e-4)``)."""


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------

def _as_int(value, name: str, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise DeepEPTypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < minimum:
        raise DeepEPInvalid(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_num_experts(num_experts, num_ranks: int) -> int:
    num_experts = _as_int(num_experts, "num_experts", 1)
    if num_experts % num_ranks != 0:
        raise DeepEPInvalid(
            f"num_experts={num_experts} must be a multiple of the number of ranks {num_ranks}")
    return num_experts


def _check_topk_idx(topk_idx, num_experts: int, name: str = "topk_idx",
                    num_tokens: Optional[int] = None) -> np.ndarray:
    if not isinstance(topk_idx, np.ndarray):
        raise DeepEPTypeError(f"{name} must be a numpy array, got {type(topk_idx).__name__}")
    if topk_idx.dtype.kind not in "iu":
        raise DeepEPTypeError(f"{name} must be an int64 array, got dtype {topk_idx.dtype}")
    if topk_idx.ndim != 2:
        raise DeepEPInvalid(f"{name} must be 2-D [num_tokens, num_topk], got shape {topk_idx.shape}")
    if num_tokens is not None and topk_idx.shape[0] != num_tokens:
        raise DeepEPInvalid(
            f"{name} has {topk_idx.shape[0]} rows, expected {num_tokens} (one per token)")
    if topk_idx.size:
        lo = int(topk_idx.min())
        hi = int(topk_idx.max())
        if lo < -1:
            raise DeepEPInvalid(f"{name} contains expert id {lo} < -1 (-1 means no expert)")
        if hi >= num_experts:
            raise DeepEPInvalid(f"{name} contains expert id {hi} >= num_experts={num_experts}")
    return topk_idx.astype(np.int64, copy=False)


def _check_weights(w, shape: Tuple[int, int], name: str) -> np.ndarray:
    if not isinstance(w, np.ndarray):
        raise DeepEPTypeError(f"{name} must be a numpy array, got {type(w).__name__}")
    if w.dtype != np.float32:
        raise DeepEPTypeError(f"{name} must be float32, got dtype {w.dtype}")
    if w.shape != tuple(shape):
        raise DeepEPInvalid(f"{name} must have shape {tuple(shape)}, got {w.shape}")
    return w


def _check_list(values, num_ranks: Optional[int], name: str) -> list:
    if not isinstance(values, (list, tuple)):
        raise DeepEPTypeError(f"{name} must be a list over ranks, got {type(values).__name__}")
    if num_ranks is not None and len(values) != num_ranks:
        raise DeepEPInvalid(f"{name} has {len(values)} entries, expected one per rank ({num_ranks})")
    if len(values) == 0:
        raise DeepEPInvalid(f"{name} must have at least one rank")
    return list(values)


def _check_x_list(xs, name: str = "xs") -> Tuple[list, int, np.dtype]:
    xs = _check_list(xs, None, name)
    hidden = None
    dtype = None
    for r, x in enumerate(xs):
        if not isinstance(x, np.ndarray):
            raise DeepEPTypeError(f"{name}[{r}] must be a numpy array, got {type(x).__name__}")
        if x.ndim != 2:
            raise DeepEPInvalid(f"{name}[{r}] must be 2-D [num_tokens, hidden], got shape {x.shape}")
        if hidden is None:
            hidden, dtype = x.shape[1], x.dtype
        if x.shape[1] != hidden:
            raise DeepEPInvalid(f"{name}[{r}] has hidden {x.shape[1]}, {name}[0] has {hidden}")
        if x.dtype != dtype:
            raise DeepEPTypeError(f"{name}[{r}] has dtype {x.dtype}, {name}[0] has {dtype}")
    return xs, hidden, dtype


def _align_up(values: np.ndarray, alignment: int) -> np.ndarray:
    return ((values + alignment - 1) // alignment) * alignment


# --------------------------------------------------------------------------------------------
# layout
# --------------------------------------------------------------------------------------------

def token_in_rank(topk_idx: np.ndarray, num_experts: int, num_ranks: int) -> np.ndarray:
    """Which ranks every token must be sent to.

    Arguments:
        topk_idx: int64 ``[T, K]`` global expert ids, -1 = no expert (already validated).
        num_experts: ``E``, a multiple of ``num_ranks``.
        num_ranks: ``R``.

    Returns:
        bool ``[T, R]``: ``[t, r]`` is True when at least one of token ``t``'s experts lives on
        rank ``r`` (expert ``e`` lives on rank ``e // (E // R)``).
    """
    num_tokens = topk_idx.shape[0]
    experts_per_rank = num_experts // num_ranks
    out = np.zeros((num_tokens, num_ranks), dtype=bool)
    valid = topk_idx >= 0
    rows = np.nonzero(valid)[0]
    out[rows, topk_idx[valid] // experts_per_rank] = True
    return out


def get_dispatch_layout(topk_idx, num_experts, num_ranks, ranks_per_node=None):
    """Per-rank dispatch layout of one rank's tokens (same meaning as DeepEP).

    Arguments:
        topk_idx: int64 ``[T, K]`` global expert ids of this rank's tokens, -1 = no expert.
            ``T`` may be 0.
        num_experts: ``E``, total number of experts, a multiple of ``num_ranks``.
        num_ranks: ``R``, number of ranks.
        ranks_per_node: ranks per node; node of rank ``r`` is ``r // ranks_per_node``. ``None`` or
            ``>= num_ranks`` means a single node.

    Returns:
        ``(num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert,
        is_token_in_rank)``:

        * ``num_tokens_per_rank``: int32 ``[R]``, tokens with at least one expert on rank ``r``
          (a token counts once per rank however many of its experts are there).
        * ``num_tokens_per_rdma_rank``: int32 ``[R // ranks_per_node]``, tokens with at least one
          expert on node ``n`` (once per token), or ``None`` for a single node.
        * ``num_tokens_per_expert``: int32 ``[E]``, number of ``(token, k)`` entries equal to
          ``e`` (a token listing the same expert twice counts twice).
        * ``is_token_in_rank``: bool ``[T, R]``, see :func:`token_in_rank`.

    Raises:
        DeepEPInvalid: bad ``num_experts``, ``num_ranks``, ``ranks_per_node`` or expert ids.
    """
    num_ranks = _as_int(num_ranks, "num_ranks", 1)
    num_experts = _check_num_experts(num_experts, num_ranks)
    topk_idx = _check_topk_idx(topk_idx, num_experts)
    rdma_groups = None
    if ranks_per_node is not None:
        ranks_per_node = _as_int(ranks_per_node, "ranks_per_node", 1)
        if ranks_per_node < num_ranks:
            if num_ranks % ranks_per_node != 0:
                raise DeepEPInvalid(
                    f"ranks_per_node={ranks_per_node} must divide num_ranks={num_ranks}")
            rdma_groups = num_ranks // ranks_per_node
    is_token_in_rank = token_in_rank(topk_idx, num_experts, num_ranks)
    num_tokens = topk_idx.shape[0]
    num_tokens_per_rank = is_token_in_rank.sum(axis=0, dtype=np.int64).astype(np.int32)
    num_tokens_per_rdma_rank = None
    if rdma_groups is not None:
        per_node = is_token_in_rank.reshape(num_tokens, rdma_groups, ranks_per_node).any(axis=2)
        num_tokens_per_rdma_rank = per_node.sum(axis=0, dtype=np.int64).astype(np.int32)
    num_tokens_per_expert = np.bincount(topk_idx[topk_idx >= 0],
                                        minlength=num_experts).astype(np.int32)
    return num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank


# --------------------------------------------------------------------------------------------
# high-throughput dispatch
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class DispatchPiece:
    """What one source rank sends to one destination rank in a dispatch.

    Fields (``n`` = number of tokens sent, in ascending token order):
        src_idx: int32 ``[n]``, index of each token on the source rank.
        x: ``[n, H]`` token rows (dtype of the input).
        x_scales: ``[n, S]`` scale rows, or ``None``.
        topk_idx: int64 ``[n, K]`` GLOBAL expert ids, or ``None`` (cached dispatch).
        topk_weights: float32 ``[n, K]``, or ``None``.
    """

    src_idx: np.ndarray
    x: np.ndarray
    x_scales: Optional[np.ndarray]
    topk_idx: Optional[np.ndarray]
    topk_weights: Optional[np.ndarray]


@dataclasses.dataclass(frozen=True, eq=False)
class DispatchResult:
    """What one receiving rank ``r`` holds after a high-throughput dispatch.

    ``N`` = number of rows: the number of received tokens ``num_recv_tokens``, or exactly
    ``num_worst_tokens`` when that was > 0 (rows ``num_recv_tokens..N-1`` are padding).
    Rows are ordered by source rank, then by source token index.

    Fields:
        recv_x: ``[N, H]``, same dtype as the input ``x`` (padding rows zero).
        recv_x_scales: ``[N, S]`` same dtype as the input scales (padding zero), or ``None``.
        recv_topk_idx: int64 ``[N, K]``: LOCAL expert id ``e - r * L`` where the global expert
            ``e`` lives on rank ``r``, else -1 (padding rows -1). ``None`` in cached mode.
        recv_topk_weights: float32 ``[N, K]``: the weight where the expert is local, else 0
            (padding 0). ``None`` when no weights were dispatched.
        num_recv_tokens_per_expert_list: Python list of ``L`` ints, the number of received
            ``(token, k)`` entries per local expert, each rounded up to a multiple of
            ``expert_alignment``. EMPTY list when ``num_worst_tokens > 0`` (no host sync, as
            DeepEP). Empty in cached mode.
        num_recv_tokens_per_expert: int32 ``[L]``, the same (aligned) counts, always filled
            (``None`` in cached mode, where routing is not sent).
        recv_src_rank: int32 ``[N]``: source rank of each row (padding -1).
        recv_src_idx: int32 ``[N]``: token index on the source rank (padding -1).
        rank_prefix_matrix: int32 ``[R, R]``: ``[i][j]`` = number of tokens rank ``j`` receives
            from ranks ``0..i`` inclusive (so rank ``j``'s rows from source ``s`` are
            ``rank_prefix_matrix[s-1][j] .. rank_prefix_matrix[s][j]``, with ``[-1]`` = 0).
            Identical on every rank.
        num_recv_tokens: int, the number of real (unpadded) received rows.
        src_num_tokens: tuple of ``R`` ints, ``T_s`` of every source rank (used by combine).
        rank: the receiving rank ``r``.
        num_ranks: ``R``.
        num_experts: ``E``.
        num_worst_tokens: the ``num_worst_tokens`` of the call (0 = unpadded).
    """

    recv_x: np.ndarray
    recv_x_scales: Optional[np.ndarray]
    recv_topk_idx: Optional[np.ndarray]
    recv_topk_weights: Optional[np.ndarray]
    num_recv_tokens_per_expert_list: List[int]
    num_recv_tokens_per_expert: Optional[np.ndarray]
    recv_src_rank: np.ndarray
    recv_src_idx: np.ndarray
    rank_prefix_matrix: np.ndarray
    num_recv_tokens: int
    src_num_tokens: Tuple[int, ...]
    rank: int
    num_ranks: int
    num_experts: int
    num_worst_tokens: int


def rank_prefix_matrix_from_counts(counts: np.ndarray) -> np.ndarray:
    """Build DeepEP's ``rank_prefix_matrix`` from the per-pair token counts.

    Arguments:
        counts: integer ``[R, R]``: ``counts[s][r]`` = tokens rank ``s`` sends to rank ``r``
            (row ``s`` is rank ``s``'s ``num_tokens_per_rank``).

    Returns:
        int32 ``[R, R]``: ``[i][j]`` = tokens rank ``j`` receives from ranks ``0..i`` inclusive.
    """
    return np.cumsum(np.asarray(counts, dtype=np.int64), axis=0).astype(np.int32)


def dispatch_pack(x, x_scales, topk_idx, topk_weights, is_token_in_rank) -> List[DispatchPiece]:
    """Sender side of a dispatch: split one rank's tokens per destination rank.

    Arguments:
        x: ``[T, H]`` tokens of this rank.
        x_scales: ``[T, S]`` or ``None``.
        topk_idx: int64 ``[T, K]`` global expert ids, or ``None`` (cached dispatch).
        topk_weights: float32 ``[T, K]`` or ``None``.
        is_token_in_rank: bool ``[T, R]`` (see :func:`token_in_rank`).

    Returns:
        list of ``R`` :class:`DispatchPiece`, entry ``r`` = what goes to rank ``r``, tokens in
        ascending index order.
    """
    pieces = []
    for r in range(is_token_in_rank.shape[1]):
        rows = np.nonzero(is_token_in_rank[:, r])[0]
        pieces.append(DispatchPiece(
            src_idx=rows.astype(np.int32),
            x=np.ascontiguousarray(x[rows]),
            x_scales=None if x_scales is None else np.ascontiguousarray(x_scales[rows]),
            topk_idx=None if topk_idx is None else np.ascontiguousarray(topk_idx[rows]),
            topk_weights=None if topk_weights is None else np.ascontiguousarray(topk_weights[rows]),
        ))
    return pieces


def dispatch_unpack(pieces: Sequence[DispatchPiece], *, rank: int, num_experts: int,
                    rank_prefix_matrix: np.ndarray, src_num_tokens: Sequence[int],
                    x_template: np.ndarray, scales_template: Optional[np.ndarray],
                    num_topk: int, with_topk: bool, with_weights: bool,
                    expert_alignment: int = 1, num_worst_tokens: int = 0) -> DispatchResult:
    """Receiver side of a dispatch: assemble the pieces from every source rank.

    Arguments:
        pieces: ``R`` :class:`DispatchPiece`, entry ``s`` = what rank ``s`` sent to this rank.
        rank: this (receiving) rank ``r``.
        num_experts: ``E``.
        rank_prefix_matrix: int32 ``[R, R]`` (see :class:`DispatchResult`).
        src_num_tokens: ``T_s`` of every rank.
        x_template: any array with the dtype and hidden size of ``x`` (e.g. ``x[:0]``).
        scales_template: same for the scales, or ``None`` without scales.
        num_topk: ``K``.
        with_topk: whether topk_idx was dispatched (False in cached mode).
        with_weights: whether topk_weights were dispatched.
        expert_alignment: alignment of the per-expert counts (>= 1).
        num_worst_tokens: 0, or the fixed padded number of rows.

    Returns:
        :class:`DispatchResult` of this rank.

    Raises:
        DeepEPInvalid: more tokens received than ``num_worst_tokens``.
    """
    num_ranks = len(pieces)
    experts_per_rank = num_experts // num_ranks
    hidden = x_template.shape[1]
    num_recv = int(sum(p.x.shape[0] for p in pieces))
    if num_worst_tokens > 0 and num_recv > num_worst_tokens:
        raise DeepEPInvalid(
            f"num_worst_tokens={num_worst_tokens} is too small: rank {rank} receives "
            f"{num_recv} tokens")
    rows = num_worst_tokens if num_worst_tokens > 0 else num_recv

    recv_x = np.zeros((rows, hidden), dtype=x_template.dtype)
    recv_x[:num_recv] = _concat([p.x for p in pieces], (0, hidden), x_template.dtype)
    recv_x_scales = None
    if scales_template is not None:
        ncols = scales_template.shape[1]
        recv_x_scales = np.zeros((rows, ncols), dtype=scales_template.dtype)
        recv_x_scales[:num_recv] = _concat([p.x_scales for p in pieces], (0, ncols),
                                           scales_template.dtype)
    recv_src_rank = np.full(rows, -1, dtype=np.int32)
    recv_src_rank[:num_recv] = np.repeat(np.arange(num_ranks, dtype=np.int32),
                                         [p.x.shape[0] for p in pieces])
    recv_src_idx = np.full(rows, -1, dtype=np.int32)
    recv_src_idx[:num_recv] = _concat([p.src_idx for p in pieces], (0,), np.int32)

    recv_topk_idx = None
    recv_topk_weights = None
    counts_list: List[int] = []
    counts = None
    if with_topk:
        global_idx = _concat([p.topk_idx for p in pieces], (0, num_topk), np.int64)
        lo = rank * experts_per_rank
        local_mask = (global_idx >= lo) & (global_idx < lo + experts_per_rank)
        recv_topk_idx = np.full((rows, num_topk), -1, dtype=np.int64)
        recv_topk_idx[:num_recv] = np.where(local_mask, global_idx - lo, -1)
        raw = np.bincount(recv_topk_idx[:num_recv][local_mask] if num_recv else
                          np.zeros(0, np.int64), minlength=experts_per_rank)
        counts = _align_up(raw.astype(np.int64), expert_alignment).astype(np.int32)
        counts_list = [] if num_worst_tokens > 0 else [int(c) for c in counts]
        if with_weights:
            w = _concat([p.topk_weights for p in pieces], (0, num_topk), np.float32)
            recv_topk_weights = np.zeros((rows, num_topk), dtype=np.float32)
            recv_topk_weights[:num_recv] = np.where(local_mask, w, np.float32(0))
    return DispatchResult(
        recv_x=recv_x, recv_x_scales=recv_x_scales, recv_topk_idx=recv_topk_idx,
        recv_topk_weights=recv_topk_weights, num_recv_tokens_per_expert_list=counts_list,
        num_recv_tokens_per_expert=counts, recv_src_rank=recv_src_rank,
        recv_src_idx=recv_src_idx, rank_prefix_matrix=np.asarray(rank_prefix_matrix, np.int32),
        num_recv_tokens=num_recv, src_num_tokens=tuple(int(t) for t in src_num_tokens),
        rank=rank, num_ranks=num_ranks, num_experts=num_experts,
        num_worst_tokens=num_worst_tokens)


def _concat(arrays, empty_shape, dtype) -> np.ndarray:
    arrays = [a for a in arrays if a is not None and a.shape[0] > 0]
    if not arrays:
        return np.zeros(empty_shape, dtype=dtype)
    return np.concatenate(arrays, axis=0)


def dispatch(xs, topk_idx, topk_weights, num_experts, expert_alignment=1, num_worst_tokens=0,
             x_scales=None) -> List[DispatchResult]:
    """High-throughput dispatch over ``R`` simulated ranks.

    Every token of source rank ``s`` goes, at most once, to every rank that holds at least one
    of its experts. Receivers order rows by source rank, then by source token index.

    Arguments:
        xs: list over ranks of ``[T_s, H]`` arrays, one dtype for all ranks (bf16, float32,
            float8_e4m3fn, ...). ``T_s`` may be 0.
        topk_idx: list over ranks of int64 ``[T_s, K]``, global expert ids, -1 = no expert.
        topk_weights: list over ranks of float32 ``[T_s, K]``, or ``None``.
        num_experts: ``E``, a multiple of ``R = len(xs)``.
        expert_alignment: each entry of ``num_recv_tokens_per_expert_list`` is rounded up to a
            multiple of it (>= 1).
        num_worst_tokens: 0, or pad every rank's outputs to exactly this many rows.
        x_scales: list over ranks of ``[T_s, S]`` scales (float32 ``[T_s, H/128]`` for FP8
            input, int32 for packed UE8M0), or ``None``. Only allowed with float8_e4m3fn ``xs``.

    Returns:
        list over receiving ranks of :class:`DispatchResult`.

    Raises:
        DeepEPInvalid / DeepEPTypeError: bad argument (the message names it), or a rank
        receiving more than ``num_worst_tokens`` tokens.
    """
    xs, hidden, dtype = _check_x_list(xs, "xs")
    num_ranks = len(xs)
    num_experts = _check_num_experts(num_experts, num_ranks)
    expert_alignment = _as_int(expert_alignment, "expert_alignment", 1)
    num_worst_tokens = _as_int(num_worst_tokens, "num_worst_tokens", 0)
    topk_idx = _check_list(topk_idx, num_ranks, "topk_idx")
    idx = [_check_topk_idx(topk_idx[s], num_experts, f"topk_idx[{s}]", xs[s].shape[0])
           for s in range(num_ranks)]
    num_topk = idx[0].shape[1]
    for s in range(num_ranks):
        if idx[s].shape[1] != num_topk:
            raise DeepEPInvalid(f"topk_idx[{s}] has {idx[s].shape[1]} columns, "
                                f"topk_idx[0] has {num_topk}")
    weights = None
    if topk_weights is not None:
        topk_weights = _check_list(topk_weights, num_ranks, "topk_weights")
        weights = [_check_weights(topk_weights[s], idx[s].shape, f"topk_weights[{s}]")
                   for s in range(num_ranks)]
    scales = None
    if x_scales is not None:
        if dtype != FP8:
            raise DeepEPTypeError(f"x_scales given but xs have dtype {dtype}, expected float8_e4m3fn")
        x_scales = _check_list(x_scales, num_ranks, "x_scales")
        scales = []
        for s in range(num_ranks):
            sc = x_scales[s]
            if not isinstance(sc, np.ndarray) or sc.ndim != 2 or sc.shape[0] != xs[s].shape[0]:
                raise DeepEPInvalid(
                    f"x_scales[{s}] must be a 2-D array with {xs[s].shape[0]} rows, got "
                    f"{getattr(sc, 'shape', type(sc).__name__)}")
            if sc.dtype not in (np.float32, np.int32):
                raise DeepEPTypeError(f"x_scales[{s}] must be float32 (or packed int32), "
                                      f"got dtype {sc.dtype}")
            if sc.shape[1] != x_scales[0].shape[1] or sc.dtype != x_scales[0].dtype:
                raise DeepEPInvalid(f"x_scales[{s}] has shape {sc.shape} dtype {sc.dtype}, "
                                    f"x_scales[0] has {x_scales[0].shape} {x_scales[0].dtype}")
            scales.append(sc)

    in_rank = [token_in_rank(idx[s], num_experts, num_ranks) for s in range(num_ranks)]
    counts = np.stack([m.sum(axis=0) for m in in_rank])
    prefix = rank_prefix_matrix_from_counts(counts)
    if num_worst_tokens > 0:
        worst = prefix[-1]
        too_many = np.nonzero(worst > num_worst_tokens)[0]
        if too_many.size:
            r = int(too_many[0])
            raise DeepEPInvalid(f"num_worst_tokens={num_worst_tokens} is too small: rank {r} "
                                f"receives {int(worst[r])} tokens")
    sent = [dispatch_pack(xs[s], None if scales is None else scales[s], idx[s],
                          None if weights is None else weights[s], in_rank[s])
            for s in range(num_ranks)]
    src_num_tokens = [x.shape[0] for x in xs]
    return [dispatch_unpack([sent[s][r] for s in range(num_ranks)], rank=r,
                            num_experts=num_experts, rank_prefix_matrix=prefix,
                            src_num_tokens=src_num_tokens, x_template=xs[r][:0],
                            scales_template=None if scales is None else scales[r][:0],
                            num_topk=num_topk, with_topk=True, with_weights=weights is not None,
                            expert_alignment=expert_alignment, num_worst_tokens=num_worst_tokens)
            for r in range(num_ranks)]


# --------------------------------------------------------------------------------------------
# high-throughput combine
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class CombinePiece:
    """What a receiving rank sends back to one source rank in a combine.

    Fields (rows in the order the source sent them, i.e. ascending source token index):
        y: ``[n, H]`` rows of the combine input.
        topk_weights: float32 ``[n, K]`` or ``None``.
    """

    y: np.ndarray
    topk_weights: Optional[np.ndarray]


def combine_pack(y, topk_weights, rank_prefix_matrix, rank) -> List[CombinePiece]:
    """Receiver side of a combine: split ``y`` rows back per source rank.

    Arguments:
        y: ``[N, H]`` rows aligned with this rank's dispatch output (padding rows ignored).
        topk_weights: float32 ``[N, K]`` or ``None``.
        rank_prefix_matrix: int32 ``[R, R]`` of the dispatch.
        rank: this rank.

    Returns:
        list of ``R`` :class:`CombinePiece`, entry ``s`` = rows that came from rank ``s``.
    """
    column = np.concatenate([[0], np.asarray(rank_prefix_matrix)[:, rank].astype(np.int64)])
    pieces = []
    for s in range(len(column) - 1):
        b, e = int(column[s]), int(column[s + 1])
        pieces.append(CombinePiece(
            y=np.ascontiguousarray(y[b:e]),
            topk_weights=None if topk_weights is None else np.ascontiguousarray(topk_weights[b:e])))
    return pieces


def _normalize_bias(bias, num_tokens: int, hidden: int, name: str) -> List[np.ndarray]:
    if bias is None:
        return []
    terms = list(bias) if isinstance(bias, (tuple, list)) else [bias]
    if len(terms) > 2:
        raise DeepEPInvalid(f"{name} must be an array or a pair of arrays, got {len(terms)} items")
    out = []
    for i, b in enumerate(terms):
        if b is None:
            continue
        if not isinstance(b, np.ndarray):
            raise DeepEPTypeError(f"{name} term {i} must be a numpy array, got {type(b).__name__}")
        if b.shape != (num_tokens, hidden):
            raise DeepEPInvalid(f"{name} term {i} must have shape {(num_tokens, hidden)}, "
                                f"got {b.shape}")
        out.append(b.astype(np.float32))
    return out


def combine_reduce(token_indices: Sequence[np.ndarray], pieces: Sequence[CombinePiece], *,
                   num_tokens: int, hidden: int, out_dtype, num_topk: int = 0,
                   with_weights: bool = False, bias=None):
    """Source side of a combine: reduce the copies that came back from every rank.

    Arguments:
        token_indices: list over receiving ranks ``r`` of int ``[n_r]``: the local token index
            of each row of ``pieces[r]`` (``np.nonzero(is_token_in_rank[:, r])[0]``).
        pieces: list over receiving ranks of :class:`CombinePiece`.
        num_tokens: ``T`` of this rank.
        hidden: ``H``.
        out_dtype: dtype of the combined output (dtype of the combine input).
        num_topk: ``K`` (for the weights output).
        with_weights: whether weights are reduced.
        bias: ``None``, a ``[T, H]`` array, or a pair ``(b0, b1)`` (either may be ``None``).

    Returns:
        ``(combined_x [T, H] out_dtype, combined_topk_weights float32 [T, K] or None)``;
        float32 rule: ``acc = +0.0``, ``acc += b0``, ``acc += b1``, then ``acc += float32(y_r)``
        for ``r`` ascending; ``cast(acc)`` round-to-nearest-even.
    """
    acc = np.zeros((num_tokens, hidden), dtype=np.float32)
    for b in _normalize_bias(bias, num_tokens, hidden, "bias"):
        acc += b
    w_acc = np.zeros((num_tokens, num_topk), dtype=np.float32) if with_weights else None
    for idx, piece in zip(token_indices, pieces):
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size == 0:
            continue
        acc[idx] += piece.y.astype(np.float32)
        if with_weights:
            w_acc[idx] += piece.topk_weights.astype(np.float32)
    return acc.astype(out_dtype), w_acc


def combine(ys, dispatch_results, topk_weights=None, bias=None, num_tokens=None):
    """High-throughput combine: every source token gets the sum of its copies back.

    Arguments:
        ys: list over receiving ranks of ``[N_r, H]`` arrays, row-aligned with
            ``dispatch_results[r].recv_x`` (padding rows are ignored), one dtype.
        dispatch_results: list over ranks of :class:`DispatchResult` from :func:`dispatch`.
        topk_weights: list over receiving ranks of float32 ``[N_r, K]``, or ``None``.
        bias: ``None``, or a list over SOURCE ranks where each entry is ``None``, a ``[T_s, H]``
            array, or a pair ``(b0, b1)`` of such arrays (entries may be ``None``).
        num_tokens: list of ``T_s`` per source rank; default
            ``dispatch_results[0].src_num_tokens`` (stored by :func:`dispatch`).

    Returns:
        list over source ranks ``s`` of ``(combined_x [T_s, H] dtype of ys,
        combined_topk_weights float32 [T_s, K] or None)``. ``combined_x[s][t] =
        cast(b0 + b1 + sum_{r ascending} float32(ys[r][row of (s, t)]))`` in float32 (see
        :func:`combine_reduce`); tokens sent nowhere get only the bias (or zeros).

    Raises:
        DeepEPInvalid / DeepEPTypeError: bad argument, naming it.
    """
    dispatch_results = _check_list(dispatch_results, None, "dispatch_results")
    num_ranks = len(dispatch_results)
    for r, d in enumerate(dispatch_results):
        if not isinstance(d, DispatchResult):
            raise DeepEPTypeError(f"dispatch_results[{r}] must be a DispatchResult, "
                                  f"got {type(d).__name__}")
    ys = _check_list(ys, num_ranks, "ys")
    ys, hidden, dtype = _check_x_list(ys, "ys")
    for r in range(num_ranks):
        rows = dispatch_results[r].recv_x.shape[0]
        if ys[r].shape[0] != rows:
            raise DeepEPInvalid(f"ys[{r}] has {ys[r].shape[0]} rows, the dispatch of rank {r} "
                                f"produced {rows}")
    if num_tokens is None:
        num_tokens = dispatch_results[0].src_num_tokens
    num_tokens = _check_list(list(num_tokens), num_ranks, "num_tokens")
    for s in range(num_ranks):
        if num_tokens[s] != dispatch_results[0].src_num_tokens[s]:
            raise DeepEPInvalid(f"num_tokens[{s}]={num_tokens[s]} but rank {s} dispatched "
                                f"{dispatch_results[0].src_num_tokens[s]} tokens")
    num_topk = 0
    if topk_weights is not None:
        topk_weights = _check_list(topk_weights, num_ranks, "topk_weights")
        w0 = topk_weights[0]
        if not isinstance(w0, np.ndarray) or w0.ndim != 2:
            raise DeepEPInvalid(f"topk_weights[0] must be a 2-D float32 array [N_0, K], got "
                                f"{getattr(w0, 'shape', type(w0).__name__)}")
        num_topk = w0.shape[1]
        for r in range(num_ranks):
            _check_weights(topk_weights[r], (ys[r].shape[0], num_topk), f"topk_weights[{r}]")
    if bias is not None:
        bias = _check_list(bias, num_ranks, "bias")
    sent = [combine_pack(ys[r], None if topk_weights is None else topk_weights[r],
                         dispatch_results[r].rank_prefix_matrix, r) for r in range(num_ranks)]
    out = []
    for s in range(num_ranks):
        token_indices = []
        for r in range(num_ranks):
            d = dispatch_results[r]
            sel = d.recv_src_rank[:d.num_recv_tokens] == s
            token_indices.append(d.recv_src_idx[:d.num_recv_tokens][sel])
        out.append(combine_reduce(
            token_indices, [sent[r][s] for r in range(num_ranks)], num_tokens=int(num_tokens[s]),
            hidden=hidden, out_dtype=dtype, num_topk=num_topk,
            with_weights=topk_weights is not None,
            bias=None if bias is None else bias[s]))
    return out


# --------------------------------------------------------------------------------------------
# FP8
# --------------------------------------------------------------------------------------------

def _pow2_ceil_exponent(v: np.ndarray) -> np.ndarray:
    """``ceil(log2(v))`` exactly, for positive NORMAL float32 ``v``, from the bits of ``v``."""
    bits = np.ascontiguousarray(v, dtype=np.float32).view(np.uint32)
    exponent = ((bits >> np.uint32(23)) & np.uint32(0xFF)).astype(np.int32) - 127
    mantissa = bits & np.uint32(0x7FFFFF)
    return exponent + (mantissa != 0).astype(np.int32)


def pack_ue8m0(exponents: np.ndarray) -> np.ndarray:
    """Pack power-of-two scale exponents into UE8M0 words.

    Arguments:
        exponents: integer ``[..., G]``, the unbiased exponent ``p`` of each block scale
            ``2**p``, ``-127 < p <= 128``.

    Returns:
        int32 ``[..., ceil(G / 4)]``: byte ``i`` (little-endian, bits ``8i..8i+7``) of word ``j``
        = ``p + 127`` of block ``4j + i``; padding bytes are 0.
    """
    exponents = np.asarray(exponents)
    g = exponents.shape[-1]
    words = (g + 3) // 4
    biased = np.zeros(exponents.shape[:-1] + (words * 4,), dtype=np.uint32)
    biased[..., :g] = (exponents.astype(np.int64) + 127).astype(np.uint32)
    biased = biased.reshape(exponents.shape[:-1] + (words, 4))
    packed = (biased[..., 0] | (biased[..., 1] << np.uint32(8)) | (biased[..., 2] << np.uint32(16))
              | (biased[..., 3] << np.uint32(24)))
    return np.ascontiguousarray(packed.astype(np.uint32)).view(np.int32)


def unpack_ue8m0(packed: np.ndarray, num_blocks: int) -> np.ndarray:
    """Decode UE8M0 words (see :func:`pack_ue8m0`) into float32 scales.

    Arguments:
        packed: int32 ``[..., ceil(num_blocks / 4)]``.
        num_blocks: ``G``, number of 128-channel blocks.

    Returns:
        float32 ``[..., G]``: ``2 ** (byte - 127)`` per block.
    """
    words = np.ascontiguousarray(packed, dtype=np.int32).view(np.uint32)
    shifts = (np.arange(4, dtype=np.uint32) * np.uint32(8))
    bytes_ = (words[..., None] >> shifts) & np.uint32(0xFF)
    bytes_ = bytes_.reshape(words.shape[:-1] + (words.shape[-1] * 4,))[..., :num_blocks]
    return np.ldexp(np.float32(1.0), bytes_.astype(np.int32) - 127).astype(np.float32)


def per_token_cast_to_fp8(x, round_scale=False, use_ue8m0=False):
    """Quantize tokens to float8_e4m3fn with one float32 scale per 128 channels.

    Exact float32 operation order (a CUDA kernel reproduces it bit for bit; no fast math, no
    flush-to-zero), per token and per block of 128 channels ``xb = float32(x[t, 128g:128g+128])``:

    1. ``amax = max(|xb|)``; ``amax = max(amax, float32(1e-4))``.
    2. Not ``round_scale``: ``scale = float32(448) / amax`` and ``scale_inv = amax / float32(448)``
       (two independent correctly rounded float32 divisions; ``scale`` is NOT ``1/scale_inv``).
       ``round_scale``: ``v = amax / float32(448)`` (float32 division, RNE);
       ``p = ceil(log2(v))`` computed exactly from the bits of ``v`` (biased exponent - 127,
       plus 1 if any mantissa bit is set; ``v`` is always a normal number);
       ``scale_inv = 2**p``, ``scale = 2**-p`` (exact).
    3. ``q = float8_e4m3fn(clip(xb * scale, -448, 448))``: float32 multiply (RNE), clip, then
       round-to-nearest-even into e4m3.

    Arguments:
        x: ``[T, H]`` bf16 or float32, ``H % 128 == 0``.
        round_scale: use power-of-two scales.
        use_ue8m0: return the scales packed as UE8M0 (requires ``round_scale=True``).

    Returns:
        ``(q, scales)``: ``q`` float8_e4m3fn ``[T, H]``; ``scales`` float32 ``[T, H/128]``
        (``scale_inv`` per block, dequantize with ``float32(q) * scale_inv``), or with
        ``use_ue8m0`` int32 ``[T, ceil(H/128/4)]`` packed as in :func:`pack_ue8m0`.

    Raises:
        DeepEPInvalid: ``H % 128 != 0``, bad shape, or ``use_ue8m0`` without ``round_scale``.
        DeepEPTypeError: ``x`` not bf16/float32.
    """
    if not isinstance(x, np.ndarray):
        raise DeepEPTypeError(f"x must be a numpy array, got {type(x).__name__}")
    if x.dtype not in (BF16, np.dtype(np.float32)):
        raise DeepEPTypeError(f"x must be bfloat16 or float32, got dtype {x.dtype}")
    if x.ndim != 2:
        raise DeepEPInvalid(f"x must be 2-D [num_tokens, hidden], got shape {x.shape}")
    if x.shape[1] % FP8_BLOCK != 0:
        raise DeepEPInvalid(f"x hidden size {x.shape[1]} must be a multiple of {FP8_BLOCK} for FP8")
    if use_ue8m0 and not round_scale:
        raise DeepEPInvalid("use_ue8m0=True requires round_scale=True")
    num_tokens, hidden = x.shape
    groups = hidden // FP8_BLOCK
    xb = x.astype(np.float32).reshape(num_tokens, groups, FP8_BLOCK)
    if num_tokens:
        amax = np.abs(xb).max(axis=2)
    else:
        amax = np.zeros((0, groups), dtype=np.float32)
    amax = np.maximum(amax, FP8_AMAX_MIN).astype(np.float32)
    if round_scale:
        v = (amax / FP8_MAX).astype(np.float32)
        p = _pow2_ceil_exponent(v)
        scale_inv = np.ldexp(np.float32(1.0), p).astype(np.float32)
        scale = np.ldexp(np.float32(1.0), -p).astype(np.float32)
    else:
        scale = (FP8_MAX / amax).astype(np.float32)
        scale_inv = (amax / FP8_MAX).astype(np.float32)
    scaled = (xb * scale[:, :, None]).astype(np.float32)
    q = np.clip(scaled, -FP8_MAX, FP8_MAX).astype(FP8).reshape(num_tokens, hidden)
    if use_ue8m0:
        return q, pack_ue8m0(p)
    return q, scale_inv


def fp8_to_float(q, scales, use_ue8m0=False):
    """Dequantize FP8 data: ``float32(q) * scale`` per 128-channel block.

    Arguments:
        q: float8_e4m3fn ``[..., H]``, ``H % 128 == 0``.
        scales: float32 ``[..., H/128]``, or with ``use_ue8m0`` int32 ``[..., ceil(H/128/4)]``.
        use_ue8m0: whether ``scales`` are packed UE8M0.

    Returns:
        float32 ``[..., H]``.
    """
    if q.dtype != FP8:
        raise DeepEPTypeError(f"q must be float8_e4m3fn, got dtype {q.dtype}")
    hidden = q.shape[-1]
    if hidden % FP8_BLOCK != 0:
        raise DeepEPInvalid(f"q hidden size {hidden} must be a multiple of {FP8_BLOCK}")
    groups = hidden // FP8_BLOCK
    if use_ue8m0:
        s = unpack_ue8m0(scales, groups)
    else:
        s = np.asarray(scales, dtype=np.float32)
    if s.shape != q.shape[:-1] + (groups,):
        raise DeepEPInvalid(f"scales decode to shape {s.shape}, expected {q.shape[:-1] + (groups,)}")
    qf = q.astype(np.float32).reshape(q.shape[:-1] + (groups, FP8_BLOCK))
    return (qf * s[..., None]).astype(np.float32).reshape(q.shape)


# --------------------------------------------------------------------------------------------
# low latency
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class LowLatencyPiece:
    """What one source rank sends to one destination rank in a low-latency dispatch.

    One row per ``(token, k)`` entry whose expert lives on the destination, ordered by local
    expert, then token index, then ``k``.

    Fields:
        local_expert: int32 ``[n]``.
        src_idx: int32 ``[n]`` token index on the source.
        src_k: int32 ``[n]`` top-k slot.
        x: ``[n, H]`` bf16, or float8_e4m3fn (quantized once at the source).
        x_scales: ``[n, S]`` float32 / packed int32, or ``None`` without FP8.
    """

    local_expert: np.ndarray
    src_idx: np.ndarray
    src_k: np.ndarray
    x: np.ndarray
    x_scales: Optional[np.ndarray]


@dataclasses.dataclass(frozen=True, eq=False)
class LowLatencyDispatchResult:
    """What receiving rank ``r`` holds after a low-latency dispatch.

    Layout: ``M = num_max_dispatch_tokens_per_rank``, ``L = E // R``. The region of local expert
    ``l`` is ``recv_x[l, :recv_count[l]]``: its ``(token, k)`` entries packed contiguously, ordered
    by source rank, then source token index, then ``k`` (a token listing the same expert twice
    occupies two slots). Slots ``recv_count[l]..R*M-1`` are zero (x, scales) and -1 (src info).

    Fields:
        recv_x: ``[L, R*M, H]`` bf16, or float8_e4m3fn with ``use_fp8``.
        recv_x_scales: float32 ``[L, R*M, H/128]``, or int32 ``[L, R*M, ceil(H/512)]`` with
            ``use_ue8m0``; ``None`` without FP8.
        recv_count: int32 ``[L]``, used slots per local expert.
        recv_src_info: int32 ``[L, R*M]``, source token index of each slot (-1 unused).
        recv_src_k: int32 ``[L, R*M]``, top-k slot ``k`` of the entry (-1 unused); needed to tell
            apart two entries of the same token for the same expert.
        layout_begin: int32 ``[L, R]``: first slot of source rank ``s``'s entries for ``l``.
        layout_count: int32 ``[L, R]``: number of source rank ``s``'s entries for ``l``.
        rank, num_ranks, num_experts, num_max_dispatch_tokens_per_rank, hidden, use_fp8,
        use_ue8m0: the call's parameters.

    Property ``layout_range``: int64 ``[L, R]`` = ``(begin << 32) | count``.
    """

    recv_x: np.ndarray
    recv_x_scales: Optional[np.ndarray]
    recv_count: np.ndarray
    recv_src_info: np.ndarray
    recv_src_k: np.ndarray
    layout_begin: np.ndarray
    layout_count: np.ndarray
    rank: int
    num_ranks: int
    num_experts: int
    num_max_dispatch_tokens_per_rank: int
    hidden: int
    use_fp8: bool
    use_ue8m0: bool

    @property
    def layout_range(self) -> np.ndarray:
        """int64 ``[L, R]``: ``(int64(layout_begin) << 32) | layout_count``."""
        return pack_layout_range(self.layout_begin, self.layout_count)


def pack_layout_range(layout_begin: np.ndarray, layout_count: np.ndarray) -> np.ndarray:
    """DeepEP's packed low-latency layout: int64 ``(begin << 32) | count`` per (expert, source)."""
    return (layout_begin.astype(np.int64) << 32) | layout_count.astype(np.int64)


def _ll_entries(topk_idx: np.ndarray, experts_per_rank: int):
    """Valid ``(t, k)`` entries in row-major order, with owner rank and local expert."""
    t, k = np.nonzero(topk_idx >= 0)
    e = topk_idx[t, k]
    return t, k, e // experts_per_rank, e % experts_per_rank


def _ll_dest_order(dest: np.ndarray, local: np.ndarray, r: int) -> np.ndarray:
    """Entry indices going to rank ``r`` ordered by (local expert, token, k)."""
    sel = np.nonzero(dest == r)[0]
    return sel[np.argsort(local[sel], kind="stable")]


def _check_ll_capacity(topk_idx: np.ndarray, num_experts: int, m: int, name: str) -> None:
    if topk_idx.size == 0:
        return
    per_expert = np.bincount(topk_idx[topk_idx >= 0], minlength=num_experts)
    if per_expert.size and per_expert.max() > m:
        e = int(np.argmax(per_expert))
        raise DeepEPInvalid(
            f"{name} sends {int(per_expert[e])} entries to expert {e}, more than "
            f"num_max_dispatch_tokens_per_rank={m} (duplicate expert ids in tokens)")


def low_latency_pack(x, topk_idx, num_experts, num_ranks, use_fp8=True, round_scale=False,
                     use_ue8m0=False) -> List[LowLatencyPiece]:
    """Sender side of a low-latency dispatch (inputs already validated).

    Arguments:
        x: bf16 ``[T, H]``.
        topk_idx: int64 ``[T, K]``.
        num_experts: ``E``.
        num_ranks: ``R``.
        use_fp8, round_scale, use_ue8m0: as :func:`low_latency_dispatch`; every token is
            quantized once here with :func:`per_token_cast_to_fp8`.

    Returns:
        list of ``R`` :class:`LowLatencyPiece`.
    """
    experts_per_rank = num_experts // num_ranks
    if use_fp8:
        data, scales = per_token_cast_to_fp8(x, round_scale=round_scale, use_ue8m0=use_ue8m0)
    else:
        data, scales = x, None
    t, k, dest, local = _ll_entries(topk_idx, experts_per_rank)
    pieces = []
    for r in range(num_ranks):
        order = _ll_dest_order(dest, local, r)
        rows = t[order]
        pieces.append(LowLatencyPiece(
            local_expert=local[order].astype(np.int32), src_idx=rows.astype(np.int32),
            src_k=k[order].astype(np.int32), x=np.ascontiguousarray(data[rows]),
            x_scales=None if scales is None else np.ascontiguousarray(scales[rows])))
    return pieces


def low_latency_unpack(pieces: Sequence[LowLatencyPiece], *, rank: int, num_experts: int,
                       num_max_dispatch_tokens_per_rank: int, hidden: int, use_fp8: bool,
                       use_ue8m0: bool) -> LowLatencyDispatchResult:
    """Receiver side of a low-latency dispatch.

    Arguments:
        pieces: list over source ranks of :class:`LowLatencyPiece` sent to this rank.
        rank: this rank.
        num_experts: ``E``.
        num_max_dispatch_tokens_per_rank: ``M``.
        hidden: ``H``.
        use_fp8, use_ue8m0: the call's flags.

    Returns:
        :class:`LowLatencyDispatchResult`.
    """
    num_ranks = len(pieces)
    experts_per_rank = num_experts // num_ranks
    m = num_max_dispatch_tokens_per_rank
    slots = num_ranks * m
    dtype = FP8 if use_fp8 else BF16
    recv_x = np.zeros((experts_per_rank, slots, hidden), dtype=dtype)
    recv_scales = None
    if use_fp8:
        groups = hidden // FP8_BLOCK
        if use_ue8m0:
            recv_scales = np.zeros((experts_per_rank, slots, (groups + 3) // 4), dtype=np.int32)
        else:
            recv_scales = np.zeros((experts_per_rank, slots, groups), dtype=np.float32)
    src_info = np.full((experts_per_rank, slots), -1, dtype=np.int32)
    src_k = np.full((experts_per_rank, slots), -1, dtype=np.int32)
    begin = np.zeros((experts_per_rank, num_ranks), dtype=np.int32)
    count = np.zeros((experts_per_rank, num_ranks), dtype=np.int32)
    recv_count = np.zeros(experts_per_rank, dtype=np.int32)
    for l in range(experts_per_rank):
        off = 0
        for s, p in enumerate(pieces):
            sel = np.nonzero(p.local_expert == l)[0]
            n = sel.size
            if off + n > slots:
                raise DeepEPInvalid(f"local expert {l} of rank {rank} receives more than "
                                    f"num_ranks * num_max_dispatch_tokens_per_rank={slots} entries")
            begin[l, s] = off
            count[l, s] = n
            if n:
                recv_x[l, off:off + n] = p.x[sel]
                if recv_scales is not None:
                    recv_scales[l, off:off + n] = p.x_scales[sel]
                src_info[l, off:off + n] = p.src_idx[sel]
                src_k[l, off:off + n] = p.src_k[sel]
            off += n
        recv_count[l] = off
    return LowLatencyDispatchResult(
        recv_x=recv_x, recv_x_scales=recv_scales, recv_count=recv_count, recv_src_info=src_info,
        recv_src_k=src_k, layout_begin=begin, layout_count=count, rank=rank,
        num_ranks=num_ranks, num_experts=num_experts, num_max_dispatch_tokens_per_rank=m,
        hidden=hidden, use_fp8=bool(use_fp8), use_ue8m0=bool(use_ue8m0))


def low_latency_dispatch(xs, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                         use_fp8=True, round_scale=False, use_ue8m0=False
                         ) -> List[LowLatencyDispatchResult]:
    """Low-latency dispatch over ``R`` simulated ranks.

    Every valid ``(token, k)`` entry of source rank ``s`` is copied into the region of its
    expert on the owner rank (layout in :class:`LowLatencyDispatchResult`). With ``use_fp8`` each
    token is quantized once at the source (:func:`per_token_cast_to_fp8`) and the bytes copied.

    Arguments:
        xs: list over ranks of bf16 ``[T_s, H]``, ``T_s <= num_max_dispatch_tokens_per_rank``.
        topk_idx: list over ranks of int64 ``[T_s, K]``, -1 = no expert.
        num_max_dispatch_tokens_per_rank: ``M`` (>= 1).
        num_experts: ``E``, a multiple of ``R``.
        use_fp8: send FP8 data with scales (needs ``H % 128 == 0``).
        round_scale: power-of-two scales.
        use_ue8m0: packed UE8M0 scales (needs ``round_scale``).

    Returns:
        list over receiving ranks of :class:`LowLatencyDispatchResult`.

    Raises:
        DeepEPInvalid / DeepEPTypeError: bad argument, naming it; also when one source sends
        more than ``M`` entries to a single expert (only possible with duplicate expert ids).
    """
    xs, hidden, dtype = _check_x_list(xs, "xs")
    num_ranks = len(xs)
    if dtype != BF16:
        raise DeepEPTypeError(f"xs must be bfloat16 for low-latency dispatch, got dtype {dtype}")
    m = _as_int(num_max_dispatch_tokens_per_rank, "num_max_dispatch_tokens_per_rank", 1)
    num_experts = _check_num_experts(num_experts, num_ranks)
    topk_idx = _check_list(topk_idx, num_ranks, "topk_idx")
    use_fp8, round_scale, use_ue8m0 = bool(use_fp8), bool(round_scale), bool(use_ue8m0)
    if use_fp8 and hidden % FP8_BLOCK != 0:
        raise DeepEPInvalid(f"xs hidden size {hidden} must be a multiple of {FP8_BLOCK} for FP8")
    if use_fp8 and use_ue8m0 and not round_scale:
        raise DeepEPInvalid("use_ue8m0=True requires round_scale=True")
    idx = []
    for s in range(num_ranks):
        if xs[s].shape[0] > m:
            raise DeepEPInvalid(f"xs[{s}] has {xs[s].shape[0]} tokens, more than "
                                f"num_max_dispatch_tokens_per_rank={m}")
        a = _check_topk_idx(topk_idx[s], num_experts, f"topk_idx[{s}]", xs[s].shape[0])
        if idx and a.shape[1] != idx[0].shape[1]:
            raise DeepEPInvalid(f"topk_idx[{s}] has {a.shape[1]} columns, "
                                f"topk_idx[0] has {idx[0].shape[1]}")
        _check_ll_capacity(a, num_experts, m, f"topk_idx[{s}]")
        idx.append(a)
    sent = [low_latency_pack(xs[s], idx[s], num_experts, num_ranks, use_fp8, round_scale,
                             use_ue8m0) for s in range(num_ranks)]
    return [low_latency_unpack([sent[s][r] for s in range(num_ranks)], rank=r,
                               num_experts=num_experts, num_max_dispatch_tokens_per_rank=m,
                               hidden=hidden, use_fp8=use_fp8, use_ue8m0=use_ue8m0)
            for r in range(num_ranks)]


def low_latency_combine_pack(y, layout_begin, layout_count) -> List[np.ndarray]:
    """Owner side of a low-latency combine: return every source its entries' rows.

    Arguments:
        y: bf16 ``[L, R*M, H]`` expert outputs in the received layout.
        layout_begin, layout_count: int32 ``[L, R]`` of the dispatch.

    Returns:
        list over source ranks ``s`` of bf16 ``[n_s, H]``: for ``l`` ascending,
        ``y[l, begin[l, s] : begin[l, s] + count[l, s]]``, concatenated (this is the order in
        which :func:`low_latency_pack` sent the entries).
    """
    experts_per_rank, num_ranks = layout_begin.shape
    out = []
    for s in range(num_ranks):
        parts = [y[l, int(layout_begin[l, s]):int(layout_begin[l, s]) + int(layout_count[l, s])]
                 for l in range(experts_per_rank)]
        out.append(_concat(parts, (0, y.shape[2]), y.dtype))
    return out


def low_latency_combine_reduce(pieces: Sequence[np.ndarray], topk_idx, topk_weights,
                               num_experts: int, hidden: int) -> np.ndarray:
    """Source side of a low-latency combine: weighted sum over the top-k entries.

    Arguments:
        pieces: list over owner ranks ``r`` of ``[n_r, H]`` rows from
            :func:`low_latency_combine_pack` (entry order: local expert, token, k).
        topk_idx: int64 ``[T, K]`` of this rank (same as in the dispatch).
        topk_weights: float32 ``[T, K]``.
        num_experts: ``E``.
        hidden: ``H``.

    Returns:
        bf16 ``[T, H]``: ``acc = +0.0f``; for ``k`` ascending with ``topk_idx[t, k] >= 0``:
        ``acc = acc + float32(w[t, k]) * float32(y)`` (product rounded to float32 first);
        ``bf16(acc)`` (RNE).
    """
    num_ranks = len(pieces)
    num_tokens, num_topk = topk_idx.shape
    t, k, dest, local = _ll_entries(topk_idx, num_experts // num_ranks)
    gathered = np.zeros((t.size, hidden), dtype=np.float32)
    for r in range(num_ranks):
        order = _ll_dest_order(dest, local, r)
        if order.size:
            gathered[order] = pieces[r].astype(np.float32)
    acc = np.zeros((num_tokens, hidden), dtype=np.float32)
    w = np.asarray(topk_weights, dtype=np.float32)
    for kk in range(num_topk):
        sel = np.nonzero(k == kk)[0]
        if sel.size == 0:
            continue
        tt = t[sel]
        acc[tt] = acc[tt] + (w[tt, kk][:, None] * gathered[sel]).astype(np.float32)
    return acc.astype(BF16)


def low_latency_combine(ys, topk_idx, topk_weights, ll_results) -> List[np.ndarray]:
    """Low-latency combine over ``R`` simulated ranks.

    Arguments:
        ys: list over owner ranks of bf16 ``[L, R*M, H]`` (expert outputs in the layout of
            ``ll_results[r]``; unused slots ignored).
        topk_idx: list over source ranks of int64 ``[T_s, K]`` (as dispatched).
        topk_weights: list over source ranks of float32 ``[T_s, K]``.
        ll_results: list over ranks of :class:`LowLatencyDispatchResult`.

    Returns:
        list over source ranks of bf16 ``[T_s, H]``: ``out[t] = bf16(sum over k ascending with
        topk_idx[t, k] >= 0 of float32(w[t, k]) * float32(ys[owner][l][slot of (s, t, k)]))``,
        float32 accumulation as in :func:`low_latency_combine_reduce`.

    Raises:
        DeepEPInvalid / DeepEPTypeError: bad argument, naming it.
    """
    ll_results = _check_list(ll_results, None, "ll_results")
    num_ranks = len(ll_results)
    for r, res in enumerate(ll_results):
        if not isinstance(res, LowLatencyDispatchResult):
            raise DeepEPTypeError(f"ll_results[{r}] must be a LowLatencyDispatchResult, "
                                  f"got {type(res).__name__}")
    first = ll_results[0]
    num_experts = first.num_experts
    experts_per_rank = num_experts // num_ranks
    hidden = first.hidden
    shape = (experts_per_rank, num_ranks * first.num_max_dispatch_tokens_per_rank, hidden)
    ys = _check_list(ys, num_ranks, "ys")
    for r, y in enumerate(ys):
        if not isinstance(y, np.ndarray):
            raise DeepEPTypeError(f"ys[{r}] must be a numpy array, got {type(y).__name__}")
        if y.dtype != BF16:
            raise DeepEPTypeError(f"ys[{r}] must be bfloat16, got dtype {y.dtype}")
        if y.shape != shape:
            raise DeepEPInvalid(f"ys[{r}] must have shape {shape}, got {y.shape}")
    topk_idx = _check_list(topk_idx, num_ranks, "topk_idx")
    topk_weights = _check_list(topk_weights, num_ranks, "topk_weights")
    idx = [_check_topk_idx(topk_idx[s], num_experts, f"topk_idx[{s}]") for s in range(num_ranks)]
    w = [_check_weights(topk_weights[s], idx[s].shape, f"topk_weights[{s}]")
         for s in range(num_ranks)]
    sent = [low_latency_combine_pack(ys[r], ll_results[r].layout_begin, ll_results[r].layout_count)
            for r in range(num_ranks)]
    out = []
    for s in range(num_ranks):
        pieces = [sent[r][s] for r in range(num_ranks)]
        expected = int((idx[s] >= 0).sum())
        got = sum(p.shape[0] for p in pieces)
        if got != expected:
            raise DeepEPInvalid(f"topk_idx[{s}] has {expected} valid entries but the dispatch "
                                f"recorded {got} for rank {s}; pass the dispatched topk_idx")
        out.append(low_latency_combine_reduce(pieces, idx[s], w[s], num_experts, hidden))
    return out
