"""Hierarchical dispatch and combine across nodes: RDMA between nodes, then NVLink inside each.

Ranks are numbered node-major: rank ``g = m * L + l`` is local rank ``l`` of node ``m`` (``L`` =
``ranks_per_node``, ``N`` nodes). Two teams of ``IntranodeKernels`` (intranode.py) do the moving:

  * the **RDMA team** of a rank: the ranks with its local index on every node (``N`` members), over
    the ``num_rdma_bytes`` region, through NVSHMEM puts;
  * the **NVLink team**: the ranks of its node (``L`` members), over the ``num_nvl_bytes`` region,
    through NVLink stores.

dispatch (docs/internode.md has the diagram):
  1. RDMA stage: a token goes once to every node that holds one of its experts, to the rank with
     the sender's local index there (the "forwarder"), with its top-k ids (made node-relative, -1
     for other nodes' experts), weights and FP8 scales.
  2. NVLink stage: the forwarder routes what it received inside its node by those ids; each row is
     tagged with its origin (global source rank and token index).
  3. Order: the rows arrive grouped by forwarder; a one-block kernel (cuda_src/internode.cu) finds
     every row's place in the API's order (source rank, then token) and the rows are gathered there.
combine runs the stages backwards: rows go back to their place in stage order, the NVLink stage sums
each token's copies of one node at its forwarder, the RDMA stage sums the node sums at the source
(adding the bias there). A token's sum is thus rounded to the output type once per node and once at
the end, as in DeepEP's internode combine.

The host waits twice in a dispatch without ``num_worst_tokens`` (the RDMA stage's row count, then the
final count); with it, never.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from . import jit
from .errors import DeepEPInvalid
from .dispatch_args import DataPlan, DispatchPayload, DispatchRouting, FreshDispatch
from .intranode import (CHUNK_TOKENS, MAX_CHUNKS, MAX_LOCAL_EXPERTS, IntranodeHandle, IntranodeKernels,
                        dispatch_row_bytes)
from .layout import LayoutKernel

__all__ = ["InternodeHandle", "InternodeKernels", "TOKEN_BITS", "internode_spec"]

TOKEN_BITS = 17                       # a row tag: (global source rank << 17) | source token
assert (1 << TOKEN_BITS) >= CHUNK_TOKENS * MAX_CHUNKS
ORDER_THREADS = 1024


def internode_spec() -> jit.KernelSpec:
    """The JIT instance of cuda_src/internode.cu."""
    return jit.KernelSpec.make("internode.cu", ["internode_final_order"])


@dataclasses.dataclass(frozen=True, eq=False)
class InternodeHandle:
    """Routing of one hierarchical dispatch; drives cached dispatches and combine.

    Fields:
        rdma: the RDMA stage's ``IntranodeHandle`` (team: this local index on every node).
        nvl: the NVLink stage's ``IntranodeHandle`` (team: this node); None with one rank per node,
            where the RDMA stage is the whole dispatch (and rdma_tags, dest, perm are None too).
        rdma_tags: int32 [rows of the RDMA stage], the origin tag of each row the RDMA stage received.
        dest: int32 [num_rows], final row of each NVLink-stage row. perm: int32 [num_rows], its inverse.
        recv_src_idx: int32 [num_rows], source token index of each final row (-1 padding).
        topk_synthesized: the dispatch was routed by ``is_token_in_rank`` alone (one expert per rank).
        num_tokens, num_rows, num_recv_tokens, num_worst_tokens, num_experts, hidden: as IntranodeHandle.
    """

    rdma: IntranodeHandle
    nvl: IntranodeHandle
    rdma_tags: object
    dest: object
    perm: object
    recv_src_idx: object
    topk_synthesized: bool
    num_tokens: int
    num_rows: int
    num_recv_tokens: int
    num_worst_tokens: int
    num_experts: int
    hidden: int

    def device_arrays(self) -> tuple:
        """The GPU arrays kernels read through this handle, both stages' included (see
        ``IntranodeHandle.device_arrays``)."""
        own = tuple(a for a in (self.rdma_tags, self.dest, self.perm, self.recv_src_idx) if a is not None)
        return self.rdma.device_arrays() + (() if self.nvl is None else self.nvl.device_arrays()) + own


class InternodeKernels:
    """The hierarchical path of one buffer: its RDMA team, its NVLink team and the order kernel.

    Arguments:
        backend: the ``GpuBackend`` (``ranks_per_node`` < its rank count).
        jit_options: how kernels are compiled.
    """

    def __init__(self, backend, jit_options: Optional[jit.JitOptions] = None):
        self.backend = backend
        self.num_ranks, self.rank = backend.num_ranks, backend.rank
        self.ranks_per_node = backend.ranks_per_node
        self.num_nodes = self.num_ranks // self.ranks_per_node
        self.node, self.local_rank = divmod(self.rank, self.ranks_per_node)
        if backend.num_rdma_bytes <= 0:
            raise DeepEPInvalid(f"num_rdma_bytes: dispatch across {self.num_nodes} nodes needs the RDMA region; "
                                "size it with Buffer.get_internode_size_hint")
        L, N = self.ranks_per_node, self.num_nodes
        self.rdma = IntranodeKernels(backend, jit_options, team=[m * L + self.local_rank for m in range(N)],
                                     region=(backend.num_nvl_bytes, backend.num_rdma_bytes), puts=True,
                                     label="internode RDMA stage")
        # one rank per node: the RDMA stage alone delivers every row, already in the API's order
        self.single = L == 1
        self.nvl = self.nvl_layout = self.order = None
        if not self.single:
            self.nvl = IntranodeKernels(backend, jit_options, team=[self.node * L + l for l in range(L)],
                                        label="internode NVLink stage")
            self.nvl_layout = LayoutKernel(L, L, jit_options)
            self.order = jit.load(internode_spec(), jit_options)["internode_final_order"]

    def check_errors(self, what: str) -> None:
        """Raise if an earlier kernel of either stage recorded a timeout or an overflow."""
        self.rdma.check_errors(what)
        if self.nvl is not None:
            self.nvl.check_errors(what)

    # ------------------------------------------------------------------------------------------
    @staticmethod
    def row_bytes(x, x_scales, num_topk: int) -> int:
        """Bytes of one staged dispatch row of ``x`` (both stages use the same format)."""
        return dispatch_row_bytes(x.shape[1] * x.itemsize, 0 if x_scales is None else x_scales.shape[1] * 4,
                                  num_topk)

    def check_dispatch(self, x, x_scales, topk_idx, num_experts: int, handle) -> None:
        """Everything that can be checked before the first launch of a dispatch (``handle`` given:
        a cached one): the per-node expert count, the RDMA staging capacity, and that the NVLink
        staging holds what the RDMA stage may deliver."""
        if handle is not None:
            self._check_cached_dispatch(x, x_scales, handle)
            return
        num_topk = self.num_ranks if topk_idx is None else topk_idx.shape[1]   # None: one expert per rank
        num_tokens = x.shape[0]
        if num_experts // self.num_nodes > MAX_LOCAL_EXPERTS:
            raise DeepEPInvalid(f"num_tokens_per_expert: at most {MAX_LOCAL_EXPERTS} experts per node on the "
                                f"internode path, got {num_experts // self.num_nodes}")
        if num_topk > 32:
            raise DeepEPInvalid(f"topk_idx: at most 32 top-k columns on the GPU, got {num_topk} "
                                "(routing by is_token_in_rank alone takes one per rank)")
        row = self.row_bytes(x, x_scales, num_topk)
        self.rdma.check_rows(num_tokens, row, "dispatch (RDMA stage)")
        # a forwarder receives up to num_nodes * T rows (with T alike on every rank) and forwards them
        if self.nvl is not None:
            self.nvl.check_rows(self.num_nodes * num_tokens, row, "dispatch (NVLink stage)")

    def notify_and_dispatch(self, payload: DispatchPayload, routing: DispatchRouting, num_worst_tokens: int,
                            num_sms: int, stream, on_queued=None) -> FreshDispatch:
        """A fresh (non-cached) hierarchical dispatch on ``stream``, with the arguments of
        ``IntranodeKernels.notify_and_dispatch``; the caller has run ``check_dispatch``.
        ``on_queued`` is never called here (the stages wait on the host in between).
        ``topk_idx`` None routes by ``is_token_in_rank`` alone (one synthetic expert per rank).
        """
        import cupy
        x, x_scales, topk_idx, topk_weights = payload
        is_token_in_rank, num_tokens_per_rank, num_tokens_per_expert, num_experts, expert_alignment = routing
        N, L = self.num_nodes, self.ranks_per_node
        num_tokens = x.shape[0]
        synthesized = topk_idx is None
        with stream:
            if synthesized:   # one expert per rank: the NVLink stage still needs ids to route by
                topk_idx = cupy.where(is_token_in_rank, cupy.arange(self.num_ranks, dtype=cupy.int64), -1)
                num_experts = self.num_ranks
                num_tokens_per_expert = num_tokens_per_rank
            in_node = cupy.ascontiguousarray(is_token_in_rank.reshape(num_tokens, N, L).any(axis=2))
            num_tokens_per_rdma_rank = in_node.sum(axis=0, dtype=cupy.int32)
        worst = num_worst_tokens > 0
        payload = DispatchPayload(x, x_scales, topk_idx, topk_weights)   # (with the synthesized ids)
        if self.single:
            return self._single_stage_dispatch(
                payload, DispatchRouting(in_node, num_tokens_per_rdma_rank, num_tokens_per_expert, num_experts,
                                         expert_alignment), num_worst_tokens, synthesized, num_sms, stream)

        # Stages 1-3 allocate their intermediates with the communication stream current: a freed block
        # then returns to that stream's pool and is reused only in its order, even with async_finish.
        with stream:
            # 1. RDMA stage: to the forwarder of every node with a target
            send_pos1, recv_info1, info1 = self.rdma.notify(in_node, num_tokens_per_rdma_rank, num_tokens_per_expert,
                                                            num_experts, 1, wait=not worst, stream=stream)
            row = self.row_bytes(x, x_scales, topk_idx.shape[1])
            if info1 is None:   # no host wait: room for the most the RDMA staging can deliver
                rows1 = max(1, self.num_nodes * self.rdma.layout.slot_rows(row))
                if self.ranks_per_node > 1:   # the kernel reports rows beyond it as an overflow
                    rows1 = min(rows1, self.nvl.layout.slot_rows(row))
            else:
                rows1 = int(info1[N])
                self.nvl.check_rows(rows1, row, "dispatch (NVLink stage)")
            out1 = self.rdma.dispatch(payload, DataPlan(in_node, send_pos1, recv_info1, rows1, num_experts,
                                                        rows1 if worst else 0), num_sms, stream)
            recv1_x, recv1_scales, recv1_idx, recv1_w, recv1_src = out1
            handle1 = IntranodeHandle(in_node, send_pos1, recv_info1, recv1_src, num_tokens, rows1,
                                      -1 if info1 is None else int(info1[N]), rows1 if worst else 0, num_experts,
                                      int(x.shape[1]))
            tags1 = self._origin_tags(recv_info1, recv1_src, stream)

            # 2. NVLink stage: route inside the node by the node-relative ids
            experts_per_node = num_experts // N
            per_rank2, _, per_expert2, in_rank2 = self.nvl_layout(recv1_idx, experts_per_node, stream)
            recv2_x, recv2_scales, recv2_idx, recv2_w, per_expert, handle2 = self.nvl.notify_and_dispatch(
                DispatchPayload(recv1_x, recv1_scales, recv1_idx, recv1_w),
                DispatchRouting(in_rank2, per_rank2, per_expert2, experts_per_node, expert_alignment),
                num_worst_tokens, num_sms, stream, src_tags=tags1)

            # 3. the API's order (the NVLink stage recorded each row's tag as its source index)
            dest, perm, src_idx = self._final_order(handle2.recv_src_idx, stream)
        recv_x, recv_scales, recv_idx, recv_w = self._gather((recv2_x, recv2_scales, recv2_idx, recv2_w), perm, stream)
        handle = InternodeHandle(handle1, handle2, tags1, dest, perm, src_idx, synthesized, num_tokens,
                                 handle2.num_rows, handle2.num_recv_tokens, num_worst_tokens, num_experts,
                                 int(x.shape[1]))
        if synthesized:
            recv_idx = recv_w = None
            per_expert = []
        return FreshDispatch(recv_x, recv_scales, recv_idx, recv_w, per_expert, handle)

    def _single_stage_dispatch(self, payload: DispatchPayload, routing: DispatchRouting, num_worst_tokens: int,
                               synthesized: bool, num_sms: int, stream) -> FreshDispatch:
        """One rank per node: the RDMA stage is the whole dispatch (``routing`` by node). Its rows come
        ordered by source node, which is the source rank, and its node-relative expert ids are this
        rank's."""
        recv_x, recv_scales, recv_idx, recv_w, per_expert, h1 = self.rdma.notify_and_dispatch(
            payload, routing, num_worst_tokens, num_sms, stream)
        x = payload.x
        handle = InternodeHandle(h1, None, None, None, None, h1.recv_src_idx, synthesized, int(x.shape[0]),
                                 h1.num_rows, h1.num_recv_tokens, num_worst_tokens, routing.num_experts,
                                 int(x.shape[1]))
        if synthesized:
            recv_idx = recv_w = None
            per_expert = []
        return FreshDispatch(recv_x, recv_scales, recv_idx, recv_w, per_expert, handle)

    def _check_cached_dispatch(self, x, x_scales, handle: InternodeHandle) -> None:
        """Before any launch: ``x`` fits the RDMA staging and the forwarded rows the NVLink staging."""
        row = self.row_bytes(x, x_scales, 0)
        self.rdma.check_rows(x.shape[0], row, "dispatch (RDMA stage)")
        if handle.nvl is not None:
            self.nvl.check_rows(handle.rdma.num_rows, row, "dispatch (NVLink stage)")

    def cached_dispatch(self, x, x_scales, handle: InternodeHandle, num_sms: int, stream) -> tuple:
        """A dispatch of other data with a handle's routing (the caller has run ``check_dispatch``):
        (recv_x, recv_scales)."""
        if handle.nvl is None:   # one rank per node
            return self.rdma.cached_dispatch(x, x_scales, handle.rdma, num_sms, stream)
        with stream:   # intermediates on the communication stream (see dispatch)
            recv1_x, recv1_scales = self.rdma.cached_dispatch(x, x_scales, handle.rdma, num_sms, stream)
            recv2_x, recv2_scales = self.nvl.cached_dispatch(recv1_x, recv1_scales, handle.nvl, num_sms, stream,
                                                             src_tags=handle.rdma_tags)
        return self._gather((recv2_x, recv2_scales), handle.perm, stream)

    def combine(self, x, handle: InternodeHandle, topk_weights, bias0, bias1, num_sms: int, stream) -> tuple:
        """The stages backwards on ``stream``: (combined_x [T, H], combined_weights or None)."""
        import cupy
        if handle.nvl is None:   # one rank per node: the RDMA stage alone
            return self.rdma.combine(x, handle.rdma, topk_weights, bias0, bias1, num_sms, stream)
        with stream:   # intermediates on the communication stream (see dispatch)
            x2 = cupy.take(x, handle.dest, axis=0)   # back to stage order
            w2 = None if topk_weights is None else cupy.take(topk_weights, handle.dest, axis=0)
            node_x, node_w = self.nvl.combine(x2, handle.nvl, w2, None, None, num_sms, stream)
        # the outputs, like the intranode path's, with the caller's stream current
        return self.rdma.combine(node_x, handle.rdma, node_w, bias0, bias1, num_sms, stream)

    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _gather(arrays, perm, stream) -> tuple:
        """``a[perm]`` for each array (None stays None): outputs allocated with the caller's stream
        current, as the intranode path allocates its outputs; the gather runs on ``stream``."""
        import cupy
        outs = tuple(None if a is None else cupy.empty((perm.shape[0],) + a.shape[1:], dtype=a.dtype) for a in arrays)
        with stream:
            for a, out in zip(arrays, outs):
                if a is not None:
                    cupy.take(a, perm, axis=0, out=out)
        return outs

    def _origin_tags(self, recv_info1, recv1_src, stream):
        """Tag of every row the RDMA stage received: (global source rank << TOKEN_BITS) | token."""
        import cupy
        N, L = self.num_nodes, self.ranks_per_node
        with stream:
            rows = cupy.arange(recv1_src.shape[0], dtype=cupy.int32)
            node = cupy.searchsorted(recv_info1[1:N + 1], rows, side="right").astype(cupy.int32)
            src_rank = node * L + self.local_rank
            return cupy.where(recv1_src >= 0, (src_rank << TOKEN_BITS) | recv1_src, -1).astype(cupy.int32)

    def _final_order(self, tags, stream) -> tuple:
        import cupy
        rows = tags.shape[0]
        dest = cupy.empty(rows, dtype=cupy.int32)
        perm = cupy.empty(rows, dtype=cupy.int32)
        src_idx = cupy.empty(rows, dtype=cupy.int32)
        with stream:
            self.order((1,), (ORDER_THREADS,),
                       (tags, cupy.int32(rows), cupy.int32(self.num_ranks), cupy.int32(TOKEN_BITS), dest, perm,
                        src_idx), shared_mem=3 * 4 * self.num_ranks)
        return dest, perm, src_idx
