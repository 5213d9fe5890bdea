"""Launcher of cuda_src/layout.cu: get_dispatch_layout on the GPU.

One launch of ``ceil(T / 256)`` blocks (at least one), one thread per token; the per-expert,
per-rank and per-node counts meet in a small workspace that the last block copies out and zeroes
(see the kernel's header comment). No memset, no host synchronisation: capturable in a CUDA graph.

The kernel also checks every expert id against [-1, num_experts) on the way: a bad id counts
nowhere (as -1) and is written into the error record the caller passes (``error_record_ptr``, a
pinned ``PinnedErrorRecord``), which the host turns into ``DeepEPInvalid`` at its next call.
"""

from __future__ import annotations

from typing import Optional

from . import jit
from .kernel_params import ParamStruct

__all__ = ["LayoutKernel", "MAX_LAYOUT_EXPERTS"]

_THREADS = 256
MAX_LAYOUT_EXPERTS = 8192  # shared memory holds one int32 counter per expert (32 KiB)

# The kernel's one by-value parameter (DispatchLayoutParams, cuda_src/layout_params.cuh, same order)
LAYOUT_PARAMS = ParamStruct("DispatchLayoutParams", (
    "topk_idx", "num_tokens_per_rank", "num_tokens_per_rdma_rank", "num_tokens_per_expert", "is_token_in_rank",
    "workspace", "err", "num_tokens", "num_topk", "num_experts", "rank"))


class LayoutKernel:
    """get_dispatch_layout for a fixed rank count and node size, on the current device.

    Arguments:
        num_ranks: ranks in the buffer. ranks_per_node: ranks per NVLink domain.
        jit_options: how to compile (``jit.JitOptions``).
    """

    def __init__(self, num_ranks: int, ranks_per_node: int, jit_options: Optional[jit.JitOptions] = None):
        self.num_ranks = num_ranks
        self.ranks_per_node = ranks_per_node
        self.num_nodes = num_ranks // ranks_per_node
        self.spec = self.spec_for(num_ranks, ranks_per_node)
        self.module = jit.load(self.spec, jit_options)
        self._kernel = self.module["get_dispatch_layout"]
        self._workspace = None

    @staticmethod
    def spec_for(num_ranks: int, ranks_per_node: int) -> jit.KernelSpec:
        """The JIT instance for a rank count and node size."""
        return jit.KernelSpec.make("layout.cu", ["get_dispatch_layout"],
                                   {"DEEPEP_NUM_RANKS": num_ranks, "DEEPEP_RANKS_PER_NODE": ranks_per_node})

    def _workspace_for(self, num_experts: int, stream):
        import cupy
        need = num_experts + self.num_ranks + self.num_nodes + 1
        if self._workspace is None or self._workspace.size < need:
            with stream:  # zeroed on the launch stream, so the kernel is ordered after it
                self._workspace = cupy.zeros(need, dtype=cupy.int32)  # kernels leave it zeroed
        return self._workspace

    def __call__(self, topk_idx, num_experts: int, stream, error_record_ptr: int = 0, rank: int = -1) -> tuple:
        """Launch on ``stream``. ``topk_idx``: CuPy int64 [T, K], C-contiguous, on this device.
        ``error_record_ptr``: address of a pinned {code, phase, peer, rank} record that receives
        {2, 24, bad id, ``rank``} when an id lies outside [-1, num_experts) (0: no report).

        Returns:
            (num_tokens_per_rank int32[R], num_tokens_per_rdma_rank int32[N] or None when one node,
             num_tokens_per_expert int32[E], is_token_in_rank bool[T, R]) as CuPy arrays.
        """
        import cupy
        num_tokens, num_topk = topk_idx.shape
        per_rank = cupy.empty(self.num_ranks, dtype=cupy.int32)
        per_rdma = cupy.empty(self.num_nodes, dtype=cupy.int32) if self.num_nodes > 1 else None
        per_expert = cupy.empty(num_experts, dtype=cupy.int32)
        in_rank = cupy.empty((num_tokens, self.num_ranks), dtype=cupy.bool_)
        workspace = self._workspace_for(num_experts, stream)
        smem = (num_experts + self.num_ranks + self.num_nodes) * 4
        blocks = max(1, (num_tokens + _THREADS - 1) // _THREADS)
        params = LAYOUT_PARAMS.pack(topk_idx=topk_idx, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma,
                                    num_tokens_per_expert=per_expert, is_token_in_rank=in_rank, workspace=workspace,
                                    err=error_record_ptr, num_tokens=num_tokens, num_topk=num_topk,
                                    num_experts=num_experts, rank=rank)
        with stream:
            self._kernel((blocks,), (_THREADS,), (params,), shared_mem=smem)
        return per_rank, per_rdma, per_expert, in_rank
