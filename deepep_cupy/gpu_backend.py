"""The GPU backend of ``Buffer``: NVSHMEM runtime, symmetric memory, communication stream, kernels.

Arrays reaching this module are CuPy views (see ``arrays.to_cupy``), already validated by the
front end (``buffer.py``); results go back as CuPy arrays and the front end hands them out in the
caller's framework.
"""

from __future__ import annotations

import logging
from typing import Optional

from . import arrays, jit
from .backend import (Backend, CombineRequest, CombineResult, DispatchRequest, DispatchResult, LayoutRequest,
                      LayoutResult, LowLatencyCombineRequest, LowLatencyCombineResult, LowLatencyDispatchRequest,
                      LowLatencyDispatchResult)
from .config import settings
from .dispatch_args import DispatchPayload, DispatchRouting
from .layout import MAX_LAYOUT_EXPERTS, LayoutKernel
from .runtime import nvshmem as nvshmem_runtime
from .streams import CommStreamScope
from .checks import DeviceInputErrors, IndexRangeChecker
from .errors import DeepEPInvalid
from .event import EventOverlap
from .internode import InternodeHandle, InternodeKernels
from .intranode import IntranodeKernels
from .low_latency import LowLatencyHandle, LowLatencyKernels
from .validation import expect_aligned

__all__ = ["GpuBackend"]

log = logging.getLogger(__name__)


def _add_recv_stats(stats, recv_count, stream) -> None:
    """``stats += recv_count`` (int32 ``[L]``) on ``stream``, right after the receive that wrote
    ``recv_count``: no host wait, and captured with it in a CUDA graph. Nothing for ``stats=None``."""
    if stats is not None:
        import cupy
        with stream:
            cupy.add(stats, recv_count, out=stats)


class GpuBackend(Backend):
    """Owns this rank's share of the buffer on its GPU.

    Arguments:
        comm: mpi4py communicator. num_nvl_bytes, num_rdma_bytes: symmetric memory to allocate
        (one NVSHMEM allocation of their sum). ranks_per_node: NVLink domain size.
        jit_options: how kernels are compiled. allow_nvlink_for_low_latency_mode: False makes the
        low-latency kernels reach every peer through NVSHMEM puts (the RDMA path, testable on one node).
    """

    name = "gpu"
    agrees_by_default = False      # each agreement is a host round trip: see Buffer._agreeing
    reports_errors_later = True    # the kernels record errors; the next call (or check) raises them
    uses_config = True
    needs_aligned_rows = True
    checks_own_memory = True
    low_latency_handle_kind = "LowLatencyHandle"

    def __init__(self, comm, num_nvl_bytes: int, num_rdma_bytes: int, ranks_per_node: int,
                 jit_options: Optional[jit.JitOptions] = None, allow_nvlink_for_low_latency_mode: bool = True):
        import cupy

        self.comm = comm
        self.num_ranks = comm.Get_size()
        self.rank = comm.Get_rank()
        self.ranks_per_node = ranks_per_node
        self.jit_options = jit_options or jit.JitOptions(route=settings.jit_route)
        self.runtime = nvshmem_runtime.acquire(comm, num_nvl_bytes + num_rdma_bytes)
        try:
            self.device_id = self.runtime.device_id
            cupy.cuda.Device(self.device_id).use()
            self.comm_stream = cupy.cuda.Stream(non_blocking=True)
            total = num_nvl_bytes + num_rdma_bytes
            self.symmetric = self.runtime.alloc(total) if total > 0 else None
            if self.symmetric is not None:
                self.symmetric.fill(0)
                cupy.cuda.Device(self.device_id).synchronize()
            self.num_nvl_bytes, self.num_rdma_bytes = num_nvl_bytes, num_rdma_bytes
            self._layout: Optional[LayoutKernel] = None
            self._range_checker: Optional[IndexRangeChecker] = None
            # bad expert ids found by the kernels that read topk_idx (layout), raised at the next call
            self.input_errors = DeviceInputErrors()
            self._intranode: Optional[IntranodeKernels] = None
            self._internode: Optional[InternodeKernels] = None
            self._low_latency: Optional[LowLatencyKernels] = None
            self.allow_nvlink_for_low_latency_mode = allow_nvlink_for_low_latency_mode
            self._combine_buffer = None
        except BaseException:
            nvshmem_runtime.release()
            raise

    # ------------------------------------------------------------------------------------------
    def check(self, what: str) -> None:
        """Wait for every kernel queued on this GPU, then raise what any of this buffer's kernels
        reported (timeouts, overflow, bad expert ids), clearing the record. Pending low-latency
        hooks are not waited for: their receive kernels have not been launched."""
        import cupy
        if cupy.cuda.get_current_stream().is_capturing():
            raise DeepEPInvalid("check: the current stream is capturing a CUDA graph; check after the replay")
        cupy.cuda.Device(self.device_id).synchronize()
        self.raise_reported(what)

    def raise_reported(self, what: str) -> None:
        """Raise (and clear) what this buffer's finished kernels recorded: bad expert ids, timeouts,
        overflow. Reads pinned memory, no wait: work still running reports at a later call."""
        self.input_errors.check(what)
        for kernels in (self._intranode, self._internode, self._low_latency):
            if kernels is not None:
                kernels.check_errors(what)

    @property
    def device(self) -> tuple:
        """``("cuda", device_id)``: where inputs must live."""
        return ("cuda", self.device_id)

    @property
    def xp(self):
        """``cupy``: the backend's arrays are CuPy views."""
        import cupy
        return cupy

    @property
    def dispatch_handle_kind(self) -> str:
        """``InternodeHandle`` on more than one node, else ``IntranodeHandle``."""
        return "InternodeHandle" if self.num_nodes > 1 else "IntranodeHandle"

    def take(self, x, name: str, align: int = 0):
        """``x`` as a CuPy view (``arrays.to_cupy``) whose data pointer is a multiple of its element
        size, and of ``align`` bytes when given (``VECTOR_ALIGNMENT`` for arrays the kernels move
        with 16-byte accesses: dispatch/combine ``x``, ``bias``, ``out``): a misaligned access would
        fault and take the CUDA context down, so it raises ``DeepEPInvalid`` here, before any launch."""
        arr = arrays.to_cupy(x, name)
        expect_aligned(arr, name, max(align, arr.itemsize))
        return arr

    def give(self, arr, like_framework, dtype: Optional[str] = None):
        """CuPy results as CuPy (no conversion), JAX or PyTorch arrays over the same memory
        (``arrays.from_cupy``)."""
        if arr is None:
            return arr
        if like_framework in (arrays.Framework.CUPY, arrays.Framework.DLPACK):
            # (canonical_dtype is a dict lookup; numpy's dtype.name is Python code, ~2 us a call)
            name = None if dtype is None else arrays.canonical_dtype(arr.dtype)
            if dtype is None or dtype == name or (dtype in arrays.FP8_DTYPES and name == "uint8"):
                return arr      # already what the caller gets (the common hot path: no conversion)
        return arrays.from_cupy(arr, like_framework, dtype or arrays.describe(arr).dtype)

    def capturing(self) -> bool:
        """Whether CuPy's current stream captures a CUDA graph."""
        import cupy
        return cupy.cuda.get_current_stream().is_capturing()

    def current_stream_event(self) -> EventOverlap:
        """An event recorded on CuPy's current stream now."""
        import cupy
        return EventOverlap(cupy.cuda.get_current_stream().record())

    def checks_values(self) -> bool:
        """Only with ``settings.check_values`` and outside CUDA-graph capture (a device reduction and
        a host wait)."""
        if not settings.check_values:
            return False
        return not self.capturing()

    def combine_rows(self, handle) -> int:
        """The handle's ``num_rows`` (received rows, or the padded count)."""
        return handle.num_rows

    def check_ids(self, topk_idx, num_experts: int, blocking: bool) -> bool:
        """The blocking check of ``settings.check_values`` when ``blocking`` (a no-op without the
        setting: the kernels that read ``topk_idx`` check the ids and report them; a request that
        does not say ``ids_checked`` gets the blocking check at the operation's start). True when it ran."""
        if not (blocking and self.checks_values()):
            return False
        self.check_index_range(topk_idx, "topk_idx", -1, num_experts)
        return True

    def precheck_dispatch(self, x, x_scales, topk_idx, num_experts: int, handle) -> None:
        """The dispatch kernels' ``check_dispatch`` (staging capacity) of the intranode or, on more
        than one node, the internode kernels."""
        kernels = self.internode() if self.num_nodes > 1 else self.intranode()
        check = getattr(kernels, "check_dispatch", None)
        if check is not None:
            check(x, x_scales, topk_idx, num_experts, handle)

    def check_low_latency_capacity(self, topk_idx, num_experts: int, num_max_dispatch_tokens_per_rank: int) -> None:
        """Nothing before the launch (the host would have to read ``topk_idx``)."""

    def expected_layout(self, topk_idx, num_experts: int, previous_event,
                        ids_checked: bool = False) -> Optional[LayoutResult]:
        """The layout kernel's answer (``get_dispatch_layout`` runs the blocking id check before the
        kernel, which counts a bad id as -1, unless ``ids_checked``); None above ``MAX_LAYOUT_EXPERTS``
        experts, which the layout kernel cannot count."""
        if num_experts > MAX_LAYOUT_EXPERTS:
            return None
        return self.get_dispatch_layout(LayoutRequest(topk_idx, num_experts, previous_event,
                                                      ids_checked=ids_checked))

    def destroy(self) -> None:
        """Collective: free the symmetric memory and drop this buffer's hold on NVSHMEM. If a peer
        does not arrive within ``settings.timeout_seconds`` (it died), nothing collective is done:
        the memory stays with this process, which should exit (see ``runtime.nvshmem``)."""
        import cupy
        cupy.cuda.Device(self.device_id).synchronize()   # our kernels end: every wait is bounded
        if self.symmetric is not None:
            # nobody may still be writing into our memory
            if not nvshmem_runtime.timed_barrier(self.comm, settings.timeout_seconds):
                self.symmetric = None
                self.runtime._abandon("destroying a Buffer")
                nvshmem_runtime.forget()
                return
            self.runtime.free(self.symmetric)
            self.symmetric = None
        nvshmem_runtime.release()

    def peer_view(self, pe: int):
        """A CuPy uint8 view of PE ``pe``'s symmetric buffer over NVLink, or None if unreachable."""
        import cupy
        if self.symmetric is None:
            return None
        ptr = self.runtime.peer_ptr(self.symmetric, pe)
        if ptr == 0:
            return None
        mem = cupy.cuda.UnownedMemory(ptr, self.symmetric.nbytes, self)
        return cupy.ndarray((self.symmetric.nbytes,), cupy.uint8, cupy.cuda.MemoryPointer(mem, 0))

    def layout_kernel(self) -> LayoutKernel:
        """The layout kernel for this rank count (compiled or loaded on first use)."""
        if self._layout is None:
            self._layout = LayoutKernel(self.num_ranks, self.ranks_per_node, self.jit_options)
        return self._layout

    def intranode(self) -> IntranodeKernels:
        """The intranode dispatch/combine kernels bound to this buffer (built on first use)."""
        if self._intranode is None:
            self._intranode = IntranodeKernels(self, self.jit_options)
        return self._intranode

    def internode(self) -> InternodeKernels:
        """The hierarchical kernels (more than one node), built on first use. They use the RDMA region,
        as the low-latency kernels do, so one buffer serves one of the two."""
        if self._internode is None:
            if self._low_latency is not None:
                raise DeepEPInvalid("self: this buffer's RDMA region holds the low-latency kernels; use "
                                    "another Buffer for the internode dispatch/combine")
            self._internode = InternodeKernels(self, self.jit_options)
        return self._internode

    @property
    def num_nodes(self) -> int:
        """Nodes of ``ranks_per_node`` ranks."""
        return self.num_ranks // self.ranks_per_node

    def check_index_range(self, values, name: str, low: int, high: int) -> None:
        """The blocking value check before a launch, for debugging: only when ``settings.check_values``
        is on and the stream is not capturing (it waits for the GPU). Without it the kernels that
        read ``topk_idx`` check it themselves and report through ``self.input_errors``."""
        import cupy
        stream = cupy.cuda.get_current_stream()
        if not settings.check_values or stream.is_capturing():
            return
        if self._range_checker is None:
            self._range_checker = IndexRangeChecker(self.jit_options)
        self._range_checker(values, name, low, high, stream)

    # ------------------------------------------------------------------------------------------
    def get_dispatch_layout(self, request: LayoutRequest) -> LayoutResult:
        """See ``Buffer.get_dispatch_layout``; ``topk_idx`` is a CuPy int64 [T, K]."""
        topk_idx, num_experts = request.topk_idx, request.num_experts
        self.input_errors.check("get_dispatch_layout")
        kernel = self.layout_kernel()
        if not request.ids_checked:
            self.check_index_range(topk_idx, "topk_idx", -1, num_experts)
        with CommStreamScope(self.comm_stream, request.previous_event, request.async_finish,
                             request.allocate_on_comm_stream) as scope:
            outputs = kernel(topk_idx, num_experts, self.comm_stream, self.input_errors.ptr, self.rank)
            self.input_errors.launched(num_experts)
        event = scope.finish(keep_alive=(topk_idx,) + tuple(o for o in outputs if o is not None))
        return LayoutResult(*outputs, event)

    # ------------------------------------------------------------------------------------------
    def dispatch(self, request: DispatchRequest) -> DispatchResult:
        """See ``Buffer.dispatch``. CuPy arrays in (fp8 as uint8 storage); CuPy arrays out.
        One node: the intranode kernels; several: the hierarchical ones (same interface).
        ``by_rank_mask``: the kernels route by ``is_token_in_rank`` with one (empty) expert per rank."""
        x, x_scales, topk_idx, topk_weights = request.x, request.x_scales, request.topk_idx, request.topk_weights
        num_tokens_per_rank, is_token_in_rank = request.num_tokens_per_rank, request.is_token_in_rank
        num_tokens_per_expert, num_experts, handle = request.num_tokens_per_expert, request.num_experts, request.handle
        expert_alignment, num_worst_tokens = request.expert_alignment, request.num_worst_tokens
        config, previous_event = request.config, request.previous_event
        if request.by_rank_mask:
            import cupy
            num_tokens_per_expert = cupy.zeros(self.num_ranks, dtype=cupy.int32)   # one (empty) expert per rank
        kernels = self.internode() if self.num_nodes > 1 else self.intranode()
        kernels.check_errors("dispatch")
        self.input_errors.check("dispatch")
        if handle is None and topk_idx is not None and not request.ids_checked:
            self.check_index_range(topk_idx, "topk_idx", -1, num_experts)
        if handle is None and (num_tokens_per_rank is None or is_token_in_rank is None
                               or num_tokens_per_expert is None):   # (ids checked just above)
            layout = self.get_dispatch_layout(LayoutRequest(topk_idx, num_experts, previous_event,
                                                            ids_checked=True))
            num_tokens_per_rank, num_tokens_per_expert = layout.num_tokens_per_rank, layout.num_tokens_per_expert
            is_token_in_rank = layout.is_token_in_rank
        kernels.check_dispatch(x, x_scales, topk_idx, num_experts, handle)
        with CommStreamScope(self.comm_stream, previous_event, request.async_finish,
                             request.allocate_on_comm_stream) as scope:
            inputs = (x, x_scales, topk_idx, topk_weights, num_tokens_per_rank, is_token_in_rank,
                      num_tokens_per_expert)
            queued = []   # the event, when the kernels close the scope before the host waits

            def on_queued():
                # outputs need no keep-alive there: they are the caller's arena blocks, and a block
                # the caller drops is reused only by later work on the communication stream
                queued.append(self._finish(scope, *inputs))

            if handle is None:
                recv_x, recv_scales, recv_idx, recv_w, per_expert, handle = kernels.notify_and_dispatch(
                    DispatchPayload(x, x_scales, topk_idx, topk_weights),
                    DispatchRouting(is_token_in_rank, num_tokens_per_rank, num_tokens_per_expert, num_experts,
                                    expert_alignment),
                    num_worst_tokens, config.num_sms, self.comm_stream, on_queued=on_queued)
            else:
                recv_x, recv_scales = kernels.cached_dispatch(x, x_scales, handle, config.num_sms, self.comm_stream)
                recv_idx = recv_w = per_expert = None
        event = queued[0] if queued else self._finish(scope, *inputs, recv_x, recv_scales, recv_idx, recv_w)
        if event.extra_arrays is not None:   # async: the handle's arrays too (the caller may drop it first)
            event.extra_arrays = event.extra_arrays + handle.device_arrays()
        if request.by_rank_mask:   # no expert information travelled
            recv_idx, recv_w, per_expert = None, None, []
        return DispatchResult(recv_x, recv_scales, recv_idx, recv_w, per_expert, handle, event)

    @staticmethod
    def _finish(scope, *arrays):
        """The operation's event, keeping its (non-None) arrays alive until the work is done."""
        return scope.finish(keep_alive=tuple(a for a in arrays if a is not None))

    def combine(self, request: CombineRequest) -> CombineResult:
        """See ``Buffer.combine``."""
        x, handle, topk_weights = request.x, request.handle, request.topk_weights
        bias0, bias1 = request.bias
        # the handle says which path made it: the stages backwards, or the intranode combine
        kernels = self.internode() if isinstance(handle, InternodeHandle) else self.intranode()
        kernels.check_errors("combine")
        self.input_errors.check("combine")
        with CommStreamScope(self.comm_stream, request.previous_event, request.async_finish,
                             request.allocate_on_comm_stream) as scope:
            out, out_w = kernels.combine(x, handle, topk_weights, bias0, bias1, request.config.num_sms,
                                         self.comm_stream)
        return CombineResult(out, out_w, self._finish(scope, x, topk_weights, bias0, bias1, out, out_w,
                                                      *handle.device_arrays()))

    # ------------------------------------------------------------------------------ low latency
    def low_latency(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> LowLatencyKernels:
        """The low-latency kernels laid out for these shapes. A change of shapes re-lays the region,
        which needs a collective clean (every rank makes the same calls, so all get here together)."""
        import cupy
        key = (num_max_dispatch_tokens_per_rank, hidden, num_experts)
        if self._internode is not None:
            raise DeepEPInvalid("self: this buffer's RDMA region holds the internode kernels; use another "
                                "Buffer (low_latency_mode=True) for the low-latency kernels")
        kernels = self._low_latency
        if kernels is not None and kernels.shape_key == key:
            return kernels
        if cupy.cuda.get_current_stream().is_capturing():
            raise DeepEPInvalid("low-latency shapes (num_max_dispatch_tokens_per_rank, hidden, num_experts) "
                                f"changed to {key} during CUDA-graph capture; make one eager call with them first")
        if kernels is not None and kernels.pending:
            raise DeepEPInvalid(f"low-latency shapes changed to {key} while {len(kernels.pending)} operation(s) "
                                "still wait for their hook")
        kernels = LowLatencyKernels(self, num_max_dispatch_tokens_per_rank, hidden, num_experts,
                                    force_puts=not self.allow_nvlink_for_low_latency_mode,
                                    jit_options=self.jit_options)
        if self._low_latency is not None:
            self._collective_clean(kernels)
        self._low_latency = kernels
        return kernels

    def _collective_clean(self, kernels: LowLatencyKernels) -> None:
        import cupy
        cupy.cuda.Device(self.device_id).synchronize()   # our kernels end: every wait is bounded
        self._clean_barrier(kernels, "before")           # no peer still writes into our region
        kernels.clean()
        self._clean_barrier(kernels, "after")            # nobody writes before every region is clean

    def _clean_barrier(self, kernels: LowLatencyKernels, when: str) -> None:
        """The re-lay's barrier, bounded like every other wait: a rank that changed the low-latency
        shapes alone (its peers did not make this call, or died) gets a ``DeepEPTimeout`` naming the
        phase instead of waiting in ``comm.Barrier()`` forever (seen on the GPU machine, 2026-12-06:
        a rank stuck there after an agreement test, and the test run hung). The buffer is then out of
        step with its peers: clean it collectively (``clean_low_latency_buffer``) or destroy it."""
        if not nvshmem_runtime.timed_barrier(self.comm, settings.timeout_seconds):
            from .errors import DeepEPTimeout
            raise DeepEPTimeout(
                f"rank {self.rank}: low-latency re-lay for (num_max_dispatch_tokens_per_rank, hidden, num_experts) "
                f"= {kernels.shape_key}: a peer did not arrive at the barrier {when} the clean within "
                f"{settings.timeout_seconds} s; every rank must change these shapes in the same call")

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Collective: zero the low-latency region and its sequence counters."""
        self._collective_clean(self.low_latency(num_max_dispatch_tokens_per_rank, hidden, num_experts))

    def low_latency_dispatch(self, request: LowLatencyDispatchRequest) -> LowLatencyDispatchResult:
        """See ``Buffer.low_latency_dispatch``; fp8 data as uint8 storage."""
        import cupy
        x, topk_idx, num_experts = request.x, request.topk_idx, request.num_experts
        use_fp8, round_scale, use_ue8m0 = request.use_fp8, request.round_scale, request.use_ue8m0
        kernels = self.low_latency(request.num_max_dispatch_tokens_per_rank, int(x.shape[1]), num_experts)
        kernels.check_errors("low_latency_dispatch")      # the send reports bad expert ids here too
        self.input_errors.check("low_latency_dispatch")
        if not request.ids_checked:
            self.check_index_range(topk_idx, "topk_idx", -1, num_experts)
        if request.return_recv_hook:   # sends on the current stream; hook() receives on the stream current then
            pending = kernels.dispatch_send(x, topk_idx, use_fp8, round_scale, use_ue8m0,
                                            cupy.cuda.get_current_stream())
            recv_stats = request.recv_stats   # the hook keeps this, not the whole request

            def hook():
                """Complete the receive of this low-latency dispatch (on the current stream)."""
                stream = cupy.cuda.get_current_stream()
                kernels.dispatch_recv(pending, stream)
                _add_recv_stats(recv_stats, pending.handle.recv_count, stream)

            hd = pending.handle
            return LowLatencyDispatchResult(pending.recv_x, pending.recv_scales, hd.recv_count, hd,
                                            EventOverlap(None), hook)
        with CommStreamScope(self.comm_stream, None, request.async_finish, False) as scope:
            recv_x, recv_scales, recv_count, handle = kernels.dispatch(x, topk_idx, use_fp8, round_scale, use_ue8m0,
                                                                       self.comm_stream)
            _add_recv_stats(request.recv_stats, recv_count, self.comm_stream)
        keep = (x, topk_idx) + tuple(a for a in (recv_x, recv_scales, recv_count, request.recv_stats) if a is not None)
        return LowLatencyDispatchResult(recv_x, recv_scales, recv_count, handle, scope.finish(keep_alive=keep), None)

    def low_latency_combine(self, request: LowLatencyCombineRequest) -> LowLatencyCombineResult:
        """See ``Buffer.low_latency_combine``; the combined array is bf16 [T, H]."""
        import cupy
        x, topk_idx, topk_weights = request.x, request.topk_idx, request.topk_weights
        handle: LowLatencyHandle = request.handle
        out = request.out
        kernels = self.low_latency(handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts)
        kernels.check_errors("low_latency_combine")
        self.input_errors.check("low_latency_combine")
        if request.return_recv_hook:
            stream = cupy.cuda.get_current_stream()
            out = kernels.combine_output(handle, out, stream)   # allocated now: the hook allocates nothing
            pending = kernels.combine_send(x, handle, stream)

            def hook():
                """Complete the receive of this low-latency combine (on the current stream)."""
                kernels.combine_recv(pending, topk_idx, topk_weights, out, cupy.cuda.get_current_stream())

            return LowLatencyCombineResult(out, EventOverlap(None), hook)
        with CommStreamScope(self.comm_stream, None, request.async_finish, False) as scope:
            out = kernels.combine(x, handle, topk_idx, topk_weights, out, self.comm_stream)
        return LowLatencyCombineResult(out, scope.finish(keep_alive=(x, topk_idx, topk_weights, out)), None)

    def is_low_latency_combine_buffer(self, x) -> bool:
        """Whether ``x`` is the array ``get_next_low_latency_combine_buffer`` handed out (no allocation)."""
        own = self._combine_buffer
        return own is not None and int(x.data.ptr) == int(own.data.ptr)

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle):
        """A bf16 ``[L, R*M, H]`` array owned by the buffer for expert outputs (``zero_copy``)."""
        import cupy
        shape = (handle.num_experts // self.num_ranks, self.num_ranks * handle.num_max_dispatch_tokens_per_rank,
                 handle.hidden)
        if self._combine_buffer is None or self._combine_buffer.shape != shape:
            self._combine_buffer = cupy.zeros(shape, dtype=cupy.dtype("bfloat16"))
        return self._combine_buffer
