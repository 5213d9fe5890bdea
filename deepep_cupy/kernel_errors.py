"""The error record kernels write (cuda_src/common/exception.cuh) and its translation to exceptions.

Kernels report two kinds of trouble through the same {code, phase, peer, rank} record: timeouts
(a peer never arrived: ``DeepEPTimeout``) and bad values found on the device (code 2). Bad input
values found by the kernels that read them anyway (phase 24, an expert id outside
[-1, num_experts)) become ``DeepEPInvalid``: the launch that found it treated the entry as -1 and
finished normally, and the next call on the buffer raises before it launches anything.
"""

from __future__ import annotations

from typing import Optional

from .errors import DeepEPError, DeepEPInvalid, DeepEPTimeout

__all__ = ["PHASES", "PHASE_BAD_EXPERT_ID", "ErrorRecordArray", "PinnedErrorRecord", "bad_expert_id_message",
           "raise_if_error", "team_to_global"]

# phase ids written by kernels -> names users read in exceptions
PHASES = {
    1: "selftest ring signal wait",
    2: "selftest peer mapping (nvshmem_ptr returned NULL)",
    10: "dispatch notify (waiting for a peer's counts)",
    11: "dispatch receive (waiting for a peer's chunk)",
    12: "combine barrier (waiting for a peer to start combine)",
    13: "combine receive (waiting for a peer's chunk)",
    14: "cached dispatch barrier (waiting for a peer to start dispatch)",
    15: "dispatch: more rows than num_worst_tokens (rows dropped)",
    16: "direct dispatch setup (waiting for a peer's output addresses, and in a fresh dispatch its counts)",
    17: "combine completion (waiting for a peer to finish reading this rank's rows)",
    18: "direct dispatch send (a role of the TMA send path waiting for another warp of its block)",
    20: "low-latency dispatch receive (waiting for a peer's tokens)",
    21: "low-latency combine receive (waiting for a peer's expert outputs)",
    22: "low-latency dispatch: an expert chosen more than num_max_dispatch_tokens_per_rank times",
    23: "low-latency send (waiting for a peer to receive the operation that last used this buffer half)",
    24: "topk_idx: expert id outside [-1, num_experts)",
}

# phases whose `peer` field holds a value (an expert id), not a rank
_VALUE_PHASES = (22, 24)
PHASE_BAD_EXPERT_ID = 24
_INT32_MIN, _INT32_MAX = -(1 << 31), (1 << 31) - 1

_CODES = {1: "timed out", 2: "bad value"}


class ErrorRecordArray:
    """A zeroed int32[4] device array {code, phase, peer, rank} that kernels report into."""

    def __init__(self):
        import cupy
        self.array = cupy.zeros(4, dtype=cupy.int32)

    @property
    def ptr(self) -> int:
        """Device address to pass to kernels."""
        return int(self.array.data.ptr)

    def reset(self, stream=None) -> None:
        """Zero it (on ``stream`` when given)."""
        import cupy
        with (stream or cupy.cuda.get_current_stream()):
            self.array.fill(0)

    def check(self, what: str) -> None:
        """Read the record (synchronises with the device) and raise if a kernel reported an error."""
        raise_if_error(self.array.get().tolist(), what)


class PinnedErrorRecord:
    """The same {code, phase, peer, rank} record in pinned host memory: kernels write it through
    UVA, and the host reads it without synchronising (at the next call, or while it polls).

    ``team``: for kernels that run over a subset of the ranks (the stages of the internode path),
    the global rank of each team index, so the exception names global ranks; ``label`` is added to
    the phase's name (which stage timed out)."""

    def __init__(self, team=None, label: str = ""):
        import cupy
        import numpy as np
        self._pinned = cupy.cuda.alloc_pinned_memory(16)
        self.record = np.frombuffer(self._pinned, dtype=np.int32, count=4)
        self.record[:] = 0
        self.team = None if team is None else [int(r) for r in team]
        self.label = label

    @property
    def ptr(self) -> int:
        """Address kernels write to."""
        return int(self._pinned.ptr)

    def check(self, what: str, num_experts: Optional[int] = None) -> None:
        """Raise (and clear the record) if a kernel reported an error; no synchronisation.
        ``num_experts``: the expert count to print in a bad-expert-id message, when known."""
        rec = self.record.tolist()
        if rec[0]:
            self.record[:] = 0
            if self.team is not None:
                rec = team_to_global(rec, self.team)
            raise_if_error(rec, f"{what} [{self.label}]" if self.label else what, num_experts=num_experts)


def team_to_global(record, team):
    """A record written by kernels that number the ranks of a team (0 .. len(team)-1), with its rank
    and peer turned into global ranks (``team[i]``); a peer that is a value (an expert id: phases
    22 and 24) or unknown (-1) stays."""
    code, phase, peer, rank = (int(v) for v in record)
    if phase not in _VALUE_PHASES and 0 <= peer < len(team):
        peer = int(team[peer])
    if 0 <= rank < len(team):
        rank = int(team[rank])
    return [code, phase, peer, rank]


def bad_expert_id_message(what: str, value: int, rank: int, num_experts: Optional[int] = None) -> str:
    """The message of a phase-24 record: ``value`` is the offending id as the kernel clamped it to
    int32 (so the int32 bounds mean "this or beyond")."""
    shown = str(value)
    if value == _INT32_MAX:
        shown += " or more (clamped to int32)"
    elif value == _INT32_MIN:
        shown += " or less (clamped to int32)"
    bound = "num_experts" if num_experts is None else str(num_experts)
    return (f"{what}: topk_idx: expected expert ids in [-1, {bound}), found {shown} on rank {rank} "
            "(found on the GPU by an earlier launch, which treated the entry as -1; set "
            "deepep_cupy.settings.check_values = True to raise on the call that passes it)")


def raise_if_error(record, what: str, num_experts: Optional[int] = None) -> None:
    """Raise for a non-zero record ``[code, phase, peer, rank]``: ``DeepEPTimeout`` for a timeout,
    ``DeepEPInvalid`` for a bad input value (phase 24; ``num_experts`` goes into the message when
    given), ``DeepEPError`` otherwise."""
    code, phase, peer, rank = (int(v) for v in record)
    if code == 0:
        return
    phase_name = PHASES.get(phase, f"phase {phase}")
    if code == 2 and phase == PHASE_BAD_EXPERT_ID:
        raise DeepEPInvalid(bad_expert_id_message(what, peer, rank, num_experts))
    if code == 2 and phase == 15:
        raise DeepEPError(f"{what}: rank {rank} received more tokens than num_worst_tokens in an earlier "
                          f"dispatch (rows from rank {peer} were dropped); raise num_worst_tokens")
    if code == 2 and phase == 22:
        raise DeepEPError(f"{what}: rank {rank} chose expert {peer} more often than num_max_dispatch_tokens_per_rank "
                          "in an earlier low-latency dispatch (duplicate expert ids in a row?); the extra "
                          "entries were dropped")
    whom = f"rank {peer}" if peer >= 0 else "a peer it could not tell"
    msg = f"{what}: rank {rank} {_CODES.get(code, f'error {code}')} in {phase_name} waiting on {whom}"
    if code == 1:
        raise DeepEPTimeout(msg + " (the peer never arrived: did every rank make the same call?)")
    raise DeepEPError(msg)
