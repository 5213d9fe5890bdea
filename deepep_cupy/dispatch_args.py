"""The records a dispatch passes between the GPU backend (gpu_backend.py) and its kernel layers
(intranode.py, internode.py), in place of positional argument lists of a dozen entries and bare
tuples. Named tuples: building one costs well under a microsecond on the hot path, and code that
unpacks them positionally keeps working."""

from typing import NamedTuple

__all__ = ["DispatchPayload", "DispatchRouting", "DataPlan", "DispatchOutputs", "FreshDispatch"]


class DispatchPayload(NamedTuple):
    """What a dispatch moves (CuPy arrays, FP8 as its uint8 storage): the rows ``x`` [T, H], their
    FP8 scales [T, H/128] float32, top-k expert ids int64 [T, K] and weights float32 [T, K]; None
    where absent (a cached dispatch moves rows and scales only)."""

    x: object
    x_scales: object = None
    topk_idx: object = None
    topk_weights: object = None


class DispatchRouting(NamedTuple):
    """Where a fresh dispatch's rows go: ``get_dispatch_layout``'s outputs (bool [T, R], int32 [R],
    int32 [E]), the expert count, and the alignment of the per-expert receive counts."""

    is_token_in_rank: object
    num_tokens_per_rank: object
    num_tokens_per_expert: object
    num_experts: int
    expert_alignment: int = 1


class DataPlan(NamedTuple):
    """A data kernel's routing once notify has run, or a handle's (``IntranodeHandle.data_plan``):
    send positions int32 [T, R], receive info int32 [2R+1+L], the rows to receive (or
    num_worst_tokens), the expert count, num_worst_tokens (0: exact), and for a cached dispatch the
    handle's source index (the outputs keep it instead of writing a new one)."""

    is_token_in_rank: object
    send_pos: object
    recv_info: object
    num_rows: int
    num_experts: int
    num_worst_tokens: int = 0
    cached_src_idx: object = None


class DispatchOutputs(NamedTuple):
    """A data kernel's outputs (None where the dispatch has none)."""

    recv_x: object
    recv_x_scales: object
    recv_topk_idx: object
    recv_topk_weights: object
    recv_src_idx: object


class FreshDispatch(NamedTuple):
    """A fresh dispatch's results: the received rows, scales, top-k ids and weights, the per-expert
    receive counts (a list of ints; empty with num_worst_tokens) and the handle."""

    recv_x: object
    recv_x_scales: object
    recv_topk_idx: object
    recv_topk_weights: object
    num_recv_tokens_per_expert: list
    handle: object
