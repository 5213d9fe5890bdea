"""The low-latency kernels' index arithmetic (cuda_src/low_latency.cu), replayed in numpy against the
reference model, so the design is checked on every CPU run (the GPU tier checks the kernels):
the send kernel's per-expert ranks of (t, k) entries, the receiver's layout_begin from the metas, and the
placement recv[l][begin[l][s] + slot] of every message's entries."""

import numpy as np
import pytest

from deepep_cupy import reference
from deepep_cupy.low_latency import LowLatencyKernels


def entry_slots(topk_idx, num_experts):
    """What ll_dispatch_send computes per token: slot of each (t, k) among this rank's entries for its expert, and
    the count per expert, in flattened (t, k) order."""
    flat = topk_idx.reshape(-1)
    slots = np.full(flat.shape, -1, dtype=np.int64)
    counts = np.zeros(num_experts, dtype=np.int64)
    for j, e in enumerate(flat):
        if e >= 0:
            slots[j] = counts[e]
            counts[e] += 1
    return slots.reshape(topk_idx.shape), counts


def simulate(topk_idxs, num_experts, num_max_tokens):
    """Receiver-side placement of every rank, as ll_dispatch_recv does it."""
    R = len(topk_idxs)
    L = num_experts // R
    prepared = [entry_slots(idx, num_experts) for idx in topk_idxs]
    out = []
    for me in range(R):
        metas = [prepared[s][1][me * L:(me + 1) * L] for s in range(R)]   # counts for my experts
        begin = np.zeros((L, R), dtype=np.int64)
        for l in range(L):
            acc = 0
            for s in range(R):
                begin[l, s] = acc
                acc += metas[s][l]
        src_info = np.full((L, R * num_max_tokens), -1, dtype=np.int64)
        src_k = np.full((L, R * num_max_tokens), -1, dtype=np.int64)
        combine_slot = np.full((R, num_max_tokens, topk_idxs[0].shape[1]), -1, dtype=np.int64)
        for s in range(R):
            idx, (slots, _) = topk_idxs[s], prepared[s]
            for t in range(idx.shape[0]):
                if not ((idx[t] >= 0) & (idx[t] // L == me)).any():
                    continue   # no message for me
                for k in range(idx.shape[1]):
                    e = idx[t, k]
                    if e < me * L or e >= (me + 1) * L:
                        continue
                    pos = begin[e - me * L, s] + slots[t, k]
                    src_info[e - me * L, pos] = t
                    src_k[e - me * L, pos] = k
                    combine_slot[s, t, k] = (e - me * L) * R * num_max_tokens + pos
        counts = np.array([sum(m[l] for m in metas) for l in range(L)])
        out.append((begin, np.stack(metas, axis=1), counts, src_info, src_k, combine_slot))
    return out


@pytest.mark.parametrize("num_ranks,num_experts,tokens,topk", [(2, 16, 24, 4), (3, 12, 9, 3), (4, 32, 17, 6)])
def test_low_latency_placement_matches_reference(num_ranks, num_experts, tokens, topk):
    rng = np.random.default_rng(num_ranks * 100 + tokens)
    H, M = 128, 32
    xs, idxs = [], []
    for r in range(num_ranks):
        t = tokens - r   # uneven
        xs.append(rng.standard_normal((t, H), dtype=np.float32).astype(reference.BF16))
        idx = rng.integers(-1, num_experts, size=(t, topk)).astype(np.int64)
        idx[0, :2] = 0 if t else idx[0, :2]          # a duplicate expert in one token
        idxs.append(idx)
    ref = reference.low_latency_dispatch(xs, idxs, M, num_experts, use_fp8=False)
    for me, (begin, count, recv_count, src_info, src_k, _) in enumerate(simulate(idxs, num_experts, M)):
        r = ref[me]
        np.testing.assert_array_equal(begin, r.layout_begin)
        np.testing.assert_array_equal(count, r.layout_count)
        np.testing.assert_array_equal(recv_count, r.recv_count)
        for l, n in enumerate(recv_count):
            np.testing.assert_array_equal(src_info[l, :n], r.recv_src_info[l, :n])
            np.testing.assert_array_equal(src_k[l, :n], r.recv_src_k[l, :n])


@pytest.mark.parametrize("num_ranks,num_experts,tokens,topk", [(2, 16, 24, 4), (3, 12, 9, 3), (4, 32, 17, 8)])
def test_combine_inverse_map_and_arrival_counts(num_ranks, num_experts, tokens, topk):
    """What the combine relies on: combine_slot (written by ll_dispatch_recv) maps each source entry
    (s, t, k) to the received row that holds it, every received row once; and the row parts that
    arrive for a token (kCombineParts per placed entry, summed over the expert ranks) equal what its
    receiver waits for, kCombineParts x (entries with topk_slots >= 0)."""
    rng = np.random.default_rng(7 * num_ranks + tokens)
    M, L = 32, num_experts // num_ranks
    idxs = []
    for r in range(num_ranks):
        idx = rng.integers(-1, num_experts, size=(tokens - r, topk)).astype(np.int64)
        idx[0, :2] = 0                                # a duplicate expert in one token
        idxs.append(idx)
    sims = simulate(idxs, num_experts, M)
    for me, (_, _, recv_count, src_info, src_k, combine_slot) in enumerate(sims):
        seen = set()
        for s in range(num_ranks):
            for t in range(idxs[s].shape[0]):
                for k in range(topk):
                    slot = combine_slot[s, t, k]
                    local = idxs[s][t, k] >= 0 and idxs[s][t, k] // L == me
                    assert (slot >= 0) == local
                    if slot >= 0:
                        l, pos = divmod(slot, num_ranks * M)
                        assert (src_info[l, pos], src_k[l, pos]) == (t, k)
                        seen.add((l, pos))
        assert seen == {(l, p) for l in range(L) for p in range(M * num_ranks) if src_info[l, p] >= 0}
        assert len(seen) == recv_count.sum()
    parts = 4   # kCombineParts
    for s in range(num_ranks):
        slots, _ = entry_slots(idxs[s], num_experts)
        for t in range(idxs[s].shape[0]):
            arriving = parts * sum(int((sims[me][5][s, t] >= 0).sum()) for me in range(num_ranks))
            assert arriving == parts * int((slots[t] >= 0).sum())


class _Bookkeeping:
    """The host-side bookkeeping of LowLatencyKernels without a GPU (no kernels, no memory)."""

    def __init__(self):
        self.pending = []
        self._guarded_sends = 0

    _admit = LowLatencyKernels._admit
    _guard = LowLatencyKernels._guard
    _take_turn = LowLatencyKernels._take_turn
    _no_pending = LowLatencyKernels._no_pending


def test_reuse_guard_arms_after_two_in_flight():
    """send A, send B (joins A in flight), hook A, hook B, then C and D reuse A's and B's halves and
    must be guarded; E is not. A loop that never overlaps is never guarded."""
    k = _Bookkeeping()
    guards = []
    a, b = object(), object()           # pending operations are compared by identity
    for op in (a, b):
        guards.append(int(k._guard()))
        k.pending.append(op)
    k._take_turn(a, "hook")
    k._take_turn(b, "hook")
    for _ in "CDE":
        guards.append(int(k._guard()))
    assert guards == [0, 0, 1, 1, 0]
    plain = _Bookkeeping()
    assert [int(plain._guard()) for _ in range(5)] == [0] * 5


def test_hooks_run_once_in_order_and_two_at_most():
    from deepep_cupy.errors import DeepEPInvalid
    k = _Bookkeeping()
    a, b = object(), object()
    k.pending += [a, b]
    with pytest.raises(DeepEPInvalid, match="at most two"):
        k._admit("low_latency_dispatch")
    with pytest.raises(DeepEPInvalid, match="not the oldest"):
        k._take_turn(b, "hook")
    k._take_turn(a, "hook")
    with pytest.raises(DeepEPInvalid, match="already completed"):
        k._take_turn(a, "hook")
    with pytest.raises(DeepEPInvalid, match="1 earlier low-latency operation"):
        k._no_pending("low_latency_combine")   # a call without a hook while B's hook is due
    k._take_turn(b, "hook")
    assert k.pending == []
    k._no_pending("low_latency_combine")


@pytest.mark.parametrize("value", [-1, 16, True, 4.0])
def test_reduce_warps_setting_is_checked_before_launch(value):
    """A fused combine with settings.ll_combine_reduce_warps outside [0, 16) raises DeepEPInvalid
    naming the setting (checked before anything is launched); 0 and 15 are accepted."""
    from deepep_cupy import settings
    from deepep_cupy.errors import DeepEPInvalid
    old = settings.ll_combine_reduce_warps
    try:
        settings.ll_combine_reduce_warps = value
        with pytest.raises(DeepEPInvalid, match="settings.ll_combine_reduce_warps"):
            LowLatencyKernels._reduce_warps()
        for ok in (0, 15):
            settings.ll_combine_reduce_warps = ok
            assert int(LowLatencyKernels._reduce_warps()) == ok
    finally:
        settings.ll_combine_reduce_warps = old


class _Request:
    def __init__(self, done):
        self.done = done

    def Test(self):
        return self.done


class _Comm:
    """A communicator whose Ibarrier completes (every peer arrived) or never does (one never comes)."""

    def __init__(self, peers_arrive):
        self.peers_arrive = peers_arrive

    def Ibarrier(self):
        return _Request(self.peers_arrive)


def test_low_latency_relay_barrier_is_bounded(monkeypatch):
    """A rank that changes the low-latency shapes alone gets a DeepEPTimeout naming its rank and the
    phase from the re-lay's barrier, instead of waiting in comm.Barrier() forever."""
    import types
    import time
    from deepep_cupy import gpu_backend
    from deepep_cupy.errors import DeepEPTimeout

    from deepep_cupy.config import settings
    monkeypatch.setattr(settings, "timeout_seconds", 0.2)
    backend = gpu_backend.GpuBackend.__new__(gpu_backend.GpuBackend)
    backend.rank = 3
    kernels = types.SimpleNamespace(shape_key=(128, 7168, 288))
    backend.comm = _Comm(peers_arrive=True)
    backend._clean_barrier(kernels, "before")          # every peer there: returns
    backend.comm = _Comm(peers_arrive=False)
    start = time.monotonic()
    with pytest.raises(DeepEPTimeout, match=r"rank 3: low-latency re-lay .*\(128, 7168, 288\).*before the clean"):
        backend._clean_barrier(kernels, "before")
    assert time.monotonic() - start < 5
