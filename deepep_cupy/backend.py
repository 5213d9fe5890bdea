"""The interface between ``Buffer`` and a backend: one set of operations, one set of policy queries.

``Buffer`` (``buffer.py``) checks every argument, takes the inputs as the backend's arrays, agrees
across the ranks and then calls the backend once per operation with a request dataclass; the
backend answers with a result dataclass of its own arrays, which ``Buffer`` gives back in the
caller's framework. Both backends, ``GpuBackend`` (``gpu_backend.py``: CuPy arrays, CUDA kernels)
and ``ReferenceBackend`` (``reference_backend.py``: numpy arrays across the MPI ranks), implement
``Backend`` with the same signatures and the same result types, so ``Buffer`` never asks which
backend it holds: what differs between them (the array module, whether values are read before a
launch, whether the ranks agree by default, the handle types, ...) is a query of the backend.

The requests carry arrays already validated and taken by the front end (``Backend.take``); the
backends check nothing of the caller's arguments again, and the request classes reject nothing.
A field a backend does not need (the layout arrays of a dispatch on the reference backend, which
computes the routing from ``topk_idx``; the stream options there) is simply ignored by it.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, List, Optional, Tuple

from .event import EventOverlap

__all__ = ["Backend", "LayoutRequest", "LayoutResult", "DispatchRequest", "DispatchResult",
           "CombineRequest", "CombineResult", "LowLatencyDispatchRequest", "LowLatencyDispatchResult",
           "LowLatencyCombineRequest", "LowLatencyCombineResult"]


# ------------------------------------------------------------------------------ requests, results
@dataclasses.dataclass(slots=True)
class LayoutRequest:
    """``get_dispatch_layout`` of ``topk_idx`` (the backend's int64 ``[T, K]``) for ``num_experts``.
    The stream options (``previous_event``, ``async_finish``, ``allocate_on_comm_stream``) are
    DeepEP's; the reference backend has no stream and ignores them. ``ids_checked``: the caller
    already ran the backend's ``check_ids`` on ``topk_idx`` (the backend does not check them again)."""

    topk_idx: Any
    num_experts: int
    previous_event: Any = None
    async_finish: bool = False
    allocate_on_comm_stream: bool = False
    ids_checked: bool = False


@dataclasses.dataclass(slots=True)
class LayoutResult:
    """What ``get_dispatch_layout`` counted, as the backend's arrays: int32 ``[R]`` tokens per rank,
    int32 ``[num_nodes]`` per node (None on one node), int32 ``[E]`` entries per expert, bool
    ``[T, R]`` token-in-rank, and the ``EventOverlap`` of the work (``EventOverlap(None)`` when it
    is complete already)."""

    num_tokens_per_rank: Any
    num_tokens_per_rdma_rank: Any
    num_tokens_per_expert: Any
    is_token_in_rank: Any
    event: Any


@dataclasses.dataclass(slots=True)
class DispatchRequest:
    """One high-throughput dispatch, in one of three modes:

    * cached (``handle`` given): the routing of that earlier dispatch; only ``x``/``x_scales``
      travel. ``num_experts`` and ``num_worst_tokens`` are the handle's.
    * routed by ``topk_idx`` (int64 ``[T, K]``, with optional float32 ``topk_weights``); the layout
      arrays are those ``get_dispatch_layout`` returned, or None (the GPU then computes them; the
      reference backend always derives the routing from ``topk_idx``).
    * ``by_rank_mask``: routed by ``is_token_in_rank`` alone (with ``num_tokens_per_rank``), no
      ``topk_idx``: one expert per rank (``num_experts`` is the rank count), rank ``r`` receives the
      tokens of column ``r``. Each backend builds what its kernels need for that (the GPU empty
      per-expert counts, the reference backend a one-column ``topk_idx``); the result then has no
      top-k arrays and an empty per-expert list.

    ``x`` is the backend's ``[T, H]`` array (FP8 as the e4m3 data, with float32 ``x_scales``
    ``[T, H/128]``; else ``x_scales`` None). ``config`` is the GPU's (its ``num_sms``; None where the
    backend takes none, see ``Backend.uses_config``). The stream options are DeepEP's.
    ``ids_checked``: as for ``LayoutRequest``."""

    x: Any
    x_scales: Any
    num_experts: int
    topk_idx: Any = None
    topk_weights: Any = None
    num_tokens_per_rank: Any = None
    is_token_in_rank: Any = None
    num_tokens_per_expert: Any = None
    expert_alignment: int = 1
    num_worst_tokens: int = 0
    handle: Any = None
    by_rank_mask: bool = False
    config: Any = None
    previous_event: Any = None
    async_finish: bool = False
    allocate_on_comm_stream: bool = False
    ids_checked: bool = False


@dataclasses.dataclass(slots=True)
class DispatchResult:
    """What a dispatch received, as the backend's arrays: ``recv_x`` ``[N, H]`` (FP8 data as the
    backend stores it), ``recv_x_scales`` (FP8 only, else None), int64 ``recv_topk_idx`` and
    float32 ``recv_topk_weights`` (None in cached and ``by_rank_mask`` mode; the weights also
    without input weights), ``num_recv_tokens_per_expert_list`` (a list of ints; ``[]`` when padded
    or by rank mask; None when cached), the ``handle`` and the ``EventOverlap``."""

    recv_x: Any
    recv_x_scales: Any
    recv_topk_idx: Any
    recv_topk_weights: Any
    num_recv_tokens_per_expert_list: Optional[List[int]]
    handle: Any
    event: Any


@dataclasses.dataclass(slots=True)
class CombineRequest:
    """One high-throughput combine: ``x`` ``[N, H]`` rows as the dispatch with ``handle`` returned
    them, optional float32 ``topk_weights`` ``[N, K]``, ``bias`` a pair of ``[T, H]`` arrays, either
    None (added once, first ``bias[0]`` then ``bias[1]``). ``config`` and the stream options as in
    ``DispatchRequest``."""

    x: Any
    handle: Any
    topk_weights: Any = None
    bias: Tuple[Any, Any] = (None, None)
    config: Any = None
    previous_event: Any = None
    async_finish: bool = False
    allocate_on_comm_stream: bool = False


@dataclasses.dataclass(slots=True)
class CombineResult:
    """The combined ``[T, H]`` (dtype of the combine's ``x``), the combined float32 ``[T, K]``
    weights (None without weights) and the ``EventOverlap``."""

    combined_x: Any
    combined_topk_weights: Any
    event: Any


@dataclasses.dataclass(slots=True)
class LowLatencyDispatchRequest:
    """One low-latency dispatch of bf16 ``x`` ``[T, H]`` to the experts of int64 ``topk_idx``
    ``[T, K]``, in a buffer laid out for ``num_max_dispatch_tokens_per_rank`` tokens per rank and
    ``num_experts`` experts. The flags are ``Buffer.low_latency_dispatch``'s; ``ids_checked`` as
    for ``LayoutRequest``; ``recv_stats``: None, or the backend's view of the caller's int32 ``[L]``
    array that the receive adds ``recv_count`` into (``cumulative_local_expert_recv_stats``)."""

    x: Any
    topk_idx: Any
    num_max_dispatch_tokens_per_rank: int
    num_experts: int
    use_fp8: bool = True
    round_scale: bool = False
    use_ue8m0: bool = False
    async_finish: bool = False
    return_recv_hook: bool = False
    ids_checked: bool = False
    recv_stats: Any = None


@dataclasses.dataclass(slots=True)
class LowLatencyDispatchResult:
    """What a low-latency dispatch received, as the backend's arrays: ``recv_x`` ``[L, R*M, H]``
    (bf16, or the FP8 data as the backend stores it), ``recv_x_scales`` (FP8 only, else None),
    int32 ``recv_count`` ``[L]``, the ``handle``, the ``EventOverlap`` and the receive ``hook``
    (None without ``return_recv_hook``; a no-op where the receive is complete at once)."""

    recv_x: Any
    recv_x_scales: Any
    recv_count: Any
    handle: Any
    event: Any
    hook: Optional[Callable[[], None]]


@dataclasses.dataclass(slots=True)
class LowLatencyCombineRequest:
    """One low-latency combine of bf16 expert outputs ``x`` ``[L, R*M, H]`` back to the tokens of
    int64 ``topk_idx`` ``[T, K]`` with float32 ``topk_weights``, by the dispatch's ``handle``;
    ``out`` an optional bf16 ``[T, H]`` array (the backend's view of the caller's) to write into."""

    x: Any
    topk_idx: Any
    topk_weights: Any
    handle: Any
    out: Any = None
    async_finish: bool = False
    return_recv_hook: bool = False


@dataclasses.dataclass(slots=True)
class LowLatencyCombineResult:
    """The combined bf16 ``[T, H]`` (``out`` itself when given; valid after the hook), the
    ``EventOverlap`` and the receive ``hook`` (as in ``LowLatencyDispatchResult``)."""

    combined_x: Any
    event: Any
    hook: Optional[Callable[[], None]]


# ------------------------------------------------------------------------------------ interface
class Backend(abc.ABC):
    """What ``Buffer`` needs of a backend. Every operation that communicates is collective (all
    ranks call it in the same order); ``Buffer`` validates and agrees before it calls one.

    Policy queries that are plain values (``name``, ``agrees_by_default``, ...) are declared here as
    abstract properties; a backend may define them as class attributes."""

    # ------------------------------------------------------------------ identity and arrays
    @property
    @abc.abstractmethod
    def name(self) -> str:
        """The backend's name as ``Buffer(backend=...)`` spells it (``"gpu"``, ``"reference"``)."""

    @property
    @abc.abstractmethod
    def xp(self):
        """The array module of the backend's arrays (``cupy`` or ``numpy``)."""

    @property
    @abc.abstractmethod
    def device(self) -> tuple:
        """Where inputs must live, as ``arrays.ArrayDesc`` names a device: ``("cuda", id)`` or
        ``("cpu", None)``."""

    device_id: Optional[int] = None
    """The CUDA device the kernels run on (a backend on the GPU sets it), or None (a host backend)."""

    @abc.abstractmethod
    def take(self, x, name: str, align: int = 0):
        """A validated input ``x`` (any framework) as the backend's array, zero-copy. ``align``:
        bytes the data pointer must be a multiple of, where the backend's kernels access it in
        vectors (``validation.VECTOR_ALIGNMENT``); a backend that checks it raises
        ``DeepEPInvalid`` naming ``name``."""

    @abc.abstractmethod
    def give(self, arr, like_framework, dtype: Optional[str] = None):
        """The backend array ``arr`` (or None) as an array of ``like_framework`` (the framework of
        the call's primary input), presented as ``dtype`` when given (FP8 stored as bytes)."""

    # ------------------------------------------------------------------------------- policy
    @property
    @abc.abstractmethod
    def agrees_by_default(self) -> bool:
        """Whether ``settings.check_agreement = "auto"`` agrees across the ranks before each call."""

    @property
    @abc.abstractmethod
    def reports_errors_later(self) -> bool:
        """Whether the backend's work reports errors (timeouts, bad expert ids) at a later call
        rather than raising them in the call itself; ``check`` then waits and raises them
        (``settings.check_each_call`` runs it after every call)."""

    @property
    @abc.abstractmethod
    def uses_config(self) -> bool:
        """Whether the high-throughput kernels run with a ``Config``: ``Buffer`` then fills in the
        default one (``get_dispatch_config``/``get_combine_config``) and the ranks agree on its
        ``num_sms``."""

    @property
    @abc.abstractmethod
    def needs_aligned_rows(self) -> bool:
        """Whether the kernels move rows with 16-byte accesses, so every row of a dispatch or combine
        ``x`` must be a multiple of 16 bytes."""

    @property
    @abc.abstractmethod
    def checks_own_memory(self) -> bool:
        """Whether the backend checks its symmetric memory itself (it lays out its kernels in it).
        Otherwise ``Buffer`` holds a buffer given ``num_nvl_bytes``/``num_rdma_bytes`` to the GPU's
        memory rules, so that code that passes there has the memory it needs on the GPU."""

    @property
    @abc.abstractmethod
    def dispatch_handle_kind(self) -> str:
        """The class name of the handles this backend's high-throughput dispatch returns."""

    @property
    @abc.abstractmethod
    def low_latency_handle_kind(self) -> str:
        """The class name of the handles this backend's low-latency dispatch returns."""

    @abc.abstractmethod
    def capturing(self) -> bool:
        """Whether the current stream captures a CUDA graph (always False on a host backend)."""

    def current_stream_event(self) -> EventOverlap:
        """An ``EventOverlap`` of the work queued so far on the caller's current stream
        (``Buffer.capture``). A host backend has queued nothing: an event with nothing to wait for."""
        return EventOverlap(None)

    @abc.abstractmethod
    def checks_values(self) -> bool:
        """Whether values inside arrays (NaN weights, layout outputs against ``topk_idx``) are read
        before a launch: free on the host; on the GPU a reduction and a host wait."""

    @abc.abstractmethod
    def combine_rows(self, handle) -> int:
        """The rows of a combine's ``x`` for the dispatch ``handle``: its received rows, or its
        padded count."""

    # ------------------------------------------------------------------- pre-launch checks
    @abc.abstractmethod
    def check_ids(self, topk_idx, num_experts: int, blocking: bool) -> bool:
        """Raise ``DeepEPInvalid`` if an expert id of ``topk_idx`` lies outside [-1, num_experts),
        among a call's own checks. Where that means waiting for the device it is done only when
        ``blocking`` (the caller may wait: every ``Buffer`` call but the low-latency combine) and
        ``settings.check_values`` asks for it; otherwise the backend's kernels check the ids.
        Returns whether it checked them (the caller then sets the request's ``ids_checked``, so one
        call checks its ids once)."""

    @abc.abstractmethod
    def precheck_dispatch(self, x, x_scales, topk_idx, num_experts: int, handle) -> None:
        """The backend's own pre-launch checks of a dispatch that depend on this rank's token count
        (staging capacity), run among the call's checks while it agrees, so that a rank that fails
        them tells its peers. A no-op where there is no such limit."""

    @abc.abstractmethod
    def check_low_latency_capacity(self, topk_idx, num_experts: int, num_max_dispatch_tokens_per_rank: int) -> None:
        """Raise ``DeepEPInvalid`` if one source would fill more than
        ``num_max_dispatch_tokens_per_rank`` slots of an expert's region (only duplicate ids can),
        where the backend checks that before the call."""

    @abc.abstractmethod
    def expected_layout(self, topk_idx, num_experts: int, previous_event,
                        ids_checked: bool = False) -> Optional[LayoutResult]:
        """The layout of ``topk_idx`` (as ``get_dispatch_layout`` computes it, synchronously), to
        compare with the layout a dispatch was given; None where the backend cannot compute it.
        ``ids_checked`` as for ``LayoutRequest``."""

    @abc.abstractmethod
    def raise_reported(self, what: str) -> None:
        """Raise (and clear) what earlier work reported: bad expert ids, timeouts, overflow. No
        wait; a no-op where errors are raised by the call itself."""

    @abc.abstractmethod
    def check(self, what: str) -> None:
        """Wait for the backend's queued work, then raise what it reported (``Buffer.check``)."""

    # ---------------------------------------------------------------------------- operations
    @abc.abstractmethod
    def get_dispatch_layout(self, request: LayoutRequest) -> LayoutResult:
        """Count what a dispatch of ``request.topk_idx`` will send (local, no communication)."""

    @abc.abstractmethod
    def dispatch(self, request: DispatchRequest) -> DispatchResult:
        """High-throughput dispatch (collective)."""

    @abc.abstractmethod
    def combine(self, request: CombineRequest) -> CombineResult:
        """High-throughput combine (collective)."""

    @abc.abstractmethod
    def low_latency_dispatch(self, request: LowLatencyDispatchRequest) -> LowLatencyDispatchResult:
        """Low-latency dispatch (collective)."""

    @abc.abstractmethod
    def low_latency_combine(self, request: LowLatencyCombineRequest) -> LowLatencyCombineResult:
        """Low-latency combine (collective)."""

    @abc.abstractmethod
    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Collective: reset the low-latency state for these shapes (after a failed call)."""

    @abc.abstractmethod
    def get_next_low_latency_combine_buffer(self, handle):
        """The bf16 ``[L, R*M, H]`` backend array, owned by the backend and reused for the same
        shapes, into which a ``zero_copy`` low-latency combine's input is written."""

    @abc.abstractmethod
    def is_low_latency_combine_buffer(self, x) -> bool:
        """Whether the backend array ``x`` is the one ``get_next_low_latency_combine_buffer`` handed
        out (the same memory): the ``zero_copy`` check."""

    @abc.abstractmethod
    def destroy(self) -> None:
        """Free what the backend holds (collective on the GPU, bounded by the timeout). Idempotent."""
