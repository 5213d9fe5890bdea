"""CPU "reference" backend: deepep_cupy's operations across real MPI ranks, on numpy arrays.

Each MPI process is one rank. The backend runs exactly the per-rank pieces of
:mod:`deepep_cupy.reference` (pack on the sender, unpack/reduce on the receiver) and moves the
pieces between the ranks (each rank sends every other rank only the rows meant for it), so its
results are bit-identical to the single-process reference model.

Arguments reach this class already validated by the ``Buffer`` front end. Every method is a
collective: all ranks must call the same methods in the same order.

The pieces travel as non-blocking point-to-point messages on a private duplicate of the
communicator, one tag per operation, polled against the same timeout as the GPU wait loops
(``settings.timeout_seconds``): a rank that died or never made the call makes every other rank
raise ``DeepEPTimeout`` naming it, instead of blocking in MPI forever (a blocking ``alltoall``
would). The tag per operation keeps a late rank's messages of a timed-out operation from being
taken for a later one's.

The first exchange of every operation carries the operation's name and its signature (hidden, dtype,
top-k, expert count, flags: what every rank must share), and every rank checks all of them before
unpacking anything: ranks that disagree all raise the same ``DeepEPInvalid`` naming the argument,
instead of a numpy error naming none, a silent dtype conversion or a wrong result. ``Buffer``
agrees on the same before the call (``agreement.py``), which also covers a rank whose own checks
fail; this is what remains with ``settings.check_agreement = False``, at no extra message.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import List, Optional, Sequence, Tuple

import numpy as np

from . import arrays, reference as ref
from .agreement import signature_verdict
from .backend import (Backend, CombineRequest, CombineResult, DispatchRequest, DispatchResult, LayoutRequest,
                      LayoutResult, LowLatencyCombineRequest, LowLatencyCombineResult, LowLatencyDispatchRequest,
                      LowLatencyDispatchResult)
from .config import settings
from .errors import DeepEPInvalid, DeepEPTimeout
from .event import EventOverlap
from .handles import DeepEPLowLatencyTuple
from .mpienv import poll_until, private_comm
from .validation import check_index_range

__all__ = ["ReferenceBackend", "ReferenceDispatchHandle", "ReferenceLowLatencyHandle"]


@dataclasses.dataclass(frozen=True, eq=False)
class ReferenceDispatchHandle:
    """Routing of one high-throughput dispatch, kept on every rank; drives cached dispatch and
    combine.

    Fields:
        is_token_in_rank: bool ``[T, R]`` of this rank's tokens (sender side).
        rank_prefix_matrix: int32 ``[R, R]``; ``[i][j]`` = tokens rank ``j`` receives from ranks
            ``0..i`` (identical on all ranks).
        recv_src_rank: int32 ``[N]`` source rank of each received row (-1 for padding).
        recv_src_idx: int32 ``[N]`` source token index of each received row (-1 for padding).
        num_tokens: ``T`` of this rank.
        num_recv_tokens: real received rows on this rank (``N`` may be larger when padded).
        num_worst_tokens: the padding of the original dispatch (0 = none); cached dispatches
            reuse it so rows stay aligned.
        num_experts: ``E``.
        hidden: ``H`` of the original dispatch.
        src_num_tokens: tuple of ``T_s`` of every rank.
    """

    is_token_in_rank: np.ndarray
    rank_prefix_matrix: np.ndarray
    recv_src_rank: np.ndarray
    recv_src_idx: np.ndarray
    num_tokens: int
    num_recv_tokens: int
    num_worst_tokens: int
    num_experts: int
    hidden: int
    src_num_tokens: Tuple[int, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class ReferenceLowLatencyHandle(DeepEPLowLatencyTuple):
    """Routing of one low-latency dispatch (receiver-side layout), used by the combine. Indexable
    like DeepEP's tuple (``handle[0]`` ``recv_src_info``, ``handle[1]`` ``layout_range``, then M,
    hidden, num_experts).

    Fields:
        recv_src_info: int32 ``[L, R*M]`` source token index of each slot (-1 unused).
        recv_src_k: int32 ``[L, R*M]`` top-k slot of each entry (-1 unused).
        layout_begin: int32 ``[L, R]`` first slot of source ``s``'s entries for expert ``l``.
        layout_count: int32 ``[L, R]`` number of those entries.
        num_max_dispatch_tokens_per_rank: ``M``.
        hidden: ``H``.
        num_experts: ``E``.
        num_tokens: ``T`` of this rank at dispatch.
        use_fp8, use_ue8m0: flags of the dispatch.
        num_topk: ``K`` of the dispatch.

    Property ``layout_range``: int64 ``[L, R]`` = ``(begin << 32) | count``.
    """

    recv_src_info: np.ndarray
    recv_src_k: np.ndarray
    layout_begin: np.ndarray
    layout_count: np.ndarray
    num_max_dispatch_tokens_per_rank: int
    hidden: int
    num_experts: int
    num_tokens: int
    use_fp8: bool
    use_ue8m0: bool
    num_topk: int

    @property
    def layout_range(self) -> np.ndarray:
        """int64 ``[L, R]``: ``(int64(layout_begin) << 32) | layout_count``."""
        return ref.pack_layout_range(self.layout_begin, self.layout_count)


def _detect_ranks_per_node(comm) -> int:
    """Ranks per node from ``MPI.COMM_TYPE_SHARED``; the world size when nodes are uneven."""
    from mpi4py import MPI

    size = comm.Get_size()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        local_size = local.Get_size()
    finally:
        local.Free()
    sizes = comm.allgather(local_size)
    if len(set(sizes)) == 1 and size % sizes[0] == 0:
        return sizes[0]
    return size


def _ranks(ranks: Sequence[int]) -> str:
    """``"rank 3"`` or ``"ranks 2, 3"``."""
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r) for r in ranks)


class ReferenceBackend(Backend):
    """Runs deepep_cupy's operations on the CPU across the ranks of an MPI communicator.

    Arguments:
        comm: an ``mpi4py`` communicator (any size, including 1); every process is one rank.
        ranks_per_node: ranks per node (node of rank ``r`` is ``r // ranks_per_node``); ``None``
            detects it with ``MPI.COMM_TYPE_SHARED`` (a collective call). It only affects
            ``num_tokens_per_rdma_rank``.
        timeout_seconds: how long one exchange waits for the other ranks before it raises
            ``DeepEPTimeout``; ``None`` reads ``settings.timeout_seconds`` at each call (as the
            GPU kernels do).

    The constructor is collective (it duplicates ``comm``); :meth:`destroy` is not. Every
    collective method raises ``DeepEPTimeout`` naming the phase and the ranks it waited for when
    they do not take part within :attr:`timeout`; the ranks are out of step after that.

    As a ``Backend``: numpy arrays in and out, every error raised by the call itself, events that
    are complete (``EventOverlap(None)``) and receive hooks that do nothing (the receive is done).
    """

    name = "reference"
    xp = np
    device = ("cpu", None)
    agrees_by_default = True       # free next to the exchanges themselves
    reports_errors_later = False
    uses_config = False
    needs_aligned_rows = False
    checks_own_memory = False
    dispatch_handle_kind = "ReferenceDispatchHandle"
    low_latency_handle_kind = "ReferenceLowLatencyHandle"

    def __init__(self, comm, ranks_per_node: Optional[int] = None,
                 timeout_seconds: Optional[float] = None):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.num_ranks = comm.Get_size()
        if ranks_per_node is None:
            ranks_per_node = _detect_ranks_per_node(comm)
        self.ranks_per_node = int(ranks_per_node)
        self.timeout_seconds = None if timeout_seconds is None else float(timeout_seconds)
        # our messages never meet the caller's, nor those left on a freed communicator
        self._comm, self._tag_ub, self._channel = private_comm(comm)
        self.dropped = 0   # messages received that were not this exchange's (see _exchange)
        self._op = 0                      # operations so far; identical on every rank in step
        self._stale_requests: list = []   # requests of timed-out exchanges, kept alive (and their buffers)
        # tags of recent timed-out exchanges: their late messages are received and dropped
        self._stale_tags: collections.deque = collections.deque(maxlen=64)
        self._combine_buffer = None   # get_next_low_latency_combine_buffer's array

    # ---------------------------------------------------------------- lifecycle

    @property
    def timeout(self) -> float:
        """Seconds an exchange waits for its peers (``timeout_seconds`` or the setting)."""
        return float(settings.timeout_seconds if self.timeout_seconds is None else self.timeout_seconds)

    def barrier(self, phase: str = "barrier") -> None:
        """Collective: return once every rank has called it; ``DeepEPTimeout`` naming the ranks
        that did not within :attr:`timeout` (``comm.Barrier()`` would wait forever for a dead one).
        """
        self._exchange_agreeing([None] * self.num_ranks, phase, [], phase)

    def destroy(self) -> None:
        """Free the private communicator. Local (no message): safe with a dead peer, after a
        timeout. Idempotent; the backend is unusable afterwards."""
        if getattr(self, "_comm", None) is None:
            return
        self._reap()
        comm, self._comm = self._comm, None
        # requests still pending (to a dead peer) refer to the communicator: leave it to them
        if not self._stale_requests:
            comm.Free()

    # ---------------------------------------------------------------- arrays and checks

    def take(self, x, name: str, align: int = 0):
        """``x`` as a numpy array over the same host memory (``arrays.to_numpy``). Its alignment is
        not checked: a host array's alignment says nothing about a device copy."""
        return arrays.to_numpy(x, name)

    def give(self, arr, like_framework, dtype: Optional[str] = None):
        """numpy stays numpy (no conversion, no cost); JAX and PyTorch CPU arrays through
        ``arrays.from_numpy``."""
        if arr is None:
            return arr
        if like_framework is arrays.Framework.NUMPY:
            return arr
        return arrays.from_numpy(arr, like_framework, dtype)

    def capturing(self) -> bool:
        """Never: the reference backend launches nothing."""
        return False

    def checks_values(self) -> bool:
        """Always (free on numpy)."""
        return True

    def combine_rows(self, handle: ReferenceDispatchHandle) -> int:
        """The padded count of the dispatch, else its received rows."""
        return handle.num_worst_tokens or handle.num_recv_tokens

    def check_ids(self, topk_idx, num_experts: int, blocking: bool) -> bool:
        """Always (numpy: reading the ids costs no wait)."""
        check_index_range(topk_idx, "topk_idx", -1, num_experts, np)
        return True

    def precheck_dispatch(self, x, x_scales, topk_idx, num_experts: int, handle) -> None:
        """Nothing: the reference backend has no staging to overflow."""

    def check_low_latency_capacity(self, topk_idx, num_experts: int, num_max_dispatch_tokens_per_rank: int) -> None:
        """Count the entries per expert (duplicate ids in a row could exceed ``M``)."""
        m = num_max_dispatch_tokens_per_rank
        per_expert = np.bincount(topk_idx[topk_idx >= 0].ravel(), minlength=num_experts)
        if per_expert.size and int(per_expert.max()) > m:
            raise DeepEPInvalid(f"topk_idx: expert {int(per_expert.argmax())} is chosen {int(per_expert.max())} "
                                f"times, more than num_max_dispatch_tokens_per_rank={m}")

    def expected_layout(self, topk_idx, num_experts: int, previous_event,
                        ids_checked: bool = False) -> LayoutResult:
        """``reference.get_dispatch_layout`` of ``topk_idx`` (any expert count)."""
        return self.get_dispatch_layout(LayoutRequest(topk_idx, num_experts, ids_checked=ids_checked))

    def raise_reported(self, what: str) -> None:
        """Nothing: the reference backend raises in the call itself."""

    def check(self, what: str) -> None:
        """Nothing to wait for: errors were raised by the calls themselves."""

    # ---------------------------------------------------------------- exchange

    def _exchange(self, pieces: Sequence, phase: str) -> List:
        """Send ``pieces[p]`` to every rank ``p`` and return what each rank sent here (indexed by
        source; this rank's own piece is passed through). Non-blocking messages, polled until
        :attr:`timeout`.

        Raises:
            DeepEPTimeout: some rank's piece did not arrive, or some rank did not take ours, in
                time (names the ranks and ``phase``); or MPI reported a failed peer.
            DeepEPInvalid: the backend was destroyed.
        """
        from mpi4py import MPI

        comm = self._comm
        if comm is None:
            raise DeepEPInvalid("self: this ReferenceBackend was destroyed")
        me, n = self.rank, self.num_ranks
        received = [None] * n
        received[me] = pieces[me]
        if n == 1:
            return received
        self._op += 1
        tag = self._op % self._tag_ub
        stamp = (self._channel, self._op)   # every message carries it; others are dropped
        self._reap()
        timeout = self.timeout
        current = me                # the peer being talked to, for an MPI error's message
        sends, recvs = {}, {}       # peer -> send of our piece / receive of its matched message
        unmatched = set()           # peers whose message has not even started to arrive

        def step() -> bool:
            nonlocal current
            busy = False
            for current in sorted(unmatched):
                msg = comm.improbe(source=current, tag=tag)
                if msg is not None:
                    recvs[current] = msg.irecv()
                    unmatched.discard(current)
                    busy = True
            for current, req in list(recvs.items()):
                try:
                    done, obj = req.test()
                except MPI.Exception:
                    raise
                except Exception:   # noqa: BLE001 - not a pickle at all: another channel's bytes
                    done, obj = True, None
                if done:
                    del recvs[current]
                    busy = True
                    if isinstance(obj, tuple) and len(obj) == 2 and obj[0] == stamp:
                        received[current] = obj[1]
                    else:   # left on a freed communicator whose context MPI reused: not ours
                        self.dropped += 1
                        unmatched.add(current)
            for current, req in list(sends.items()):
                if req.Test():
                    del sends[current]
                    busy = True
            if not (unmatched or recvs or sends):
                return True
            if not busy and (self._stale_tags or self._stale_requests):
                self._reap()   # a late peer may wait on us to take its old message
            return False

        try:
            for current in range(n):
                if current != me:
                    sends[current] = comm.isend((stamp, pieces[current]), dest=current, tag=tag)
            unmatched.update(sends)
            if poll_until(step, timeout):
                return received
        except MPI.Exception as e:
            raise DeepEPTimeout(f"rank {me}: {phase}: MPI failed talking to rank {current} (did it die?): "
                                f"{e}") from e
        # out of step now: keep what is in flight alive, drain what comes late for this tag
        self._stale_requests.extend(sends.values())
        self._stale_requests.extend(recvs.values())
        self._stale_tags.append(tag)
        late = [(sorted(unmatched), "sent nothing"), (sorted(recvs), "sent only part of its data"),
                (sorted(set(sends) - unmatched - set(recvs)), "did not take this rank's data")]
        what = ", ".join(f"{_ranks(r)} {w}" for r, w in late if r)
        raise DeepEPTimeout(f"rank {me}: {phase} timed out: {what} within {timeout:g} s "
                            f"(died, or did not make the same call?)")

    def _exchange_agreeing(self, pieces: Sequence, phase: str, signature: list, what: str) -> List:
        """``_exchange`` with the operation ``what`` and this rank's ``signature`` (``(argument,
        field, value)`` entries every rank must share) riding along with every piece. Every rank
        receives every other rank's, so all raise the same ``DeepEPInvalid`` naming the first
        differing argument (or the different calls) before anything is unpacked, instead of a
        numpy error or a silent conversion from mismatched pieces. The first exchange of every
        operation goes through here (``Buffer`` agrees before the call as well, unless
        ``settings.check_agreement`` is off; this costs nothing extra: the signature rides along)."""
        signature = [("self", "call", what)] + list(signature)
        received = self._exchange([(signature, p) for p in pieces], phase)
        self._check_signatures([r[0] for r in received], what)
        return [r[1] for r in received]

    @staticmethod
    def _check_signatures(signatures: Sequence, what: str) -> None:
        error = signature_verdict(signatures, what)
        if error is not None:
            raise error

    @staticmethod
    def _x_signature(x, x_scales=None) -> list:
        return [("x", "hidden", int(x.shape[-1])), ("x", "dtype", str(np.dtype(x.dtype))),
                ("x", "scales", None if x_scales is None else int(x_scales.shape[-1]))]

    def _reap(self) -> None:
        """Forget finished requests of timed-out exchanges and receive (and drop) the messages a
        late rank sent for them, so its sends complete and nothing piles up."""
        from mpi4py import MPI

        comm = self._comm
        if comm is None or not (self._stale_tags or self._stale_requests):
            return
        try:
            for tag in self._stale_tags:
                while True:
                    msg = comm.improbe(source=MPI.ANY_SOURCE, tag=tag)
                    if msg is None:
                        break
                    self._stale_requests.append(msg.irecv())
            self._stale_requests = [r for r in self._stale_requests if not r.Test()]
        except MPI.Exception:
            pass  # a failed peer's requests: nothing to recover, the next exchange reports it

    # ---------------------------------------------------------------- high throughput

    def get_dispatch_layout(self, request: LayoutRequest) -> LayoutResult:
        """Layout of this rank's tokens (local, no communication): ``reference.get_dispatch_layout``
        of ``request.topk_idx`` (int64 ``[T, K]``) for ``request.num_experts``; the stream options
        are ignored.

        Returns:
            ``num_tokens_per_rank`` int32 ``[R]``, ``num_tokens_per_rdma_rank`` int32
            ``[R/ranks_per_node]`` or None, ``num_tokens_per_expert`` int32 ``[E]``,
            ``is_token_in_rank`` bool ``[T, R]``, a complete event.
        """
        layout = ref.get_dispatch_layout(request.topk_idx, request.num_experts, self.num_ranks, self.ranks_per_node)
        return LayoutResult(*layout, EventOverlap(None))

    def dispatch(self, request: DispatchRequest) -> DispatchResult:
        """High-throughput dispatch (collective): cached with ``request.handle``; routed by
        ``topk_idx`` (the layout arrays are not read: the routing is derived from ``topk_idx``); or
        ``by_rank_mask``: as a dispatch of the one-column ``topk_idx`` that names expert ``r`` where
        ``is_token_in_rank[:, r]`` (one expert per rank), whose top-k outputs are dropped. The
        stream options and ``config`` are ignored; the event is complete."""
        r = request
        if r.by_rank_mask:
            # one expert per rank: expert r is "on" rank r exactly when the token goes to rank r
            synthetic = np.where(r.is_token_in_rank, np.arange(self.num_ranks, dtype=np.int64), -1)
            recv_x, recv_scales, _, _, _, handle = self._dispatch(
                r.x, r.x_scales, synthetic, None, self.num_ranks, 1, r.num_worst_tokens)
            return DispatchResult(recv_x, recv_scales, None, None, [], handle, EventOverlap(None))
        out = self._dispatch(r.x, r.x_scales, r.topk_idx, r.topk_weights, r.num_experts, r.expert_alignment,
                             r.num_worst_tokens, handle=r.handle)
        return DispatchResult(*out, EventOverlap(None))

    def _dispatch(self, x, x_scales, topk_idx, topk_weights, num_experts, expert_alignment=1,
                  num_worst_tokens=0, handle: Optional[ReferenceDispatchHandle] = None):
        """High-throughput dispatch (collective), on arrays.

        Arguments:
            x: ``[T, H]`` (bf16, float32, float8_e4m3fn, ...).
            x_scales: ``[T, S]`` scales for FP8 ``x``, or ``None``.
            topk_idx: int64 ``[T, K]``, ignored with ``handle``.
            topk_weights: float32 ``[T, K]`` or ``None``, ignored with ``handle``.
            num_experts: ``E``.
            expert_alignment: alignment of the per-expert counts.
            num_worst_tokens: 0, or the padded row count. With ``handle`` the handle's value is
                used.
            handle: a :class:`ReferenceDispatchHandle` for a cached dispatch (same routing, only
                ``x``/``x_scales`` travel).

        Returns:
            ``(recv_x [N, H], recv_x_scales [N, S] or None, recv_topk_idx int64 [N, K] or None,
            recv_topk_weights float32 [N, K] or None, num_recv_tokens_per_expert_list (list of
            L ints; [] when num_worst_tokens > 0; None when cached), handle)``.

        Raises:
            DeepEPInvalid: some rank would receive more than ``num_worst_tokens`` tokens (raised
            on every rank, before any data moves).
        """
        num_ranks = self.num_ranks
        if handle is not None:
            pieces = ref.dispatch_pack(x, x_scales, None, None, handle.is_token_in_rank)
            received = self._exchange_agreeing(pieces, "cached dispatch exchange", self._x_signature(x, x_scales),
                                               "cached dispatch")
            res = ref.dispatch_unpack(
                received, rank=self.rank, num_experts=handle.num_experts,
                rank_prefix_matrix=handle.rank_prefix_matrix,
                src_num_tokens=handle.src_num_tokens, x_template=x[:0],
                scales_template=None if x_scales is None else x_scales[:0],
                num_topk=0, with_topk=False, with_weights=False,
                num_worst_tokens=handle.num_worst_tokens)
            return res.recv_x, res.recv_x_scales, None, None, None, handle

        topk_idx = np.asarray(topk_idx).astype(np.int64, copy=False)
        is_token_in_rank = ref.token_in_rank(topk_idx, num_experts, num_ranks)
        counts = is_token_in_rank.sum(axis=0, dtype=np.int64)
        signature = self._x_signature(x, x_scales) + [
            ("num_experts", "num_experts", int(num_experts)), ("topk_idx", "top-k", int(topk_idx.shape[1])),
            ("topk_weights", "topk_weights", None if topk_weights is None else "an array"),
            ("num_worst_tokens", "num_worst_tokens", int(num_worst_tokens))]
        gathered = self._exchange_agreeing([(int(x.shape[0]), counts)] * num_ranks, "dispatch count exchange",
                                           signature, "dispatch")
        src_num_tokens = tuple(g[0] for g in gathered)
        prefix = ref.rank_prefix_matrix_from_counts(np.stack([g[1] for g in gathered]))
        if num_worst_tokens > 0:
            totals = prefix[-1]
            too_many = np.nonzero(totals > num_worst_tokens)[0]
            if too_many.size:
                r = int(too_many[0])
                raise DeepEPInvalid(f"num_worst_tokens={num_worst_tokens} is too small: rank {r} "
                                    f"receives {int(totals[r])} tokens")
        pieces = ref.dispatch_pack(x, x_scales, topk_idx, topk_weights, is_token_in_rank)
        received = self._exchange(pieces, "dispatch exchange")
        res = ref.dispatch_unpack(
            received, rank=self.rank, num_experts=num_experts, rank_prefix_matrix=prefix,
            src_num_tokens=src_num_tokens, x_template=x[:0],
            scales_template=None if x_scales is None else x_scales[:0],
            num_topk=topk_idx.shape[1], with_topk=True, with_weights=topk_weights is not None,
            expert_alignment=expert_alignment, num_worst_tokens=num_worst_tokens)
        new_handle = ReferenceDispatchHandle(
            is_token_in_rank=is_token_in_rank, rank_prefix_matrix=res.rank_prefix_matrix,
            recv_src_rank=res.recv_src_rank, recv_src_idx=res.recv_src_idx,
            num_tokens=int(x.shape[0]), num_recv_tokens=res.num_recv_tokens,
            num_worst_tokens=int(num_worst_tokens), num_experts=int(num_experts),
            hidden=int(x.shape[1]), src_num_tokens=src_num_tokens)
        return (res.recv_x, res.recv_x_scales, res.recv_topk_idx, res.recv_topk_weights,
                res.num_recv_tokens_per_expert_list, new_handle)

    def combine(self, request: CombineRequest) -> CombineResult:
        """High-throughput combine (collective): ``_combine`` of the request's arrays (the bias pair
        as it is); the stream options and ``config`` are ignored, the event is complete."""
        combined, combined_w = self._combine(request.x, request.handle, request.topk_weights, request.bias)
        return CombineResult(combined, combined_w, EventOverlap(None))

    def _combine(self, x, handle: ReferenceDispatchHandle, topk_weights=None, bias=None):
        """High-throughput combine (collective): sum every token's copies back at its source.

        Arguments:
            x: ``[N, H]`` rows aligned with the dispatch output (padding rows ignored).
            handle: the :class:`ReferenceDispatchHandle` of the dispatch.
            topk_weights: float32 ``[N, K]`` or ``None``.
            bias: ``None``, a ``[T, H]`` array, or a pair ``(b0, b1)`` (either may be ``None``); added once.

        Returns:
            ``(combined_x [T, H] dtype of x, combined_topk_weights float32 [T, K] or None)``.
        """
        pieces = ref.combine_pack(x, topk_weights, handle.rank_prefix_matrix, self.rank)
        signature = self._x_signature(x) + [
            ("topk_weights", "top-k", None if topk_weights is None else int(topk_weights.shape[1]))]
        received = self._exchange_agreeing(pieces, "combine exchange", signature, "combine")
        token_indices = [np.nonzero(handle.is_token_in_rank[:, r])[0]
                         for r in range(self.num_ranks)]
        return ref.combine_reduce(
            token_indices, received, num_tokens=handle.num_tokens, hidden=x.shape[1],
            out_dtype=x.dtype, num_topk=0 if topk_weights is None else topk_weights.shape[1],
            with_weights=topk_weights is not None, bias=bias)

    # ---------------------------------------------------------------- low latency

    def low_latency_dispatch(self, request: LowLatencyDispatchRequest) -> LowLatencyDispatchResult:
        """Low-latency dispatch (collective): ``_low_latency_dispatch`` of the request. The receive
        is complete at once: the event is complete, ``recv_stats`` already counts it, and the hook
        (with ``return_recv_hook``) does nothing."""
        r = request
        recv_x, recv_scales, recv_count, handle = self._low_latency_dispatch(
            r.x, r.topk_idx, r.num_max_dispatch_tokens_per_rank, r.num_experts, r.use_fp8, r.round_scale,
            r.use_ue8m0)
        if r.recv_stats is not None:   # the caller's array (a numpy view of it), in place
            r.recv_stats += recv_count
        hook = (lambda: None) if r.return_recv_hook else None   # the outputs are complete already
        return LowLatencyDispatchResult(recv_x, recv_scales, recv_count, handle, EventOverlap(None), hook)

    def _low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                              use_fp8=True, round_scale=False, use_ue8m0=False):
        """Low-latency dispatch (collective), on arrays.

        Arguments:
            x: bf16 ``[T, H]``, ``T <= num_max_dispatch_tokens_per_rank``.
            topk_idx: int64 ``[T, K]``.
            num_max_dispatch_tokens_per_rank: ``M``.
            num_experts: ``E``.
            use_fp8, round_scale, use_ue8m0: as :func:`deepep_cupy.reference.low_latency_dispatch`.

        Returns:
            ``(recv_x, recv_x_scales, recv_count int32 [L], handle)``; ``recv_x`` is bf16
            ``[L, R*M, H]``, or with ``use_fp8`` float8_e4m3fn, its scales float32 ``[L, R*M, H/128]``
            or packed int32 ``[L, R*M, ceil(H/512)]`` (None without ``use_fp8``).
        """
        topk_idx = np.asarray(topk_idx).astype(np.int64, copy=False)
        pieces = ref.low_latency_pack(x, topk_idx, num_experts, self.num_ranks, use_fp8,
                                      round_scale, use_ue8m0)
        signature = self._x_signature(x) + [
            ("num_max_dispatch_tokens_per_rank", "num_max_dispatch_tokens_per_rank",
             int(num_max_dispatch_tokens_per_rank)),
            ("num_experts", "num_experts", int(num_experts)), ("use_fp8", "use_fp8", bool(use_fp8)),
            ("round_scale", "round_scale", bool(round_scale) if use_fp8 else None),
            ("use_ue8m0", "use_ue8m0", bool(use_ue8m0) if use_fp8 else None)]
        received = self._exchange_agreeing(pieces, "low-latency dispatch exchange", signature,
                                           "low_latency_dispatch")
        res = ref.low_latency_unpack(
            received, rank=self.rank, num_experts=num_experts,
            num_max_dispatch_tokens_per_rank=num_max_dispatch_tokens_per_rank,
            hidden=x.shape[1], use_fp8=use_fp8, use_ue8m0=use_ue8m0)
        handle = ReferenceLowLatencyHandle(
            recv_src_info=res.recv_src_info, recv_src_k=res.recv_src_k,
            layout_begin=res.layout_begin, layout_count=res.layout_count,
            num_max_dispatch_tokens_per_rank=int(num_max_dispatch_tokens_per_rank),
            hidden=int(x.shape[1]), num_experts=int(num_experts), num_tokens=int(x.shape[0]),
            use_fp8=bool(use_fp8), use_ue8m0=bool(use_ue8m0), num_topk=int(topk_idx.shape[1]))
        return res.recv_x, res.recv_x_scales, res.recv_count, handle

    def low_latency_combine(self, request: LowLatencyCombineRequest) -> LowLatencyCombineResult:
        """Low-latency combine (collective): ``_low_latency_combine`` of the request (``out``, when
        given, written in place and returned); a complete event, and a hook that does nothing with
        ``return_recv_hook``."""
        r = request
        combined = self._low_latency_combine(r.x, r.topk_idx, r.topk_weights, r.handle, out=r.out)
        hook = (lambda: None) if r.return_recv_hook else None
        return LowLatencyCombineResult(combined, EventOverlap(None), hook)

    def _low_latency_combine(self, x, topk_idx, topk_weights, handle: ReferenceLowLatencyHandle,
                             out=None):
        """Low-latency combine (collective), on arrays: weighted sum over the top-k experts.

        Arguments:
            x: bf16 ``[L, R*M, H]`` expert outputs in the received layout.
            topk_idx: int64 ``[T, K]`` as dispatched.
            topk_weights: float32 ``[T, K]``.
            handle: the :class:`ReferenceLowLatencyHandle` of the dispatch.
            out: optional bf16 ``[T, H]`` array written in place and returned.

        Returns:
            bf16 ``[T, H]``.
        """
        topk_idx = np.asarray(topk_idx).astype(np.int64, copy=False)
        pieces = ref.low_latency_combine_pack(x, handle.layout_begin, handle.layout_count)
        signature = self._x_signature(x) + [
            ("handle", "num_max_dispatch_tokens_per_rank", int(handle.num_max_dispatch_tokens_per_rank)),
            ("handle", "num_experts", int(handle.num_experts))]
        received = self._exchange_agreeing(pieces, "low-latency combine exchange", signature,
                                           "low_latency_combine")
        combined = ref.low_latency_combine_reduce(received, topk_idx,
                                                  np.asarray(topk_weights, dtype=np.float32),
                                                  handle.num_experts, handle.hidden)
        if out is not None:
            out[...] = combined
            return out
        return combined

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Collective: nothing to reset (no state between calls), but every rank must arrive; gives
        up on a dead rank (``DeepEPTimeout``)."""
        self.barrier("clean_low_latency_buffer barrier")

    def get_next_low_latency_combine_buffer(self, handle: ReferenceLowLatencyHandle):
        """A zeroed bf16 numpy ``[L, R*M, H]`` array, owned and reused like the GPU's (one per shape),
        so that a ``zero_copy`` combine can check that ``x`` is this array."""
        import ml_dtypes
        shape = (handle.num_experts // self.num_ranks, self.num_ranks * handle.num_max_dispatch_tokens_per_rank,
                 handle.hidden)
        if self._combine_buffer is None or self._combine_buffer.shape != shape:
            self._combine_buffer = np.zeros(shape, dtype=ml_dtypes.bfloat16)
        return self._combine_buffer

    def is_low_latency_combine_buffer(self, x) -> bool:
        """The same shape and data pointer as the array ``get_next_low_latency_combine_buffer``
        handed out."""
        own = self._combine_buffer
        return (own is not None and x.shape == own.shape
                and arrays.data_pointer(x, "x") == arrays.data_pointer(own, "x"))
