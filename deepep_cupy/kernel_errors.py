"""The error record kernels write (cuda_src/common/exception.cuh) and its translation to exceptions."""

from __future__ import annotations

from .errors import DeepEPError, DeepEPTimeout

__all__ = ["PHASES", "ErrorRecordArray", "PinnedErrorRecord", "raise_if_error", "team_to_global"]

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
    20: "low-latency dispatch receive (waiting for a peer's tokens)",
    21: "low-latency combine receive (waiting for a peer's expert outputs)",
    22: "low-latency dispatch: an expert chosen more than num_max_dispatch_tokens_per_rank times",
    23: "low-latency send (waiting for a peer to receive the operation that last used this buffer half)",
}

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

    def check(self, what: str) -> None:
        """Raise (and clear the record) if a kernel reported an error; no synchronisation."""
        rec = self.record.tolist()
        if rec[0]:
            self.record[:] = 0
            if self.team is not None:
                rec = team_to_global(rec, self.team)
            raise_if_error(rec, f"{what} [{self.label}]" if self.label else what)


def team_to_global(record, team):
    """A record written by kernels that number the ranks of a team (0 .. len(team)-1), with its rank
    and peer turned into global ranks (``team[i]``); a peer that is an expert id (phase 22) or
    unknown (-1) stays."""
    code, phase, peer, rank = (int(v) for v in record)
    if phase != 22 and 0 <= peer < len(team):
        peer = int(team[peer])
    if 0 <= rank < len(team):
        rank = int(team[rank])
    return [code, phase, peer, rank]


def raise_if_error(record, what: str) -> None:
    """Raise ``DeepEPTimeout``/``DeepEPError`` for a non-zero record ``[code, phase, peer, rank]``."""
    code, phase, peer, rank = (int(v) for v in record)
    if code == 0:
        return
    phase_name = PHASES.get(phase, f"phase {phase}")
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
