"""Launchers of cuda_src/low_latency.cu: low-latency dispatch and combine (decode).

Design, buffer layout and protocol: docs/low_latency.md and the header of the .cu file. In short:
the region ``[num_nvl_bytes, num_nvl_bytes + num_rdma_bytes)`` of the buffer's symmetric memory has
two halves; ``ll_dispatch_send`` ranks every (token, k) entry within its expert (deterministic order) and
sends each token once per destination rank (NVLink stores, or NVSHMEM puts for
peers without an NVLink mapping / when forced); ``ll_dispatch_recv`` (the hook) unpacks per local
expert in (source rank, token, k) order; combine sends one row per (token, k) back in token order,
with a per-token arrival count that lets the receiver reduce each token as soon as it is complete.

Every operation is a send half (returns at once; no SM waits for peers) and a receive half (the
hook). Sequence counters in device memory pair them up, so at most two operations may be in flight
(sent, not yet received); receives must follow the order of the sends.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from . import jit
from .config import settings
from .errors import DeepEPInvalid
from .handles import DeepEPLowLatencyTuple
from .kernel_errors import PinnedErrorRecord
from .kernel_params import ParamStruct

__all__ = ["LowLatencyLayout", "LowLatencyHandle", "LowLatencyKernels", "PendingDispatch", "PendingCombine",
           "low_latency_spec", "size_hint", "MAX_TOPK", "MAX_TOKENS", "MAX_HIDDEN", "MAX_EXPERTS"]

MAX_TOPK = 16          # combine rows are sized for this many slots per token
HEADER_BYTES = 16
THREADS = 512
RECV_THREADS = 256     # ll_combine_recv: a warp per (token, 256 channels)
MAX_TOKENS = 1024      # num_max_dispatch_tokens_per_rank accepted
MAX_HIDDEN = 8192      # hidden sizes: multiples of 128 up to this
MAX_EXPERTS = 1024     # kMaxExperts in the kernels (per-block prefix table)
TMA_SMEM_BYTES = (THREADS // 32) * 2 * (2 * MAX_HIDDEN // 4)   # combine send with TMA: 2 stages per warp
_ALIGN = 256


def _align(x: int, a: int = _ALIGN) -> int:
    return (x + a - 1) // a * a


# cuda_src/low_latency_params.cuh, same orders: one by-value struct per kernel. Every value that
# changes from call to call without the host (the sequence and last-block counters, the error
# record) stays behind a pointer, so a captured graph replays correctly.
_LL_TEAM = ("region", "layout", "seq", "done", "err", "timeout_ns", "num_tokens", "hidden", "num_topk", "num_experts",
            "use_fp8", "round_scale", "use_ue8m0", "rank")
_RECV_OUTPUTS = ("recv_x", "recv_scales", "recv_count", "recv_src_info", "recv_src_k", "layout_begin",
                 "layout_count", "combine_slot", "src_tokens")
LL_DISPATCH_SEND_PARAMS = ParamStruct("LLDispatchSendParams", (
    "x", "topk_idx", "counts", "topk_slots", "peer_regions") + _LL_TEAM + ("guard",))
LL_DISPATCH_RECV_PARAMS = ParamStruct("LLDispatchRecvParams", _RECV_OUTPUTS + _LL_TEAM)
LL_DISPATCH_PARAMS = ParamStruct("LLDispatchParams", (
    "x", "topk_idx", "counts", "topk_slots") + _RECV_OUTPUTS + ("peer_regions",) + _LL_TEAM + ("guard",))
LL_COMBINE_SEND_PARAMS = ParamStruct("LLCombineSendParams", (
    "x", "combine_slot", "src_tokens", "peer_regions") + _LL_TEAM + ("guard", "use_tma"))
LL_COMBINE_RECV_PARAMS = ParamStruct("LLCombineRecvParams", (
    "topk_idx", "topk_weights", "out", "topk_slots") + _LL_TEAM)
LL_COMBINE_PARAMS = ParamStruct("LLCombineParams", (
    "x", "combine_slot", "src_tokens", "topk_idx", "topk_weights", "out", "topk_slots", "peer_regions") + _LL_TEAM
    + ("guard", "use_tma", "reduce_warps"))


def low_latency_spec(num_ranks: int) -> jit.KernelSpec:
    """The JIT instance of cuda_src/low_latency.cu for ``num_ranks`` ranks."""
    return jit.KernelSpec.make(
        "low_latency.cu", ["ll_dispatch", "ll_combine", "ll_dispatch_send", "ll_dispatch_recv", "ll_combine_send",
                           "ll_combine_recv"], {"DEEPEP_NUM_RANKS": num_ranks}, uses_nvshmem=True)


def payload_bytes(hidden: int) -> int:
    """Bytes of the largest payload (bf16 data, or fp8 data plus float32 scales), padded to 16."""
    return _align(max(2 * hidden, hidden + hidden // 32), 16)


@dataclasses.dataclass(frozen=True)
class LowLatencyLayout:
    """Offsets of one half of the low-latency region (both halves are alike); see the .cu header."""

    num_ranks: int
    max_tokens: int
    hidden: int
    num_experts: int
    max_topk: int
    msg_bytes: int
    meta_ints: int
    recv_msgs: int
    recv_meta: int
    recv_flags: int
    combine_rows: int
    combine_flags: int
    send_msgs: int
    combine_stage: int
    meta_stage: int
    combine_arrived: int
    half_bytes: int
    control: int = 0

    @classmethod
    def build(cls, max_tokens: int, hidden: int, num_ranks: int, num_experts: int,
              max_topk: int = MAX_TOPK) -> "LowLatencyLayout":
        """Lay out one half for M = ``max_tokens`` tokens per rank."""
        r, m, k = num_ranks, max_tokens, max_topk
        msg = _align(HEADER_BYTES + 8 * k, 16) + payload_bytes(hidden)
        meta_ints = 1 + num_experts // num_ranks
        off, parts = 0, {}
        for name, size in (("recv_msgs", r * m * msg), ("recv_meta", r * meta_ints * 4), ("recv_flags", 8 * r),
                           ("combine_rows", m * k * hidden * 2), ("combine_flags", 8 * r),
                           ("send_msgs", m * msg), ("combine_stage", r * m * k * hidden * 2),
                           ("meta_stage", r * meta_ints * 4), ("combine_arrived", 8 * m)):
            parts[name] = off
            off += _align(size)
        return cls(num_ranks=r, max_tokens=m, hidden=hidden, num_experts=num_experts, max_topk=k,
                   msg_bytes=msg, meta_ints=meta_ints, half_bytes=off, control=2 * off, **parts)

    @property
    def total_bytes(self) -> int:
        """Both halves and the control word (operations received, read by peers' guards)."""
        return 2 * self.half_bytes + _ALIGN

    def device_struct(self):
        """The kernel's ``LLLayout`` (11 int64 + 4 int32) as a CuPy byte array."""
        import cupy
        host = np.zeros(13, dtype=np.int64)
        host[:11] = [self.half_bytes, self.recv_msgs, self.recv_meta, self.recv_flags, self.combine_rows,
                     self.combine_flags, self.send_msgs, self.combine_stage, self.meta_stage, self.control,
                     self.combine_arrived]
        host.view(np.int32)[22:26] = [self.msg_bytes, self.meta_ints, self.max_tokens, self.max_topk]
        return cupy.asarray(host.view(np.uint8))


def size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int,
              max_topk: int = MAX_TOPK) -> int:
    """``num_rdma_bytes`` the low-latency kernels need (both halves)."""
    return LowLatencyLayout.build(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts,
                                  max_topk).total_bytes


@dataclasses.dataclass(frozen=True, eq=False)
class LowLatencyHandle(DeepEPLowLatencyTuple):
    """What a low-latency combine needs from its dispatch (CuPy arrays on the GPU). Indexable like
    DeepEP's tuple: ``handle[0]`` is ``recv_src_info``, ``handle[1]`` ``layout_range``, then
    ``num_max_dispatch_tokens_per_rank``, ``hidden``, ``num_experts``.

    recv_src_info / recv_src_k: int32 [L, R*M] source token and top-k slot of each received entry.
    topk_slots: int32 [T, K] rank of each of this rank's (t, k) entries within its expert (-1 none):
    the combine's receive counts the rows it waits for with it.
    combine_slot: int32 [R, M, K] the recv_x row that holds source s's entry (t, k) (-1 none): the
    combine sends in token order with it. src_tokens: int32 [R] tokens each source dispatched.
    layout_begin / layout_count: int32 [L, R]. recv_count: int32 [L]. Host ints: num_tokens,
    num_experts, hidden, num_topk, num_max_dispatch_tokens_per_rank. use_fp8 / use_ue8m0: flags
    of the dispatch.
    """

    recv_src_info: object
    recv_src_k: object
    layout_begin: object
    layout_count: object
    recv_count: object
    topk_slots: object
    combine_slot: object
    src_tokens: object
    num_tokens: int
    num_experts: int
    hidden: int
    num_topk: int
    use_fp8: bool
    use_ue8m0: bool
    num_max_dispatch_tokens_per_rank: int

    @property
    def layout_range(self):
        """int64 [L, R]: (begin << 32) | count (DeepEP's packing)."""
        import cupy
        return (self.layout_begin.astype(cupy.int64) << 32) | self.layout_count.astype(cupy.int64)


@dataclasses.dataclass(eq=False)
class PendingDispatch:
    """A dispatch whose sends are issued and whose receive (the hook) is still to run (its shapes
    and flags are the handle's)."""

    recv_x: object
    recv_scales: object
    handle: LowLatencyHandle
    keep_alive: tuple


@dataclasses.dataclass(eq=False)
class PendingCombine:
    """A combine whose sends are issued and whose receive (the hook) is still to run; ``x`` is
    kept alive until then."""

    handle: LowLatencyHandle
    x: object


class LowLatencyKernels:
    """The low-latency kernels bound to one buffer's symmetric memory (region after num_nvl_bytes).

    Arguments:
        backend: the ``GpuBackend`` (runtime, symmetric memory, rank).
        num_max_dispatch_tokens_per_rank, hidden, num_experts: the fixed shapes of the region.
        max_topk: top-k slots the combine rows are sized for.
        force_puts: reach every peer (itself included) through NVSHMEM puts instead of NVLink stores.
        jit_options: how the kernels are compiled.
    """

    def __init__(self, backend, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int,
                 max_topk: int = MAX_TOPK, force_puts: bool = False,
                 jit_options: Optional[jit.JitOptions] = None):
        import cupy

        self.num_ranks, self.rank = backend.num_ranks, backend.rank
        self.layout = LowLatencyLayout.build(num_max_dispatch_tokens_per_rank, hidden, self.num_ranks,
                                             num_experts, max_topk)
        if backend.num_rdma_bytes < self.layout.total_bytes:
            raise DeepEPInvalid(f"num_rdma_bytes: the low-latency kernels need {self.layout.total_bytes} bytes "
                                f"for these shapes, the buffer has {backend.num_rdma_bytes} "
                                "(Buffer.get_low_latency_rdma_size_hint)")
        rt = backend.runtime
        base = int(backend.symmetric.data.ptr) + backend.num_nvl_bytes
        self.region = cupy.uint64(base)
        self._region_view = backend.symmetric[backend.num_nvl_bytes:backend.num_nvl_bytes + self.layout.total_bytes]
        peers = []
        for pe in range(self.num_ranks):
            ptr = 0 if force_puts else rt.peer_ptr(backend.symmetric, pe)
            peers.append(ptr + backend.num_nvl_bytes if ptr else 0)
        self.peer_regions = cupy.asarray(np.array(peers, dtype=np.uint64))
        self.layout_struct = self.layout.device_struct()
        self.seq = cupy.zeros(2, dtype=cupy.uint64)      # [operations sent, operations received]
        self.done = cupy.zeros(4, dtype=cupy.uint32)     # last-block counters, one per kernel kind
        self.counts = cupy.zeros(num_experts, dtype=cupy.int32)   # per-expert entries; the send kernel re-zeroes
        self.module = jit.load(low_latency_spec(self.num_ranks), jit_options)
        rt.register_module(self.module)
        for name in ("ll_combine", "ll_combine_send"):   # room for the TMA stages (used when enabled)
            self.module[name].max_dynamic_shared_size_bytes = TMA_SMEM_BYTES
        self.errors = PinnedErrorRecord()
        # one block per SM, all resident at once (blocks wait on peers); ranks sharing a GPU split it
        self._sms = max(1, cupy.cuda.Device().attributes["MultiProcessorCount"]
                        // rt.ranks_per_gpu)
        self.pending: list = []                           # operations sent, not yet received
        self._guarded_sends = 0     # sends that must first wait for peers (after two were in flight)
        cupy.cuda.Device().synchronize()

    @property
    def shape_key(self) -> tuple:
        """(M, hidden, num_experts) the region is laid out for."""
        return self.layout.max_tokens, self.layout.hidden, self.layout.num_experts

    def check_errors(self, what: str) -> None:
        """Raise if an earlier low-latency kernel recorded a timeout or a bad value (an expert id
        outside [-1, num_experts) in a dispatch's ``topk_idx``, sent as -1: ``DeepEPInvalid``)."""
        self.errors.check(what, num_experts=self.layout.num_experts)

    def clean(self) -> None:
        """Zero the region and the counters on this rank (the caller makes it collective)."""
        import cupy
        cupy.cuda.Device().synchronize()
        self._region_view.fill(0)
        self.seq.fill(0)
        self.done.fill(0)
        self.counts.fill(0)
        self.pending.clear()
        self._guarded_sends = 0
        cupy.cuda.Device().synchronize()

    def _team_fields(self, seq, done, num_tokens: int, num_topk: int, use_fp8=False, round_scale=False,
                     use_ue8m0=False) -> dict:
        """The fields every kernel's struct takes (``_LL_TEAM``): the region, its layout, the
        kernel's counters (``seq``, ``done``: slices of the device arrays), the error record, the
        timeout, the call's shape and this rank."""
        lay = self.layout
        return dict(region=self.region, layout=self.layout_struct, seq=seq, done=done, err=self.errors.ptr,
                    timeout_ns=settings.timeout_ns, num_tokens=num_tokens, hidden=lay.hidden,
                    num_topk=num_topk, num_experts=lay.num_experts, use_fp8=use_fp8, round_scale=round_scale,
                    use_ue8m0=use_ue8m0, rank=self.rank)

    def _no_pending(self, what: str) -> None:
        """A call without a hook completes its receive at once, so no earlier receive may be due."""
        if self.pending:
            raise DeepEPInvalid(f"{what}: {len(self.pending)} earlier low-latency operation(s) still wait for "
                                "their hook; call them first (receives complete in the order of the sends)")

    def _admit(self, what: str) -> None:
        if len(self.pending) >= 2:
            raise DeepEPInvalid(f"{what}: two low-latency operations already wait for their hook; call the "
                                "older hook first (at most two operations may be in flight)")

    def _guard(self) -> bool:
        """The send's ``guard`` field. Once two operations were in flight, a peer may still be
        reading the half the next sends write into, so the next two sends wait for it first."""
        guard = self._guarded_sends > 0
        self._guarded_sends = max(0, self._guarded_sends - 1)
        if self.pending:            # this send joins one still in flight
            self._guarded_sends = 2
        return guard

    def _dispatch_outputs(self, num_tokens: int, num_topk: int, use_fp8: bool, use_ue8m0: bool, stream):
        """Allocate a dispatch's outputs on ``stream``: (recv_x, recv_scales or None, handle)."""
        import cupy
        lay = self.layout
        num_local = lay.num_experts // self.num_ranks
        slots_per_expert = self.num_ranks * lay.max_tokens
        h = lay.hidden
        with stream:
            recv_x = cupy.empty((num_local, slots_per_expert, h), dtype=cupy.uint8 if use_fp8 else cupy.dtype("bfloat16"))
            recv_scales = None
            if use_fp8:
                recv_scales = (cupy.empty((num_local, slots_per_expert, -(-h // 512)), dtype=cupy.int32) if use_ue8m0
                               else cupy.empty((num_local, slots_per_expert, h // 128), dtype=cupy.float32))
            handle = LowLatencyHandle(
                recv_src_info=cupy.empty((num_local, slots_per_expert), dtype=cupy.int32),
                recv_src_k=cupy.empty((num_local, slots_per_expert), dtype=cupy.int32),
                layout_begin=cupy.empty((num_local, self.num_ranks), dtype=cupy.int32),
                layout_count=cupy.empty((num_local, self.num_ranks), dtype=cupy.int32),
                recv_count=cupy.empty(num_local, dtype=cupy.int32),
                topk_slots=cupy.empty((num_tokens, num_topk), dtype=cupy.int32),
                combine_slot=cupy.empty((self.num_ranks, lay.max_tokens, num_topk), dtype=cupy.int32),
                src_tokens=cupy.empty(self.num_ranks, dtype=cupy.int32), num_tokens=num_tokens,
                num_experts=lay.num_experts, hidden=h, num_topk=num_topk, use_fp8=use_fp8, use_ue8m0=use_ue8m0,
                num_max_dispatch_tokens_per_rank=lay.max_tokens)
        return recv_x, recv_scales, handle

    def _send_fields(self, x, topk_idx, hd, seq, done, use_fp8, round_scale, use_ue8m0) -> dict:
        """A dispatch send's fields (the fused kernel adds the receive's outputs)."""
        return dict(x=x, topk_idx=topk_idx, counts=self.counts, topk_slots=hd.topk_slots,
                    peer_regions=self.peer_regions, guard=self._guard(),
                    **self._team_fields(seq, done, hd.num_tokens, hd.num_topk, use_fp8, round_scale, use_ue8m0))

    @staticmethod
    def _recv_outputs(recv_x, recv_scales, hd) -> dict:
        """A dispatch receive's output fields (``_RECV_OUTPUTS``); recv_scales None packs as 0."""
        return dict(recv_x=recv_x, recv_scales=recv_scales, recv_count=hd.recv_count, recv_src_info=hd.recv_src_info,
                    recv_src_k=hd.recv_src_k, layout_begin=hd.layout_begin, layout_count=hd.layout_count,
                    combine_slot=hd.combine_slot, src_tokens=hd.src_tokens)

    def dispatch(self, x, topk_idx, use_fp8: bool, round_scale: bool, use_ue8m0: bool, stream) -> tuple:
        """Send and receive in one fused kernel on ``stream`` (no hook). Returns (recv_x, recv_scales
        or None, recv_count, handle); fp8 data as uint8 storage."""
        self._no_pending("low_latency_dispatch")
        num_tokens, num_topk = (int(v) for v in topk_idx.shape)
        recv_x, recv_scales, hd = self._dispatch_outputs(num_tokens, num_topk, use_fp8, use_ue8m0, stream)
        # seq: both counters {sent, received}; done: the send and receive phases' counters
        params = LL_DISPATCH_PARAMS.pack(
            **self._send_fields(x, topk_idx, hd, self.seq, self.done[0:2], use_fp8, round_scale, use_ue8m0),
            **self._recv_outputs(recv_x, recv_scales, hd))
        with stream:
            self.module["ll_dispatch"]((self._sms,), (THREADS,), (params,))
        return recv_x, recv_scales, hd.recv_count, hd

    def dispatch_send(self, x, topk_idx, use_fp8: bool, round_scale: bool, use_ue8m0: bool,
                      stream) -> PendingDispatch:
        """Send every token (issued on ``stream``; returns at once). Outputs are allocated here so
        the receive allocates nothing."""
        self._admit("low_latency_dispatch")
        num_tokens, num_topk = (int(v) for v in topk_idx.shape)
        recv_x, recv_scales, handle = self._dispatch_outputs(num_tokens, num_topk, use_fp8, use_ue8m0, stream)
        params = LL_DISPATCH_SEND_PARAMS.pack(**self._send_fields(x, topk_idx, handle, self.seq[0:1], self.done[0:1],
                                                                  use_fp8, round_scale, use_ue8m0))
        with stream:
            self.module["ll_dispatch_send"]((max(1, min(num_tokens, self._sms)),), (THREADS,), (params,))
        pending = PendingDispatch(recv_x, recv_scales, handle, (x, topk_idx))
        self.pending.append(pending)
        return pending

    def _take_turn(self, pending, what: str) -> None:
        if not self.pending or self.pending[0] is not pending:
            state = "already completed" if pending not in self.pending else "not the oldest in flight"
            raise DeepEPInvalid(f"{what}: this operation's receive is {state}; hooks run once each, in the "
                                "order of the calls that returned them")
        self.pending.pop(0)

    def dispatch_recv(self, pending: PendingDispatch, stream) -> tuple:
        """Unpack into per-expert outputs (the receive hook). Returns (recv_x, recv_scales or None,
        recv_count, handle); fp8 data as uint8 storage."""
        self._take_turn(pending, "low_latency_dispatch receive")
        hd = pending.handle
        params = LL_DISPATCH_RECV_PARAMS.pack(
            **self._recv_outputs(pending.recv_x, pending.recv_scales, hd),
            **self._team_fields(self.seq[1:2], self.done[1:2], hd.num_tokens, hd.num_topk, hd.use_fp8, False,
                                hd.use_ue8m0))
        with stream:
            self.module["ll_dispatch_recv"]((self._sms,), (THREADS,), (params,))
        return pending.recv_x, pending.recv_scales, hd.recv_count, hd

    def _combine_send_fields(self, x, handle: LowLatencyHandle, seq, done) -> dict:
        """A combine send's fields (the fused kernel adds the receive's)."""
        return dict(x=x, combine_slot=handle.combine_slot, src_tokens=handle.src_tokens, peer_regions=self.peer_regions,
                    guard=self._guard(), use_tma=settings.ll_combine_tma,
                    **self._team_fields(seq, done, handle.num_tokens, handle.num_topk))

    @staticmethod
    def _combine_smem() -> int:
        """Dynamic shared memory of a combine send launch: the TMA stages when TMA is on."""
        return TMA_SMEM_BYTES if settings.ll_combine_tma else 0

    @staticmethod
    def _reduce_warps() -> int:
        """``settings.ll_combine_reduce_warps`` as the fused combine's field, checked."""
        n = settings.ll_combine_reduce_warps
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n < THREADS // 32:
            raise DeepEPInvalid(f"settings.ll_combine_reduce_warps: expected an int in [0, {THREADS // 32}), "
                                f"got {n!r}")
        return n

    def combine_output(self, handle: LowLatencyHandle, out, stream):
        """``out``, or a new bf16 [T, H] allocated on ``stream`` when it is None."""
        import cupy
        if out is None:
            with stream:
                out = cupy.empty((handle.num_tokens, handle.hidden), dtype=cupy.dtype("bfloat16"))
        return out

    def combine(self, x, handle: LowLatencyHandle, topk_idx, topk_weights, out, stream):
        """Send and reduce in one fused kernel on ``stream`` (no hook): ``settings.ll_combine_reduce_warps``
        warps of every block reduce each token as soon as its rows are in while the others send.
        Returns ``out`` (bf16 [T, H])."""
        self._no_pending("low_latency_combine")
        reduce_warps = self._reduce_warps()
        out = self.combine_output(handle, out, stream)
        params = LL_COMBINE_PARAMS.pack(
            **self._combine_send_fields(x, handle, self.seq, self.done[2:4]), topk_idx=topk_idx,
            topk_weights=topk_weights, out=out, topk_slots=handle.topk_slots, reduce_warps=reduce_warps)
        with stream:
            self.module["ll_combine"]((self._sms,), (THREADS,), (params,), shared_mem=self._combine_smem())
        return out

    def combine_send(self, x, handle: LowLatencyHandle, stream) -> PendingCombine:
        """Send every received slot's expert output back to its token's rank, in token order
        (returns at once)."""
        self._admit("low_latency_combine")
        params = LL_COMBINE_SEND_PARAMS.pack(**self._combine_send_fields(x, handle, self.seq[0:1], self.done[2:3]))
        with stream:
            self.module["ll_combine_send"]((self._sms,), (THREADS,), (params,), shared_mem=self._combine_smem())
        pending = PendingCombine(handle, x)
        self.pending.append(pending)
        return pending

    def combine_recv(self, pending: PendingCombine, topk_idx, topk_weights, out, stream):
        """Weighted sum per token (the receive hook); returns ``out`` (bf16 [T, H])."""
        self._take_turn(pending, "low_latency_combine receive")
        handle = pending.handle
        out = self.combine_output(handle, out, stream)
        warp_items = handle.num_tokens * -(-handle.hidden // 256)    # a warp per (token, 256 channels)
        params = LL_COMBINE_RECV_PARAMS.pack(
            topk_idx=topk_idx, topk_weights=topk_weights, out=out, topk_slots=handle.topk_slots,
            **self._team_fields(self.seq[1:2], self.done[3:4], handle.num_tokens, handle.num_topk))
        with stream:
            self.module["ll_combine_recv"](
                (max(1, min(4 * self._sms, -(-warp_items // (RECV_THREADS // 32)))),), (RECV_THREADS,), (params,))
        return out
