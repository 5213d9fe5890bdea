"""Launchers of cuda_src/intranode.cu: high-throughput dispatch and combine inside one NVLink domain.

Design (docs/intranode.md has the diagrams):
  * The buffer's symmetric memory (``num_nvl_bytes``) holds a control area (notify slots, flags,
    chunk ranges, the direct-dispatch and combine entries), one staging area with one slot per
    other rank (shared by the staged dispatch and the combine), and a receive arena whose blocks
    become the caller's dispatch outputs (``arena.ReceiveArena``). Every rank computes the same
    ``SymmetricLayout`` from (num_ranks, bytes).
  * dispatch: ``bump_seq`` -> ``notify`` (exchange counts, scan ``send_pos``) ->
    ``dispatch_direct`` (receivers post where their outputs are; senders write each row once, in
    place), queued before the host reads the receive count from a pinned record (no read with
    ``num_worst_tokens``); ``settings.intranode_dispatch = "staged"`` (and the internode stages)
    use the two-copy ``dispatch`` kernel instead.
  * combine: ``bump_seq`` -> ``combine`` (each rank posts pull (x in its arena: peers read it in
    place) or push (x sent into the sources' staging); then every rank sums its tokens' copies in
    rank order).
Every wait on a peer is bounded; a timeout lands in a pinned error record that the next call (or
the notify poll) turns into ``DeepEPTimeout`` naming the rank, the phase and the peer.
"""

from __future__ import annotations

import dataclasses
import time
from typing import NamedTuple, Optional

import numpy as np

from . import jit
from .config import settings
from .errors import DeepEPError, DeepEPInvalid, DeepEPTimeout
from .dispatch_args import DataPlan, DispatchOutputs, DispatchPayload, DispatchRouting, FreshDispatch
from .arena import ReceiveArena, spec_nbytes
from .kernel_errors import PinnedErrorRecord
from .kernel_params import ParamStruct

__all__ = ["intranode_spec", "SymmetricLayout", "IntranodeHandle", "IntranodeKernels", "dispatch_row_bytes",
           "combine_row_bytes", "size_hint", "MAX_LOCAL_EXPERTS", "CHUNK_TOKENS"]

CHUNK_TOKENS = 32            # kChunk in the kernel
MAX_CHUNKS = 4096            # -> at most 131072 tokens per rank
MAX_LOCAL_EXPERTS = 1022     # notify slot: 2 counts + per-expert counts
NOTIFY_THREADS = 1024
NOTIFY_MODES = ("fused", "kernel")   # settings.intranode_notify
DIRECT_INFO_WORDS = 16       # kDirectInfoWords: int64 words of a direct_info entry
DATA_THREADS = 512
TMA_MAX_STAGES = 16          # cuda_src/intranode_direct.cuh kTmaMaxStages
# settings.intranode_copy: register copies (16 loads a lane in flight at 2 ranks, 8 at more; 8 always
# with "registers8"), TMA over balanced block ranges, TMA grid-strided
COPY_PATHS = ("registers", "registers8", "tma", "tma-grid")
_ALIGN = 256


def _align(x: int, a: int = _ALIGN) -> int:
    return (x + a - 1) // a * a


def dispatch_row_bytes(hidden_bytes: int, scale_bytes: int, num_topk: int) -> int:
    """Bytes of one staged dispatch row: data, scales, int32 expert ids, float weights, source index."""
    return _align(hidden_bytes + scale_bytes + 8 * num_topk + 4, 16)


def tma_plan(hidden_bytes: int, smem_bytes: int) -> tuple:
    """(producer warps per block, ring stages per producer) of the direct dispatch's TMA send path for
    rows of ``hidden_bytes``, within ``smem_bytes`` of dynamic shared memory; (0, 0) selects the
    register path (rows not whole 16-byte units, or too long for a ring of two).

    Each producer holds ``stages`` whole rows. The one-GPU probe (scripts/bench_copy_paths.py, H100,
    2026-12-07) was fastest with about 200 KB in flight a block: 2 producers of 7 - 8 rows for
    14 KB rows, 4 of 8 for 7 KB rows; one producer or 8 shallow ones were 2 - 16 % slower."""
    if hidden_bytes <= 0 or hidden_bytes % 16:
        return 0, 0
    for producers in ((2, 1) if hidden_bytes > 8192 else (4, 2, 1)):
        stages = min(TMA_MAX_STAGES, smem_bytes // (producers * hidden_bytes))
        if stages >= 4 or (producers == 1 and stages >= 2):
            return producers, stages
    return 0, 0


class CopyPlan(NamedTuple):
    """How the direct dispatch moves rows of one size under one ``settings.intranode_copy``: the
    kernel to launch, and for the TMA path its producer warps a block, ring stages, dynamic shared
    bytes and split (1: grid-strided, 0: block ranges); zeros for the register paths."""
    kernel: str
    producers: int = 0
    stages: int = 0
    smem: int = 0
    split: int = 0


def combine_row_bytes(hidden_bytes: int, num_topk: int) -> int:
    """Bytes of one staged combine row: data and float weights."""
    return _align(hidden_bytes + 4 * num_topk, 16)


@dataclasses.dataclass(frozen=True)
class SymmetricLayout:
    """Byte offsets inside every rank's symmetric buffer (identical on all ranks)."""

    num_ranks: int
    total_bytes: int
    notify_slots: int
    notify_flags: int
    barrier_flags: int
    dispatch_flags: int
    dispatch_ranges: int
    combine_flags: int
    dispatch_staging: int
    combine_staging: int
    staging_bytes: int             # bytes of each staging area
    send_staging: int = 0          # puts transport only: this rank's rows before they are put
    direct_info: int = 0           # int64 [2 parities][R][DIRECT_INFO_WORDS]: each peer's entry (where it
                                   #   wants this rank's rows; fused: its counts too)
    direct_flags: int = 0          # uint64 [R]: seq of each receiver's direct_info entry
    combine_info: int = 0          # int64 [2 parities][R][4]: {mode, x offset, weights offset, seq} of each peer's combine
    combine_info_flags: int = 0    # uint64 [R]: seq of each peer's combine_info entry
    combine_done: int = 0          # uint64 done [R], uint64 ack [R], uint32 block counters [2] (combine completion)
    arena: int = 0                 # receive arena (direct dispatch outputs), arena_bytes long
    arena_bytes: int = 0
    notify_ints: int = MAX_LOCAL_EXPERTS + 2
    max_chunks: int = MAX_CHUNKS

    @staticmethod
    def _control_parts(num_ranks: int) -> tuple:
        r = num_ranks
        return (("notify_slots", 2 * r * (MAX_LOCAL_EXPERTS + 2) * 4),
                ("notify_flags", 8 * r), ("barrier_flags", 8 * r),
                ("dispatch_flags", 8 * r * MAX_CHUNKS), ("dispatch_ranges", 8 * r * MAX_CHUNKS),
                ("combine_flags", 8 * r * MAX_CHUNKS), ("direct_info", 8 * 2 * r * DIRECT_INFO_WORDS),
                ("direct_flags", 8 * r),
                ("combine_info", 8 * 2 * r * 4), ("combine_info_flags", 8 * r), ("combine_done", 8 * 2 * r + 8))

    @staticmethod
    def control_bytes(num_ranks: int) -> int:
        """Bytes before the staging areas."""
        return sum(_align(size) for _, size in SymmetricLayout._control_parts(num_ranks))

    @staticmethod
    def arena_share(num_ranks: int) -> tuple:
        """(staging parts, arena parts) of the bytes after the control area in an ``arena`` layout:
        R - 1 staging rows per 2R arena rows, i.e. room for two receives of R sources each beside
        one staging slot per peer (``size_hint`` sizes it so)."""
        return num_ranks - 1, 2 * num_ranks

    @classmethod
    def bytes_for(cls, num_ranks: int, staging_need: int, arena_need: int = 0, send_area: bool = False,
                  arena: bool = False) -> int:
        """The smallest ``total_bytes`` whose ``build`` gives each staging area ``staging_need``
        bytes (and, with ``arena``, a receive arena of ``arena_need`` bytes)."""
        control = cls.control_bytes(num_ranks)
        staging_need = _align(staging_need)
        if arena:
            stage_parts, arena_parts = cls.arena_share(num_ranks)
            rest = max(staging_need * (stage_parts + arena_parts) // max(stage_parts, 1),
                       -(-arena_need * (stage_parts + arena_parts) // arena_parts))
            return control + _align(rest) + 2 * _ALIGN
        areas = 3 if send_area else 2
        return control + areas * staging_need + areas * _ALIGN

    @classmethod
    def build(cls, num_ranks: int, total_bytes: int, send_area: bool = False,
              arena: bool = False) -> "SymmetricLayout":
        """Carve ``total_bytes`` (the buffer's num_nvl_bytes, or its RDMA region) for ``num_ranks``
        ranks.

        Default: two staging areas of equal size, one for dispatch and one for combine.
        ``send_area`` (the puts transport) adds a third, where this rank's rows wait to be put.
        ``arena`` (the intranode path): ONE staging area, which the staged dispatch and the combine
        share (each operation starts with a barrier or the notify exchange, so no peer writes an
        operation's rows before this rank's previous kernel ended), and a receive arena for the
        outputs of direct dispatches (``arena_share``)."""
        r = num_ranks
        off = 0
        parts = {}
        for name, size in cls._control_parts(r):
            parts[name] = off
            off += _align(size)
        rest = max(0, total_bytes - off)
        if arena:
            stage_parts, arena_parts = cls.arena_share(r)
            staging = rest * stage_parts // (stage_parts + arena_parts) // _ALIGN * _ALIGN
            parts.update(dispatch_staging=off, combine_staging=off, staging_bytes=staging,
                         arena=off + staging, arena_bytes=(rest - staging) // _ALIGN * _ALIGN)
            return cls(num_ranks=r, total_bytes=total_bytes, **parts)
        areas = 3 if send_area else 2
        staging = rest // areas // _ALIGN * _ALIGN
        parts.update(dispatch_staging=off, combine_staging=off + staging, staging_bytes=staging)
        if send_area:
            parts["send_staging"] = off + 2 * staging
        return cls(num_ranks=r, total_bytes=total_bytes, **parts)

    def slot_rows(self, row_bytes: int) -> int:
        """Rows of ``row_bytes`` one source slot holds (0 for a single rank: no slots needed)."""
        if self.num_ranks == 1:
            return 0
        return self.staging_bytes // (self.num_ranks - 1) // row_bytes

    def device_struct(self):
        """The kernel's ``Layout`` struct as a CuPy byte array (14 int64 + 2 int32)."""
        import cupy
        return cupy.asarray(self.struct_bytes())

    def struct_bytes(self) -> np.ndarray:
        """The kernel's ``Layout`` struct as host bytes: the int64 offsets, then the two int32."""
        host = np.zeros(15, dtype=np.int64)
        host[:14] = [self.notify_slots, self.notify_flags, self.barrier_flags, self.dispatch_flags,
                     self.dispatch_ranges, self.combine_flags, self.dispatch_staging, self.combine_staging,
                     self.send_staging, self.direct_info, self.direct_flags, self.combine_info,
                     self.combine_info_flags, self.combine_done]
        host.view(np.int32)[28:30] = [self.notify_ints, self.max_chunks]
        return host.view(np.uint8)


def arena_row_bytes(hidden_bytes: int, scale_bytes: int, num_topk: int) -> int:
    """Arena bytes of one received row: data, scales, int64 top-k ids, float weights, source index."""
    return hidden_bytes + scale_bytes + 12 * num_topk + 4


def size_hint(num_ranks: int, max_tokens_per_rank: int, hidden: int, num_topk: int,
              elem_bytes: int = 2, fp8_scales: bool = True, send_area: bool = False,
              arena: bool = False) -> int:
    """Symmetric bytes (``num_nvl_bytes``) the intranode kernels need for ``max_tokens_per_rank``
    tokens of ``hidden`` channels: control area plus both staging areas (three with
    ``send_area``, the puts transport), each with ``num_ranks - 1`` slots of
    ``max_tokens_per_rank`` rows of the largest row format. ``arena`` (the intranode path's
    layout): one shared staging area plus a receive arena that holds two receives of
    ``num_ranks * max_tokens_per_rank`` rows (one kept by the caller, e.g. for combine, and the next)."""
    scale_bytes = hidden // 128 * 4 if fp8_scales else 0
    row = max(dispatch_row_bytes(hidden * elem_bytes, 0, num_topk),
              dispatch_row_bytes(hidden, scale_bytes, num_topk),
              combine_row_bytes(hidden * elem_bytes, num_topk))
    stage_need = (num_ranks - 1) * max_tokens_per_rank * row
    if arena:
        receive = max(arena_row_bytes(hidden * elem_bytes, 0, num_topk), arena_row_bytes(hidden, scale_bytes, num_topk))
        # + 64 rows a rank: a non-cached dispatch takes its blocks for the most rows it may receive
        # (a staging slot per peer, a little over max_tokens_per_rank) while the last one is kept
        arena_need = 2 * (num_ranks * max_tokens_per_rank * receive + 5 * _ALIGN) + num_ranks * 64 * receive
        return SymmetricLayout.bytes_for(num_ranks, stage_need, arena_need, arena=True)
    if num_ranks == 1:
        return _align(SymmetricLayout.control_bytes(1)) + _ALIGN
    return SymmetricLayout.bytes_for(num_ranks, stage_need, send_area=send_area)


@dataclasses.dataclass(frozen=True, eq=False)
class IntranodeHandle:
    """Routing of one GPU dispatch; drives cached dispatches and combine.

    Fields (CuPy arrays on the buffer's GPU unless noted):
        is_token_in_rank: bool [T, R]. send_pos: int32 [T, R], row of each token in each
        destination's block (-1 where not sent). recv_info: int32 [2R+1+L]: receive offsets per
        source (R+1), source token counts (R), aligned per-expert counts (L).
        recv_src_idx: int32 [rows], source token index of each received row (-1 padding).
        num_tokens: T (host int). num_rows: received rows, or num_worst_tokens when padded (host).
        num_recv_tokens: real received rows (host int; -1 when unknown: num_worst_tokens mode).
        num_worst_tokens, num_experts, hidden: of the dispatch (host ints).
    """

    is_token_in_rank: object
    send_pos: object
    recv_info: object
    recv_src_idx: object
    num_tokens: int
    num_rows: int
    num_recv_tokens: int
    num_worst_tokens: int
    num_experts: int
    hidden: int

    @property
    def recv_offsets(self):
        """int32 [R+1] view: first received row of each source rank, then the total."""
        r = self.send_pos.shape[1]
        return self.recv_info[:r + 1]

    def data_plan(self) -> DataPlan:
        """The routing a cached dispatch with this handle runs its data kernel with."""
        return DataPlan(self.is_token_in_rank, self.send_pos, self.recv_info, self.num_rows, self.num_experts,
                        self.num_worst_tokens, self.recv_src_idx)

    def device_arrays(self) -> tuple:
        """The GPU arrays kernels read through this handle: an asynchronous operation keeps them
        alive until its event completes, even if the caller drops the handle first."""
        return tuple(a for a in (self.is_token_in_rank, self.send_pos, self.recv_info, self.recv_src_idx)
                     if a is not None)


def intranode_spec(num_ranks: int, puts: bool = False) -> jit.KernelSpec:
    """The JIT instance of cuda_src/intranode.cu for a team of ``num_ranks`` ranks; ``puts`` selects
    the NVSHMEM-put transport (the RDMA stage of the internode path) instead of NVLink stores,
    which alone has the direct (one-copy) dispatch."""
    direct = [] if puts else ["intranode_dispatch_direct", "intranode_dispatch_direct_tma",
                              "intranode_dispatch_direct_r8", "intranode_dispatch_direct_fused",
                              "intranode_dispatch_direct_r8_fused"]
    return jit.KernelSpec.make(
        "intranode.cu", ["intranode_bump_seq", "intranode_notify", "intranode_dispatch"] + direct +
        ["intranode_combine_bf16", "intranode_combine_f32"],
        {"DEEPEP_NUM_RANKS": num_ranks, "DEEPEP_INTRANODE_PUTS": int(puts)}, uses_nvshmem=puts)


# DirectDispatchParams (cuda_src/intranode_direct.cuh): every field 8 bytes, in this order
DIRECT_PARAMS = ParamStruct("DirectDispatchParams", (
    "x", "x_scales", "topk_idx", "topk_weights", "send_pos", "recv_info", "recv_x", "recv_x_scales",
    "recv_topk_idx", "recv_topk_weights", "recv_src_idx", "peer_bases", "layout", "seq", "err", "timeout_ns",
    "num_tokens", "hidden_bytes", "scale_bytes", "num_topk", "with_topk", "with_weights", "num_local_experts",
    "num_worst_tokens", "rank", "slot_rows", "row_bytes", "direct", "tma_producers", "tma_stages",
    "chunk_counters", "tma_split", "is_token_in_rank", "num_tokens_per_rank", "num_tokens_per_expert", "host_info",
    "expert_alignment"))
DIRECT_PARAM_FIELDS = DIRECT_PARAMS.fields

# The team fields every struct below ends with (IntranodeKernels._team_fields fills them)
_TEAM_FIELDS = ("peer_bases", "team_pes", "layout", "seq", "err", "timeout_ns")
# cuda_src/intranode_params.cuh, same orders
NOTIFY_PARAMS = ParamStruct("NotifyParams", (
    "is_token_in_rank", "num_tokens_per_rank", "num_tokens_per_expert", "send_pos", "recv_info", "host_info")
    + _TEAM_FIELDS + ("num_tokens", "num_local_experts", "expert_alignment", "rank"))
STAGED_DISPATCH_PARAMS = ParamStruct("StagedDispatchParams", (
    "x", "x_scales", "topk_idx", "topk_weights", "send_pos", "recv_info", "recv_x", "recv_x_scales",
    "recv_topk_idx", "recv_topk_weights", "recv_src_idx", "src_tags") + _TEAM_FIELDS + (
    "num_tokens", "hidden_bytes", "scale_bytes", "num_topk", "with_topk", "with_weights", "num_local_experts",
    "row_bytes", "slot_rows", "num_worst_tokens", "barrier_first", "rank"))
COMBINE_PARAMS = ParamStruct("CombineParams", (
    "x", "topk_weights", "bias0", "bias1", "send_pos", "recv_offsets", "combined_x", "combined_weights")
    + _TEAM_FIELDS + ("num_tokens", "hidden", "num_topk", "with_weights", "row_bytes", "slot_rows", "pull", "rank"))


class IntranodeKernels:
    """The dispatch/combine module for one team of ranks, bound to one region of a buffer's
    symmetric memory.

    By default the team is every rank of the buffer and the region its ``num_nvl_bytes``: the
    intranode path. The internode path (deepep_cupy/internode.py) builds two more: the ranks of this
    node over the NVLink region, and the ranks with this local index on every node over the RDMA
    region with ``puts=True``.

    Arguments:
        backend: the ``GpuBackend``. jit_options: how the kernels are compiled.
        team: global ranks of the team, in team order (default: all); this rank must be one.
        region: (byte offset, bytes) of the region in the symmetric buffer (default: the NVLink region).
        puts: reach team members through NVSHMEM puts (which need no NVLink mapping).
        label: names the team in error messages.
        arena: lay the region out with a receive arena for one-copy dispatches (default: the
            intranode path, i.e. no team, no region, no puts).
    """

    def __init__(self, backend, jit_options: Optional[jit.JitOptions] = None, team=None, region=None,
                 puts: bool = False, label: str = "", arena: Optional[bool] = None):
        import cupy

        self.backend = backend
        self.team = list(range(backend.num_ranks)) if team is None else [int(r) for r in team]
        self.num_ranks = len(self.team)
        self.rank = self.team.index(backend.rank)
        self.puts = bool(puts)
        rt = backend.runtime
        offset, nbytes = (0, int(backend.num_nvl_bytes)) if region is None else (int(region[0]), int(region[1]))
        if backend.symmetric is None or nbytes <= 0:
            what = "num_rdma_bytes" if puts else "num_nvl_bytes"
            raise DeepEPInvalid(f"{what}: the high-throughput kernels need symmetric memory; "
                                f"at least {size_hint(self.num_ranks, 1, 128, 1)} bytes")
        if arena is None:
            arena = team is None and region is None and not puts
        self.layout = SymmetricLayout.build(self.num_ranks, nbytes, send_area=self.puts, arena=bool(arena))
        if self.puts:   # puts name the PE and take this rank's own symmetric address
            own = int(backend.symmetric.data.ptr) + offset
            bases = [own] * self.num_ranks
        else:
            bases = [rt.peer_ptr(backend.symmetric, pe) for pe in self.team]
            missing = [pe for pe, b in zip(self.team, bases) if b == 0]
            if missing:
                raise DeepEPError(f"rank {backend.rank}: ranks {missing} are not reachable over NVLink "
                                  "(nvshmem_ptr is NULL); the intranode kernels need every rank of the "
                                  "team in one NVLink domain")
            bases = [b + offset for b in bases]
        self.peer_bases = cupy.asarray(np.array(bases, dtype=np.uint64))
        self.arena = None
        self.last_dispatch_direct = False    # whether the last dispatch wrote its outputs in place (tests)
        self._copy_plans = {}                # (hidden bytes, settings.intranode_copy) -> CopyPlan
        self.last_combine_pull = False       # whether peers read the last combine's x in place (tests)
        # whether the last fresh dispatch queued its data kernel before the host's poll (benchmarks,
        # tests): False when it took notify, poll, allocate, launch (num_worst_tokens, staged, arena full)
        self.last_dispatch_ahead = False
        self.last_dispatch_fused = False     # whether it exchanged its counts in the data kernel (tests)
        # arena blocks a fresh dispatch's kernel may still write when its host side failed (never reused)
        self._parked_blocks: list = []
        if self.layout.arena_bytes > 0:
            own = int(backend.symmetric.data.ptr) + offset
            self.arena = ReceiveArena(own + self.layout.arena, self.layout.arena_bytes, backend.device_id)
        self.team_pes = cupy.asarray(np.array(self.team, dtype=np.int32))
        self.layout_struct = self.layout.device_struct()
        self.seq = cupy.zeros(1, dtype=np.uint64)
        # the TMA send path's arrivals at chunks that several blocks write (tagged with seq: never reset)
        self.chunk_counters = cupy.zeros(MAX_CHUNKS, dtype=np.uint64)
        self.module = jit.load(intranode_spec(self.num_ranks, self.puts), jit_options)
        if self.puts:
            rt.register_module(self.module)
        # pinned host records: notify results (polled) and the error record (read without sync)
        # int32 words: offsets, source counts, per-expert counts (up to MAX_LOCAL_EXPERTS), then an
        # int64 seq at a fixed even index (_seq_word_index)
        self._info_words = (2 * self.num_ranks + 1 + MAX_LOCAL_EXPERTS + 4 + 1) // 2 * 2
        self._info_pinned = cupy.cuda.alloc_pinned_memory(self._info_words * 4)
        self.host_info = np.frombuffer(self._info_pinned, dtype=np.int32, count=self._info_words)
        self.host_info[:] = 0
        self.errors = PinnedErrorRecord(team=None if team is None else self.team, label=label)
        cupy.cuda.Device().synchronize()

    # ------------------------------------------------------------------------------------------
    def check_errors(self, what: str) -> None:
        """Raise if an earlier kernel of this buffer recorded a timeout (reads pinned memory)."""
        self.errors.check(what)

    def _seq_word_index(self) -> int:
        """int64 index of the seq in host_info: after the largest receive layout, so its position
        does not move with num_experts (a moving seq word could read a stale count as the new seq)."""
        num_info = 2 * self.num_ranks + 1 + MAX_LOCAL_EXPERTS
        return ((num_info + 1) & ~1) // 2

    def _team_fields(self) -> dict:
        """The fields every parameter struct of this module takes: the team, its layout, the
        operation's seq, the error record, the timeout and this rank."""
        return dict(peer_bases=self.peer_bases, team_pes=self.team_pes, layout=self.layout_struct, seq=self.seq,
                    err=self.errors.ptr, timeout_ns=settings.timeout_ns, rank=self.rank)

    # ------------------------------------------------------------------------------------------
    def notify(self, is_token_in_rank, num_tokens_per_rank, num_tokens_per_expert, num_experts: int,
               expert_alignment: int, wait: bool, stream):
        """bump_seq + notify on ``stream``. Returns (send_pos, recv_info, host view or None)."""
        send_pos, recv_info, poll = self._launch_notify(is_token_in_rank, num_tokens_per_rank, num_tokens_per_expert,
                                                        num_experts, expert_alignment, wait, stream)
        return send_pos, recv_info, (poll() if wait else None)

    def _launch_notify(self, is_token_in_rank, num_tokens_per_rank, num_tokens_per_expert, num_experts: int,
                       expert_alignment: int, host_record: bool, stream):
        """bump_seq + notify on ``stream``: (send_pos, recv_info, poll), where ``poll()`` waits for
        the pinned record (``host_record``) and returns the host copy of the receive layout."""
        num_tokens = is_token_in_rank.shape[0]
        num_local = num_experts // self.num_ranks
        send_pos, recv_info = self._routing_arrays(num_tokens, num_local)
        poll = self._host_record_poll(num_local)
        params = NOTIFY_PARAMS.pack(
            is_token_in_rank=is_token_in_rank, num_tokens_per_rank=num_tokens_per_rank,
            num_tokens_per_expert=num_tokens_per_expert, send_pos=send_pos, recv_info=recv_info,
            # no host record unless the host waits for it: a late write from an unwaited notify
            # must never wake the poll of a later one
            host_info=self._info_pinned.ptr if host_record else 0,
            num_tokens=num_tokens, num_local_experts=num_local, expert_alignment=expert_alignment,
            **self._team_fields())
        with stream:
            self.module["intranode_bump_seq"]((1,), (1,), (self.seq,))
            self.module["intranode_notify"]((self.num_ranks,), (NOTIFY_THREADS,), (params,))
        return send_pos, recv_info, poll

    def _routing_arrays(self, num_tokens: int, num_local: int) -> tuple:
        """A fresh dispatch's send positions int32 [T, R] and receive info int32 [2R+1+L] (the handle
        keeps both), for notify or the fused data kernel to fill."""
        import cupy
        return (cupy.empty((num_tokens, self.num_ranks), dtype=cupy.int32),
                cupy.empty(2 * self.num_ranks + 1 + num_local, dtype=cupy.int32))

    @staticmethod
    def _ordinary_outputs(specs) -> list:
        """Outputs of ``specs`` (``_direct_specs``) in ordinary device memory (None where absent)."""
        import cupy
        return [None if spec is None else cupy.empty(spec[0], spec[1]) for spec in specs]

    def _host_record_poll(self, num_local: int):
        """A ``poll()`` that waits until a kernel queued after this call writes the pinned receive
        layout (notify's, or a fused dispatch's: the seq word moves last) and returns its host copy
        (``2 R + 1 + num_local`` int32). Call before queuing that kernel: it notes the seq word now."""
        seq_view = self.host_info.view(np.int64)
        seq_index = self._seq_word_index()
        before = int(seq_view[seq_index])

        def poll():
            deadline = time.monotonic() + settings.timeout_seconds + 5.0
            spins = 0
            while int(seq_view[seq_index]) == before:
                spins += 1
                if spins % 4096 == 0:
                    self.check_errors("dispatch (notify)")
                    if time.monotonic() > deadline:
                        raise DeepEPTimeout(f"rank {self.backend.rank}: dispatch notify did not finish within "
                                            f"{settings.timeout_seconds} s (a peer never called dispatch?)")
                    if spins > (1 << 20):
                        time.sleep(50e-6)
            self.check_errors("dispatch (notify)")
            return self.host_info[:2 * self.num_ranks + 1 + num_local].copy()

        return poll

    def dispatch(self, payload: DispatchPayload, plan: DataPlan, num_sms: int, stream,
                 src_tags=None) -> DispatchOutputs:
        """The data kernel on ``stream``; allocates and returns the outputs (raw-storage CuPy arrays,
        fp8 as uint8). ``src_tags`` (int32 [T], optional): what each row's receiver records as its
        source index instead of the token index (the internode path tags rows with their origin)."""
        import cupy
        x, x_scales, topk_idx, topk_weights = payload
        num_rows, num_experts, num_worst_tokens, cached_src_idx = (plan.num_rows, plan.num_experts,
                                                                   plan.num_worst_tokens, plan.cached_src_idx)
        num_tokens, hidden = x.shape
        hidden_bytes = hidden * x.itemsize
        scale_bytes = 0 if x_scales is None else x_scales.shape[1] * 4
        num_topk = 0 if topk_idx is None else topk_idx.shape[1]
        row_bytes, slot_rows = self.check_dispatch_capacity(x, x_scales, topk_idx)
        if self._direct_enabled(src_tags):
            return self._dispatch_direct(payload, plan, num_sms, stream, row_bytes, slot_rows)
        self.last_dispatch_direct = False
        # outputs on the current stream (the caller's, or the communication stream with
        # allocate_on_comm_stream: CommStreamScope decides)
        recv_x = cupy.empty((num_rows, hidden), dtype=x.dtype)
        recv_scales = None if x_scales is None else cupy.empty((num_rows, x_scales.shape[1]), cupy.float32)
        recv_idx = None if topk_idx is None else cupy.empty((num_rows, num_topk), cupy.int64)
        recv_w = None if topk_weights is None else cupy.empty((num_rows, num_topk), cupy.float32)
        recv_src = cached_src_idx if cached_src_idx is not None else cupy.empty(num_rows, cupy.int32)
        params = STAGED_DISPATCH_PARAMS.pack(
            x=x, x_scales=x_scales, topk_idx=topk_idx, topk_weights=topk_weights, send_pos=plan.send_pos,
            recv_info=plan.recv_info, recv_x=recv_x, recv_x_scales=recv_scales, recv_topk_idx=recv_idx,
            recv_topk_weights=recv_w, recv_src_idx=recv_src, src_tags=src_tags, num_tokens=num_tokens,
            hidden_bytes=hidden_bytes, scale_bytes=scale_bytes, num_topk=num_topk, with_topk=topk_idx is not None,
            with_weights=topk_weights is not None, num_local_experts=num_experts // self.num_ranks,
            row_bytes=row_bytes, slot_rows=slot_rows, num_worst_tokens=num_worst_tokens,
            barrier_first=cached_src_idx is not None, **self._team_fields())
        with stream:
            if cached_src_idx is not None:
                self.module["intranode_bump_seq"]((1,), (1,), (self.seq,))
            self.module["intranode_dispatch"]((num_sms,), (DATA_THREADS,), (params,))
        return DispatchOutputs(recv_x, recv_scales, recv_idx, recv_w, recv_src)

    def _direct_enabled(self, src_tags) -> bool:
        """Whether dispatches take intranode_dispatch_direct (``settings.intranode_dispatch``): only
        with a receive arena and without source tags (the internode stages keep the staged kernel)."""
        if settings.intranode_dispatch not in ("direct", "staged"):
            raise DeepEPInvalid(f"settings.intranode_dispatch: expected 'direct' or 'staged', got "
                                f"{settings.intranode_dispatch!r}")
        return self.arena is not None and src_tags is None and settings.intranode_dispatch == "direct"

    def _direct_specs(self, payload: DispatchPayload, num_rows: int, cached: bool) -> list:
        """(shape, dtype) of each output of a dispatch, or None where it has none."""
        import cupy
        x, x_scales, topk_idx, topk_weights = payload
        num_topk = 0 if topk_idx is None else topk_idx.shape[1]
        return [((num_rows, x.shape[1]), x.dtype),
                None if x_scales is None else ((num_rows, x_scales.shape[1]), cupy.float32),
                None if topk_idx is None else ((num_rows, num_topk), cupy.int64),
                None if topk_weights is None else ((num_rows, num_topk), cupy.float32),
                None if cached else ((num_rows,), cupy.int32)]

    def _copy_plan(self, hidden_bytes: int) -> CopyPlan:
        """The direct dispatch's CopyPlan for rows of ``hidden_bytes`` under
        ``settings.intranode_copy``: the register kernel (16 or 8 loads a lane in flight), or the TMA
        kernel with its producers, stages and split, or the register kernel where TMA rows do not
        fit. Worked out once per row size and setting (it reads kernel and device attributes)."""
        key = (hidden_bytes, settings.intranode_copy)
        plan = self._copy_plans.get(key)
        if plan is not None:
            return plan
        if settings.intranode_copy not in COPY_PATHS:
            raise DeepEPInvalid(f"settings.intranode_copy: expected one of {', '.join(map(repr, COPY_PATHS))}, got "
                                f"{settings.intranode_copy!r}")
        # the TMA path and the register path with 8 loads in flight are entry points of their own
        # (each its own register allocation)
        plan = CopyPlan("intranode_dispatch_direct_r8" if settings.intranode_copy == "registers8"
                        else "intranode_dispatch_direct")
        if settings.intranode_copy.startswith("tma"):
            producers, stages = tma_plan(hidden_bytes, self._tma_smem_limit())
            # the kernel's roles: producers divide a chunk's 32 tokens; rings of 2 .. 16 rows
            assert producers == 0 or (CHUNK_TOKENS % producers == 0 and 2 <= stages <= TMA_MAX_STAGES), \
                (producers, stages)
            if producers > 0:
                plan = CopyPlan("intranode_dispatch_direct_tma", producers, stages, producers * stages * hidden_bytes,
                                int(settings.intranode_copy == "tma-grid"))
                self._allow_dynamic_smem(plan.smem)
        self._copy_plans[key] = plan
        return plan

    def _tma_smem_limit(self) -> int:
        """Dynamic shared memory a block of intranode_dispatch_direct_tma may take on this device."""
        import cupy
        return (cupy.cuda.Device().attributes["MaxSharedMemoryPerBlockOptin"]
                - self.module["intranode_dispatch_direct_tma"].shared_size_bytes)

    def _allow_dynamic_smem(self, nbytes: int) -> None:
        """Raise intranode_dispatch_direct_tma's dynamic shared memory limit to ``nbytes`` if below."""
        fn = self.module["intranode_dispatch_direct_tma"]
        if nbytes > fn.max_dynamic_shared_size_bytes:
            fn.max_dynamic_shared_size_bytes = nbytes

    def _launch_direct(self, payload: DispatchPayload, plan: DataPlan, outputs, direct: bool, num_sms: int, stream,
                       row_bytes: int, slot_rows: int, bump_seq: bool, copy: Optional[CopyPlan] = None,
                       fused: Optional[DispatchRouting] = None, host_record: bool = False) -> None:
        """Launch intranode_dispatch_direct writing ``outputs`` (recv_x, scales, ids, weights, source
        index, as arrays or device addresses; None where absent); ``direct``: they are in the arena
        (senders write them in place). ``plan`` gives send_pos, recv_info, the expert count and
        num_worst_tokens. ``fused``: the routing of a fresh dispatch whose kernel exchanges the
        counts itself and writes ``plan``'s send_pos and recv_info (and, ``host_record``, the pinned
        receive layout the host polls); ``copy`` must then be a register path."""
        x, x_scales, topk_idx, topk_weights = payload
        recv_x, recv_scales, recv_idx, recv_w, recv_src = outputs
        hidden_bytes = x.shape[1] * x.itemsize
        copy = copy or self._copy_plan(hidden_bytes)
        assert fused is None or copy.producers == 0, "the fused count exchange is the register path's"
        # outputs may be raw addresses (ints) or None: the packer takes both
        params = DIRECT_PARAMS.pack(
            x=x, x_scales=x_scales, topk_idx=topk_idx, topk_weights=topk_weights, send_pos=plan.send_pos,
            recv_info=plan.recv_info, recv_x=recv_x, recv_x_scales=recv_scales, recv_topk_idx=recv_idx,
            recv_topk_weights=recv_w, recv_src_idx=recv_src, peer_bases=self.peer_bases, layout=self.layout_struct,
            seq=self.seq, err=self.errors.ptr, timeout_ns=settings.timeout_ns,
            num_tokens=x.shape[0], hidden_bytes=hidden_bytes,
            scale_bytes=0 if x_scales is None else x_scales.shape[1] * 4,
            num_topk=0 if topk_idx is None else topk_idx.shape[1],
            with_topk=topk_idx is not None, with_weights=topk_weights is not None,
            num_local_experts=plan.num_experts // self.num_ranks, num_worst_tokens=plan.num_worst_tokens,
            rank=self.rank, slot_rows=slot_rows, row_bytes=row_bytes, direct=direct, tma_producers=copy.producers,
            tma_stages=copy.stages, chunk_counters=self.chunk_counters, tma_split=copy.split,
            is_token_in_rank=None if fused is None else fused.is_token_in_rank,
            num_tokens_per_rank=None if fused is None else fused.num_tokens_per_rank,
            num_tokens_per_expert=None if fused is None else fused.num_tokens_per_expert,
            host_info=self._info_pinned.ptr if host_record else 0,
            expert_alignment=1 if fused is None else fused.expert_alignment)
        self.last_dispatch_direct = direct
        with stream:
            if bump_seq:
                self.module["intranode_bump_seq"]((1,), (1,), (self.seq,))
            self.module[copy.kernel]((num_sms,), (DATA_THREADS,), (params,), shared_mem=copy.smem)

    def _dispatch_direct(self, payload: DispatchPayload, plan: DataPlan, num_sms: int, stream, row_bytes: int,
                         slot_rows: int) -> DispatchOutputs:
        """``dispatch`` through intranode_dispatch_direct: outputs from the receive arena when they
        fit (senders then write them in place), else ordinary memory reached through staging."""
        import cupy
        cached = plan.cached_src_idx is not None
        specs = self._direct_specs(payload, plan.num_rows, cached)
        outputs = self.arena.arrays(specs)
        direct = outputs is not None
        if not direct:
            outputs = [None if spec is None else cupy.empty(spec[0], spec[1]) for spec in specs]
        self._launch_direct(payload, plan, outputs, direct, num_sms, stream, row_bytes, slot_rows, bump_seq=cached)
        recv_x, recv_scales, recv_idx, recv_w, recv_src = outputs
        return DispatchOutputs(recv_x, recv_scales, recv_idx, recv_w, plan.cached_src_idx if cached else recv_src)

    def _fused_notify(self, hidden_bytes: int) -> Optional[CopyPlan]:
        """The copy plan when fresh dispatches exchange their counts inside the data kernel
        (``settings.intranode_notify == "fused"`` and a register copy path), else None. Every rank
        decides alike (settings are the same everywhere), so a team never mixes the two exchanges."""
        if settings.intranode_notify not in NOTIFY_MODES:
            raise DeepEPInvalid(f"settings.intranode_notify: expected one of {', '.join(map(repr, NOTIFY_MODES))}, "
                                f"got {settings.intranode_notify!r}")
        if settings.intranode_notify != "fused":
            return None
        copy = self._copy_plan(hidden_bytes)
        return copy._replace(kernel=copy.kernel + "_fused") if copy.producers == 0 else None

    def _notify_and_dispatch_ahead(self, payload: DispatchPayload, routing: DispatchRouting, num_sms: int, stream,
                                   on_queued=None) -> Optional[FreshDispatch]:
        """A fresh direct dispatch whose data kernel is queued before the host knows the receive
        count, so the GPU never waits for the host's poll and allocation.

        The outputs are arena blocks sized for the most rows this rank can receive (its own tokens
        plus a full staging slot, the most any peer may send, from each peer); once the poll
        gives the count, the arrays take their real shape and the unused tails go back to the
        arena (no later kernel can run before this one ends: one stream). With the fused count
        exchange (``_fused_notify``) one kernel does notify's work too; without it, notify runs
        first. ``on_queued()`` runs once the kernels are queued, before the host waits (the caller
        closes its stream bookkeeping there, so that nothing but the poll and the arrays' views
        follows the wait). Returns None, having launched nothing, when the arena cannot hold that
        many rows (notify then runs alone first); with the fused exchange, which every rank must
        take alike, the outputs then come from ordinary memory instead (staged receive)."""
        x = payload.x
        row_bytes, slot_rows = self.check_dispatch_capacity(x, payload.x_scales, payload.topk_idx)
        capacity = max(1, int(x.shape[0]) + (self.num_ranks - 1) * slot_rows)
        specs = self._direct_specs(payload, capacity, cached=False)
        fused_plan = self._fused_notify(int(x.shape[1]) * x.itemsize)
        fused = fused_plan is not None
        blocks = self.arena.take(specs)
        if blocks is None and not fused:
            return None
        if blocks is None:   # outputs the senders cannot reach: they come through staging (mode 2)
            outputs = self._ordinary_outputs(specs)
        else:                # the kernel needs only the blocks' addresses: the arrays are made once the count is known
            outputs = [None if b is None else b.ptr for b in blocks]
        if fused:            # the data kernel fills send_pos, recv_info and the host record itself
            num_local = routing.num_experts // self.num_ranks
            send_pos, recv_info = self._routing_arrays(int(x.shape[0]), num_local)
            poll = self._host_record_poll(num_local)
        else:                # notify (with bump_seq) fills them first
            send_pos, recv_info, poll = self._launch_notify(routing.is_token_in_rank, routing.num_tokens_per_rank,
                                                            routing.num_tokens_per_expert, routing.num_experts,
                                                            routing.expert_alignment, True, stream)
        plan = DataPlan(routing.is_token_in_rank, send_pos, recv_info, capacity, routing.num_experts)
        self._launch_direct(payload, plan, outputs, blocks is not None, num_sms, stream, row_bytes, slot_rows,
                            bump_seq=fused, copy=fused_plan, fused=routing if fused else None, host_record=fused)
        self.last_dispatch_fused = fused
        try:
            if on_queued is not None:
                on_queued()
            info = poll()
            # the host waited: from here on every microsecond may delay the GPU, so only views
            r = self.num_ranks
            num_rows = int(info[r])
            if num_rows > capacity:   # the kernel would have overrun its blocks: never view past them
                raise DeepEPError(f"rank {self.backend.rank}: dispatch received {num_rows} rows, more than the "
                                  f"{capacity} its arena blocks hold (a deepep_cupy bug)")
            if blocks is None:
                recv_x, recv_scales, recv_idx, recv_w, recv_src = [None if a is None else a[:num_rows] for a in outputs]
            else:
                # each block keeps its first num_rows rows (it was taken for capacity rows); the tails go back
                shapes = [None if spec is None else ((num_rows,) + tuple(spec[0][1:]), spec[1]) for spec in specs]
                self.arena.shrink_all([(b, spec_nbytes(*shape)) for b, shape in zip(blocks, shapes) if b is not None])
                recv_x, recv_scales, recv_idx, recv_w, recv_src = [
                    None if b is None else self.arena.view(b, *shape) for b, shape in zip(blocks, shapes)]
        except BaseException:
            # the queued kernel may still write these blocks (a timeout, an interrupt): never hand
            # them out again; the buffer is out of step after this anyway
            if blocks is not None:
                self._parked_blocks.extend(b for b in blocks if b is not None)
            raise
        handle = IntranodeHandle(routing.is_token_in_rank, send_pos, recv_info, recv_src, int(x.shape[0]), num_rows,
                                 num_rows, 0, routing.num_experts, int(x.shape[1]))
        return FreshDispatch(recv_x, recv_scales, recv_idx, recv_w, info[2 * r + 1:].tolist(), handle)

    def notify_and_dispatch(self, payload: DispatchPayload, routing: DispatchRouting, num_worst_tokens: int,
                            num_sms: int, stream, src_tags=None, on_queued=None) -> FreshDispatch:
        """A fresh dispatch on ``stream``: notify (the host waits for the receive count unless
        ``num_worst_tokens``), then the data kernel; ``src_tags`` as in ``dispatch``.
        A direct dispatch queues its data kernel before the host waits (``_notify_and_dispatch_ahead``,
        which calls ``on_queued`` then); the other paths never call ``on_queued``."""
        self.last_dispatch_ahead = self.last_dispatch_fused = False
        if num_worst_tokens == 0 and self._direct_enabled(src_tags):
            done = self._notify_and_dispatch_ahead(payload, routing, num_sms, stream, on_queued)
            if done is not None:
                self.last_dispatch_ahead = True
                return done
        is_token_in_rank, num_experts = routing.is_token_in_rank, routing.num_experts
        send_pos, recv_info, info = self.notify(is_token_in_rank, routing.num_tokens_per_rank,
                                                routing.num_tokens_per_expert, num_experts, routing.expert_alignment,
                                                wait=num_worst_tokens == 0, stream=stream)
        r = self.num_ranks
        if info is None:
            num_rows, num_recv, per_expert = num_worst_tokens, -1, []
        else:
            num_rows = num_recv = int(info[r])
            per_expert = info[2 * r + 1:].tolist()
        out = self.dispatch(payload, DataPlan(is_token_in_rank, send_pos, recv_info, num_rows, num_experts,
                                              num_worst_tokens), num_sms, stream, src_tags=src_tags)
        x = payload.x
        handle = IntranodeHandle(is_token_in_rank, send_pos, recv_info, out.recv_src_idx, int(x.shape[0]), num_rows,
                                 num_recv, num_worst_tokens, num_experts, int(x.shape[1]))
        return FreshDispatch(out.recv_x, out.recv_x_scales, out.recv_topk_idx, out.recv_topk_weights, per_expert,
                             handle)

    def cached_dispatch(self, x, x_scales, handle: IntranodeHandle, num_sms: int, stream, src_tags=None) -> tuple:
        """A dispatch of other data with ``handle``'s routing (no notify, no host wait) on ``stream``:
        (recv_x, recv_scales)."""
        out = self.dispatch(DispatchPayload(x, x_scales), handle.data_plan(), num_sms, stream, src_tags=src_tags)
        return out.recv_x, out.recv_x_scales

    def check_dispatch(self, x, x_scales, topk_idx, num_experts: int, handle) -> None:
        """Before any launch: this rank's rows fit the staging (the dispatch interface shared with
        ``InternodeKernels``; the expert count needs no check here)."""
        self.check_dispatch_capacity(x, x_scales, topk_idx if handle is None else None)

    def check_dispatch_capacity(self, x, x_scales, topk_idx) -> tuple:
        """(row_bytes, slot_rows) of a dispatch; raises before anything is launched when this rank's
        tokens do not fit its staging slots."""
        num_tokens, hidden = x.shape
        scale_bytes = 0 if x_scales is None else x_scales.shape[1] * 4
        num_topk = 0 if topk_idx is None else topk_idx.shape[1]
        row_bytes = dispatch_row_bytes(hidden * x.itemsize, scale_bytes, num_topk)
        slot_rows = self.layout.slot_rows(row_bytes)
        self._check_capacity(num_tokens, slot_rows, row_bytes, "dispatch")
        return row_bytes, slot_rows

    def combine(self, x, handle: IntranodeHandle, topk_weights, bias0, bias1, num_sms: int, stream):
        """bump_seq + combine on ``stream``; returns (combined_x, combined_weights or None).

        Pull mode (NVLink stores only): when ``x`` (and ``topk_weights``, if given) lie in this rank's
        receive arena, e.g. a direct dispatch's outputs, peers read the rows in place and this rank
        sends nothing; otherwise it pushes them into the peers' combine staging. Ranks may differ."""
        import cupy
        hidden = x.shape[1]
        num_topk = 0 if topk_weights is None else topk_weights.shape[1]
        row_bytes = combine_row_bytes(hidden * x.itemsize, num_topk)
        slot_rows = self.layout.slot_rows(row_bytes)
        self._check_capacity(handle.num_tokens, slot_rows, row_bytes, "combine")
        pull = (not self.puts and self.arena is not None and self.arena.holds(x)
                and (topk_weights is None or self.arena.holds(topk_weights)))
        self.last_combine_pull = pull
        out = cupy.empty((handle.num_tokens, hidden), dtype=x.dtype)
        out_w = None if topk_weights is None else cupy.empty((handle.num_tokens, num_topk), cupy.float32)
        kernel = "intranode_combine_bf16" if x.itemsize == 2 else "intranode_combine_f32"
        params = COMBINE_PARAMS.pack(
            x=x, topk_weights=topk_weights, bias0=bias0, bias1=bias1, send_pos=handle.send_pos,
            recv_offsets=handle.recv_offsets, combined_x=out, combined_weights=out_w, num_tokens=handle.num_tokens,
            hidden=hidden, num_topk=num_topk, with_weights=topk_weights is not None, row_bytes=row_bytes,
            slot_rows=slot_rows, pull=pull, **self._team_fields())
        with stream:
            self.module["intranode_bump_seq"]((1,), (1,), (self.seq,))
            self.module[kernel]((num_sms,), (DATA_THREADS,), (params,))
        return out, out_w

    def check_rows(self, num_rows: int, row_bytes: int, what: str) -> None:
        """Raise ``DeepEPInvalid`` unless ``num_rows`` rows of ``row_bytes`` fit one staging slot."""
        self._check_capacity(num_rows, self.layout.slot_rows(row_bytes), row_bytes, what)

    def _check_capacity(self, num_tokens: int, slot_rows: int, row_bytes: int, what: str) -> None:
        if self.num_ranks > 1 and num_tokens > slot_rows:
            # as large as this layout kind needs for that staging (an arena layout keeps its arena)
            need = SymmetricLayout.bytes_for(self.num_ranks, (self.num_ranks - 1) * num_tokens * row_bytes,
                                             self.layout.arena_bytes, send_area=self.puts,
                                             arena=self.layout.arena_bytes > 0)
            region, hint = (("num_rdma_bytes", "get_internode_size_hint") if self.puts
                            else ("num_nvl_bytes", "get_intranode_size_hint"))
            raise DeepEPInvalid(f"x: {num_tokens} rows exceed the {slot_rows} rows the buffer's "
                                f"staging holds for this {what} ({row_bytes} bytes a row); allocate "
                                f"{region} >= {need} (Buffer.{hint} gives it)")
        if num_tokens > CHUNK_TOKENS * MAX_CHUNKS:
            raise DeepEPInvalid(f"x: at most {CHUNK_TOKENS * MAX_CHUNKS} tokens per rank, got {num_tokens}")
