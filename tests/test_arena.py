"""The receive arena's allocator and the arena layout of the symmetric buffer (pure Python: no GPU
needed; tests/test_kernel_params.py compares every parameter struct, the direct dispatch's too,
with its C declaration and decodes what each launch site packs)."""

import gc
import re
from pathlib import Path

import numpy as np
import pytest

from deepep_cupy.arena import ReceiveArena
from deepep_cupy.dispatch_args import DispatchPayload, DispatchRouting
from deepep_cupy.intranode import (CopyPlan, IntranodeKernels, SymmetricLayout, arena_row_bytes, dispatch_row_bytes,
                                  size_hint)


def test_alloc_is_aligned_first_fit_and_fails_when_full():
    arena = ReceiveArena(base_ptr=1 << 20, nbytes=4096, device_id=0)
    a = arena.alloc(1)
    b = arena.alloc(300)
    assert (a.offset, a.nbytes) == (0, 256) and (b.offset, b.nbytes) == (256, 512)
    assert a.ptr == (1 << 20) and b.ptr == (1 << 20) + 256
    assert arena.free_bytes == 4096 - 768 and arena.largest_free == 4096 - 768
    assert arena.alloc(4096) is None          # no extent that large
    rest = arena.alloc(4096 - 768)
    assert arena.free_bytes == 0 and arena.largest_free == 0 and arena.alloc(1) is None
    del a, b, rest


def test_freed_blocks_coalesce_in_any_order():
    arena = ReceiveArena(0, 8 * 256, 0)
    blocks = [arena.alloc(256) for _ in range(8)]
    for i in (1, 5, 3, 7):             # free every other one: four separate holes
        blocks[i] = None
    gc.collect()
    assert arena.free_bytes == 4 * 256 and arena.largest_free == 256
    blocks[2] = blocks[6] = None        # holes 1-3 and 5-7 merge
    assert arena.largest_free == 3 * 256
    blocks[4] = None                    # 1-7 merge
    assert arena.largest_free == 7 * 256
    blocks[0] = None
    assert arena.free_bytes == arena.largest_free == 8 * 256
    assert arena.alloc(8 * 256).offset == 0


def test_garbage_collection_inside_alloc_does_not_deadlock():
    """A block in a reference cycle (an exception's traceback holding a dispatch's arrays) is freed
    by the cyclic garbage collector, which may run inside ``alloc`` on the same thread, where the
    arena's lock is held. Seen on the GPU machine (2026-12-06): a rank stuck in ``free`` under
    ``alloc`` for good, its peers timing out. Its ``__del__`` must not wait for the lock."""
    import threading
    arena = ReceiveArena(0, 16 * 256, 0)
    cyclic = [arena.alloc(256)]
    cyclic.append(cyclic)          # unreachable once dropped: only the collector frees it
    del cyclic
    result = {}

    def allocate():
        old = gc.get_threshold()
        gc.set_threshold(1)        # the next tracked allocation (inside alloc) runs a collection
        try:
            result["blocks"] = [arena.alloc(256) for _ in range(4)]
        finally:
            gc.set_threshold(*old)

    worker = threading.Thread(target=allocate, daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "alloc deadlocked on the arena's own lock (collector ran __del__ inside it)"
    gc.collect()
    offsets = sorted(b.offset for b in result["blocks"])
    assert len(set(offsets)) == 4                          # distinct blocks
    assert arena.free_bytes == 16 * 256 - 4 * 256          # the cyclic block came back
    del result
    gc.collect()
    assert arena.free_bytes == 16 * 256 and arena.largest_free == 16 * 256


def test_block_outliving_its_arena_is_harmless():
    arena = ReceiveArena(0, 1024, 0)
    block = arena.alloc(10)
    del arena
    gc.collect()
    del block                           # the weak reference is dead: nothing to return it to


@pytest.mark.parametrize("num_ranks", [1, 2, 4, 8])
def test_arena_layout_from_the_size_hint_fits_its_promise(num_ranks):
    T, H, K = 4096, 7168, 8
    hint = size_hint(num_ranks, T, H, K, arena=True)
    layout = SymmetricLayout.build(num_ranks, hint, arena=True)
    assert layout.dispatch_staging == layout.combine_staging        # one staging area, shared
    assert layout.arena == layout.dispatch_staging + layout.staging_bytes
    assert layout.arena + layout.arena_bytes <= hint
    if num_ranks > 1:
        assert layout.slot_rows(dispatch_row_bytes(2 * H, 0, K)) >= T
    receive = num_ranks * T * arena_row_bytes(2 * H, 0, K) + 5 * 256
    assert layout.arena_bytes >= 2 * receive                       # two worst-case receives
    # the control area starts the same way in every layout; the staged layouts are unchanged
    plain = SymmetricLayout.build(num_ranks, size_hint(num_ranks, T, H, K), arena=False)
    assert plain.arena_bytes == 0 and plain.combine_staging == plain.dispatch_staging + plain.staging_bytes
    assert plain.direct_info == layout.direct_info and plain.direct_flags == layout.direct_flags


@pytest.mark.parametrize("num_ranks", [1, 2, 8])
def test_layout_struct_bytes_match_the_kernel_struct(num_ranks):
    """SymmetricLayout.struct_bytes packs the fields of the kernel's Layout (cuda_src/intranode.cu)
    in its order: the long long offsets, then the int fields; the combine's control words follow
    direct_flags, inside the control area, without overlapping."""
    src = (Path(__file__).resolve().parents[1] / "cuda_src" / "intranode.cu").read_text()
    body = re.search(r"struct Layout \{(.*?)\n\};", src, re.S).group(1)
    fields = [re.match(r"\s*(long long|int)\s+(\w+);", line.split("//")[0]) for line in body.splitlines()]
    fields = [(m.group(1), m.group(2)) for m in fields if m]
    longs = [name for kind, name in fields if kind == "long long"]
    ints = [name for kind, name in fields if kind == "int"]
    assert [kind for kind, _ in fields] == ["long long"] * len(longs) + ["int"] * len(ints)
    layout = SymmetricLayout.build(num_ranks, size_hint(num_ranks, 512, 2048, 8, arena=True), arena=True)
    raw = layout.struct_bytes()
    assert raw.nbytes == 8 * len(longs) + 4 * len(ints)        # sizeof(Layout): no tail padding
    words = raw[:8 * len(longs)].view(np.int64)
    assert [int(w) for w in words] == [getattr(layout, name) for name in longs]
    assert [int(v) for v in raw[8 * len(longs):8 * len(longs) + 4 * len(ints)].view(np.int32)] == \
        [getattr(layout, name) for name in ints]
    r = num_ranks
    assert layout.direct_flags + 8 * r <= layout.combine_info
    assert layout.combine_info + 64 * r <= layout.combine_info_flags
    assert layout.combine_info_flags + 8 * r <= layout.combine_done
    assert layout.combine_done + 16 * r + 8 <= SymmetricLayout.control_bytes(r) <= layout.dispatch_staging


@pytest.mark.parametrize("num_ranks", [2, 3, 8])
@pytest.mark.parametrize("kind", ["staged", "puts", "arena"])
def test_bytes_for_gives_the_staging_it_promises(num_ranks, kind):
    """``SymmetricLayout.bytes_for`` (the size hint, and the size a capacity error advises) builds
    a layout whose staging areas hold the bytes asked for, and an arena layout keeps its arena."""
    for need in (1, 4096 * 14416, 12345 * 777):
        arena_need = 3 * need if kind == "arena" else 0
        total = SymmetricLayout.bytes_for(num_ranks, need, arena_need, send_area=kind == "puts",
                                          arena=kind == "arena")
        layout = SymmetricLayout.build(num_ranks, total, send_area=kind == "puts", arena=kind == "arena")
        assert layout.staging_bytes >= need and layout.arena_bytes >= arena_need


def test_holds_only_arrays_wholly_inside():
    arena = ReceiveArena(base_ptr=1 << 20, nbytes=4096, device_id=0)

    class Arr:
        def __init__(self, ptr, nbytes, contiguous=True):
            self.data = type("P", (), {"ptr": ptr})()
            self.nbytes = self.size = nbytes
            self.flags = type("F", (), {"c_contiguous": contiguous})()
    assert arena.holds(Arr(1 << 20, 4096)) and arena.holds(Arr((1 << 20) + 256, 100))
    assert not arena.holds(Arr((1 << 20) + 4000, 200))        # runs past the end
    assert not arena.holds(Arr((1 << 20) - 16, 64))          # starts before it
    assert not arena.holds(Arr(1 << 20, 0))                  # empty
    assert not arena.holds(Arr(1 << 20, 64, contiguous=False))


@pytest.mark.parametrize("exchange", ["notify-kernel", "fused"])
@pytest.mark.parametrize("fail_in", ["poll", "on_queued", "overrun"])
def test_failed_fresh_dispatch_parks_its_blocks(fail_in, exchange):
    """A fresh direct dispatch whose host side fails after its kernel is queued (a notify timeout,
    an interrupt, a count past its blocks) never returns the kernel's arena blocks: the kernel may
    still write them. With the notify kernel, and with the fused exchange."""
    from deepep_cupy.errors import DeepEPError, DeepEPTimeout
    arena = ReceiveArena(base_ptr=1 << 20, nbytes=1 << 20, device_id=0)
    launched = []

    def poll():
        if fail_in == "poll":
            raise DeepEPTimeout("rank 0: dispatch notify did not finish")
        # [offsets (R+1), counts (R), per-expert]: row count at index R
        return np.array([0, 0, 10 ** 6 if fail_in == "overrun" else 5, 0, 0, 0], np.int32)

    def launch_notify(*args):
        assert exchange == "notify-kernel", "the fused exchange launched notify"
        return "send_pos", "recv_info", poll

    def on_queued():
        if fail_in == "on_queued":
            raise KeyboardInterrupt
    self = _fake_intranode(arena, launch_notify, launched, fused_poll=poll if exchange == "fused" else None)
    x, idx = np.zeros((16, 32), np.uint16), np.zeros((16, 4), np.int64)
    expected = {"poll": DeepEPTimeout, "on_queued": KeyboardInterrupt, "overrun": DeepEPError}[fail_in]
    with pytest.raises(expected, match="more than the" if fail_in == "overrun" else None):
        IntranodeKernels._notify_and_dispatch_ahead(self, DispatchPayload(x, None, idx, None),
                                                    DispatchRouting(None, None, None, 8, 1), 24, None,
                                                    on_queued=on_queued)
    gc.collect()
    taken = sum(b.nbytes for b in self._parked_blocks)
    assert len(self._parked_blocks) == 3 and taken > 0          # recv_x, ids, source index
    # the kernel was given exactly these blocks (None where the output is absent)
    assert launched == [[self._parked_blocks[0].ptr, None, self._parked_blocks[1].ptr, None,
                         self._parked_blocks[2].ptr]]
    assert arena.free_bytes == arena.nbytes - taken              # still out of the arena after gc


def test_fresh_dispatch_makes_its_arrays_after_the_poll():
    """The success path of a fresh direct dispatch, host side: the kernel gets the addresses of
    blocks sized for capacity rows; after the poll each output is made with the polled row count
    over its block, and each block keeps only what those rows need (256-aligned)."""
    arena = _ViewlessArena(base_ptr=1 << 20, nbytes=1 << 20, device_id=0)
    launched = []
    num_rows = 21

    def launch_notify(*args):
        # [offsets (R+1), counts (R), per-expert (2)]: the row count at index R
        return "send_pos", "recv_info", lambda: np.array([0, 9, num_rows, 9, 12, 7, 14], np.int32)
    self = _fake_intranode(arena, launch_notify, launched)
    x, scales = np.zeros((16, 256), np.uint8), np.zeros((16, 2), np.float32)
    idx, w = np.zeros((16, 4), np.int64), np.zeros((16, 4), np.float32)
    recv_x, recv_s, recv_i, recv_w, per_expert, handle = IntranodeKernels._notify_and_dispatch_ahead(
        self, DispatchPayload(x, scales, idx, w), DispatchRouting("in_rank", None, None, 4, 1), 24, None)
    capacity = 16 + 32                     # own tokens + one staging slot from the peer
    assert [v[0] for v in (recv_x, recv_s, recv_i, recv_w)] == [(num_rows, 256), (num_rows, 2), (num_rows, 4),
                                                                (num_rows, 4)]
    assert per_expert == [7, 14] and handle.num_rows == handle.num_recv_tokens == num_rows
    assert handle.recv_src_idx[0] == (num_rows,) and handle.num_tokens == 16 and handle.hidden == 256
    blocks = [v[2] for v in (recv_x, recv_s, recv_i, recv_w, handle.recv_src_idx)]
    assert launched == [[b.ptr for b in blocks]]
    # with the notify kernel: notify bumped the seq; the data kernel exchanges no counts
    assert self.launches == [(True, dict(bump_seq=False, copy=None, fused=None, host_record=False))]
    need = [num_rows * 256, num_rows * 8, num_rows * 32, num_rows * 16, num_rows * 4]
    assert [b.nbytes for b in blocks] == [(n + 255) // 256 * 256 for n in need]
    assert capacity * 256 > blocks[0].nbytes     # the tail went back
    assert arena.free_bytes == arena.nbytes - sum(b.nbytes for b in blocks) and not self._parked_blocks


def test_fused_fresh_dispatch_is_one_launch():
    """With the fused count exchange a fresh dispatch launches the data kernel alone (no notify),
    asking it to bump the seq, exchange the counts for ``routing`` and write the host record, into
    arena blocks sized for capacity rows; after the poll the arrays take the polled row count."""
    arena = _ViewlessArena(base_ptr=1 << 20, nbytes=1 << 20, device_id=0)
    launched, num_rows = [], 21

    def launch_notify(*args):
        raise AssertionError("the fused exchange launched notify")
    poll = lambda: np.array([0, 9, num_rows, 9, 12, 7, 14], np.int32)   # noqa: E731
    self = _fake_intranode(arena, launch_notify, launched, fused_poll=poll)
    x, idx = np.zeros((16, 256), np.uint8), np.zeros((16, 4), np.int64)
    routing = DispatchRouting("in_rank", "per_rank", "per_expert", 4, 2)
    recv_x, recv_s, recv_i, recv_w, per_expert, handle = IntranodeKernels._notify_and_dispatch_ahead(
        self, DispatchPayload(x, None, idx, None), routing, 24, None)
    assert len(launched) == 1 and all(isinstance(a, int) for a in launched[0] if a is not None)
    direct, kw = self.launches[0]
    assert direct is True and kw["fused"] is routing and kw["host_record"] and kw["bump_seq"]
    assert kw["copy"].kernel == "intranode_dispatch_direct_fused"
    assert recv_x[0] == (num_rows, 256) and recv_i[0] == (num_rows, 4) and recv_s is None and recv_w is None
    assert per_expert == [7, 14] and handle.send_pos == "send_pos" and handle.recv_info == "recv_info"
    assert handle.num_rows == num_rows and not self._parked_blocks


def test_fused_fresh_dispatch_with_a_full_arena_writes_ordinary_memory():
    """The fused exchange never falls back to the notify kernel (every rank must take the same
    exchange, and whether an arena is full is one rank's matter): with no room in the arena the
    outputs are ordinary arrays of capacity rows, received through staging (direct=False), and the
    results are their first num_rows rows."""
    arena = _ViewlessArena(base_ptr=1 << 20, nbytes=1 << 20, device_id=0)
    hold = arena.alloc(arena.largest_free)   # the caller keeps the whole arena
    launched, num_rows = [], 5
    poll = lambda: np.array([0, 2, num_rows, 2, 3, 5], np.int32)   # noqa: E731
    self = _fake_intranode(arena, None, launched, fused_poll=poll)
    x, idx = np.zeros((16, 32), np.uint16), np.zeros((16, 4), np.int64)
    recv_x, _, recv_i, _, per_expert, handle = IntranodeKernels._notify_and_dispatch_ahead(
        self, DispatchPayload(x, None, idx, None), DispatchRouting("in_rank", None, None, 2, 1), 24, None)
    capacity = 16 + 32
    direct, kw = self.launches[0]
    assert direct is False and kw["fused"] is not None
    assert [a.shape for a in launched[0] if a is not None] == [(capacity, 32), (capacity, 4), (capacity,)]
    assert recv_x.shape == (num_rows, 32) and recv_i.shape == (num_rows, 4) and handle.recv_src_idx.shape == (num_rows,)
    assert recv_x.base is launched[0][0] and per_expert == [5] and not self._parked_blocks
    del hold


class _ViewlessArena(ReceiveArena):
    """A ReceiveArena whose views are (shape, dtype, block) tuples: no GPU needed."""

    def view(self, block, shape, dtype):
        return None if block is None else (tuple(shape), np.dtype(dtype), block)


def _fake_intranode(arena, launch_notify, launched, fused_poll=None):
    """What ``IntranodeKernels._notify_and_dispatch_ahead`` reads of its ``self``, at 2 ranks with
    32-row staging slots: ``launch_notify`` stands in for notify; each data-kernel launch appends
    its output addresses to ``launched`` (and its direct flag and keywords to ``self.launches``).
    ``fused_poll``: the fused count exchange is on, and this is the poll of its host record
    (notify is then never launched); ordinary outputs are numpy arrays."""
    self = type("K", (), {})()
    self.arena, self.num_ranks, self._parked_blocks = arena, 2, []
    self.backend = type("B", (), {"rank": 0})()
    self.check_dispatch_capacity = lambda *a: (64, 32)
    self._direct_specs = lambda *a, **k: IntranodeKernels._direct_specs(self, *a, **k)
    self._launch_notify = launch_notify
    self.launches = []

    def launch_direct(*a, **k):   # (payload, plan, outputs, direct, ...)
        launched.append(a[2])
        self.launches.append((a[3], k))
    self._launch_direct = launch_direct
    fused_plan = CopyPlan("intranode_dispatch_direct_fused")
    self._fused_notify = lambda hidden_bytes: None if fused_poll is None else fused_plan
    self._routing_arrays = lambda num_tokens, num_local: ("send_pos", "recv_info")
    self._host_record_poll = lambda num_local: fused_poll
    self._ordinary_outputs = lambda specs: [None if sp is None else np.zeros(sp[0], sp[1]) for sp in specs]
    return self
