"""Kernel parameter structs (deepep_cupy/kernel_params.py) on the CPU: every ``*Params`` struct in
cuda_src/ matches its host ``ParamStruct`` field for field, the packer's rules, and the intranode,
low-latency and layout launch sites pack what their kernels read (through a recording stand-in for
the module)."""

import contextlib
import re
from pathlib import Path

import numpy as np
import pytest

from deepep_cupy import intranode, low_latency
from deepep_cupy.config import settings
from deepep_cupy.dispatch_args import DataPlan, DispatchPayload, DispatchRouting
from deepep_cupy.errors import DeepEPInvalid
from deepep_cupy.intranode import (COMBINE_PARAMS, DIRECT_PARAMS, NOTIFY_PARAMS, STAGED_DISPATCH_PARAMS,
                                   IntranodeHandle, IntranodeKernels, SymmetricLayout, size_hint)
from deepep_cupy.kernel_params import ParamStruct
from deepep_cupy.layout import LAYOUT_PARAMS, LayoutKernel
from deepep_cupy.low_latency import (LL_COMBINE_PARAMS, LL_COMBINE_RECV_PARAMS, LL_COMBINE_SEND_PARAMS,
                                     LL_DISPATCH_PARAMS, LL_DISPATCH_RECV_PARAMS, LL_DISPATCH_SEND_PARAMS,
                                     LowLatencyKernels, LowLatencyLayout)

CUDA_SRC = Path(__file__).resolve().parents[1] / "cuda_src"
# every host struct, by its C name
HOST_STRUCTS = {s.name: s for s in (
    DIRECT_PARAMS, NOTIFY_PARAMS, STAGED_DISPATCH_PARAMS, COMBINE_PARAMS, LL_DISPATCH_SEND_PARAMS,
    LL_DISPATCH_RECV_PARAMS, LL_DISPATCH_PARAMS, LL_COMBINE_SEND_PARAMS, LL_COMBINE_RECV_PARAMS, LL_COMBINE_PARAMS,
    LAYOUT_PARAMS)}
# the kernels that take each struct (the combine pair through DEEPEP_COMBINE_ENTRY)
KERNELS = {"intranode_dispatch_direct": "DirectDispatchParams", "intranode_dispatch_direct_tma": "DirectDispatchParams",
           "intranode_dispatch_direct_r8": "DirectDispatchParams",
           "intranode_dispatch_direct_fused": "DirectDispatchParams",
           "intranode_dispatch_direct_r8_fused": "DirectDispatchParams",
           "intranode_notify": "NotifyParams",
           "intranode_dispatch": "StagedDispatchParams", "intranode_combine_bf16": "CombineParams",
           "intranode_combine_f32": "CombineParams", "ll_dispatch_send": "LLDispatchSendParams",
           "ll_dispatch_recv": "LLDispatchRecvParams", "ll_dispatch": "LLDispatchParams",
           "ll_combine_send": "LLCombineSendParams", "ll_combine_recv": "LLCombineRecvParams",
           "ll_combine": "LLCombineParams", "get_dispatch_layout": "DispatchLayoutParams"}
# kernels left with positional parameters: short lists (see docs/intranode.md, Kernel parameters)
POSITIONAL = {"intranode_bump_seq", "internode_final_order", "check_index_range", "ring_put_signal", "peer_store"}
EIGHT_BYTE_TYPES = ("long long", "unsigned long long", "int64_t", "uint64_t")


def _sources() -> str:
    return "\n".join(p.read_text() for p in sorted(CUDA_SRC.rglob("*")) if p.suffix in (".cu", ".cuh"))


def c_structs() -> dict:
    """{name: [(type, field), ...]} of every ``struct XxxParams { ... };`` in cuda_src/; one
    declaration per line (anything else fails the parse)."""
    out = {}
    for name, body in re.findall(r"struct (\w+Params) \{(.*?)\n\};", _sources(), re.S):
        fields = []
        for line in body.splitlines():
            code = line.split("//")[0].strip()
            if not code:
                continue
            m = re.fullmatch(r"(.+?)\s*\b(\w+);", code)
            assert m and "," not in code, f"{name}: cannot parse {code!r} (one plain field per line)"
            fields.append((m.group(1), m.group(2)))
        out[name] = fields
    return out


def test_every_params_struct_has_a_host_twin():
    """A struct added on either side without the other fails here."""
    assert set(c_structs()) == set(HOST_STRUCTS)


@pytest.mark.parametrize("name", sorted(HOST_STRUCTS))
def test_params_struct_matches_the_c_declaration(name):
    """Field names in order, every field 8 bytes (so word i is field i), and the struct's
    DEEPEP_PARAMS_CHECK (a compile-time sizeof check) counts the same fields."""
    fields = c_structs()[name]
    assert tuple(f for _, f in fields) == HOST_STRUCTS[name].fields
    for kind, field in fields:
        assert kind.endswith("*") or kind in EIGHT_BYTE_TYPES, f"{name}.{field}: {kind} is not 8 bytes"
    checks = re.findall(rf"DEEPEP_PARAMS_CHECK\({name}, (\d+)\);", _sources())
    assert checks == [str(len(fields))]
    assert HOST_STRUCTS[name].nbytes < 4096 // 4      # CUDA's parameter limit is 4 KB; stay well under


def test_every_kernel_of_the_package_is_listed():
    """A kernel added to a spec must take a params struct (KERNELS) or be a known short one."""
    from deepep_cupy import kernels
    names = {name for spec in kernels.all_specs() for name in spec.kernels}
    assert names == set(KERNELS) | POSITIONAL


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_kernels_take_their_struct(kernel):
    """Each kernel takes exactly one by-value struct, the one its launch site packs."""
    src = _sources()
    struct = KERNELS[kernel]
    if kernel.startswith("intranode_combine"):
        assert f"DEEPEP_COMBINE_ENTRY({kernel}," in src
        assert re.search(rf"NAME\(const {struct} p\)", src)
    else:
        assert re.search(rf"\b{kernel}\(const {struct} p\) \{{", src), kernel


# ---- the packer -------------------------------------------------------------------------------
class _Ptr:
    """Anything with ``.data.ptr`` packs as that address (CuPy arrays, their views)."""

    def __init__(self, ptr):
        self.data = type("Mem", (), {"ptr": ptr})()


def test_pack_words_in_field_order():
    s = ParamStruct("P", ("a", "b", "c", "d", "e", "f"))
    packed = s.pack(a=_Ptr(0xDEAD00), b=None, c=-1, d=True, e=np.int32(-7), f=(1 << 64) - 1)
    assert packed.shape == (1,) and packed.itemsize == s.nbytes == 48 and packed.dtype == s.dtype
    words = packed.view(np.int64)
    assert words.tolist() == [0xDEAD00, 0, -1, 1, -7, -1]
    assert packed.view(np.uint64)[2] == (1 << 64) - 1          # two's complement
    assert s.pack(a=0, b=False, c=1 << 63, d=0, e=0, f=0).view(np.uint64)[2] == 1 << 63


def test_pack_names_missing_and_unknown_fields():
    s = ParamStruct("SomeParams", ("x", "y", "z"))
    with pytest.raises(ValueError, match=r"SomeParams: missing fields \['y', 'z'\], unknown fields \[\]"):
        s.pack(x=0)
    with pytest.raises(ValueError, match=r"missing fields \[\], unknown fields \['w'\]"):
        s.pack(x=0, y=0, z=0, w=0)
    with pytest.raises(ValueError, match=r"missing fields \['z'\], unknown fields \['q'\]"):
        s.pack(x=0, y=0, q=0)


def test_pack_rejects_values_that_are_not_64_bit_integers():
    s = ParamStruct("P", ("n",))
    with pytest.raises(TypeError, match=r"P\.n: expected an integer"):
        s.pack(n=1.5)                          # a float would truncate silently
    with pytest.raises(ValueError, match="does not fit 64 bits"):
        s.pack(n=1 << 64)
    with pytest.raises(ValueError, match="does not fit 64 bits"):
        s.pack(n=-(1 << 63) - 1)


def test_pack_off_the_fast_path_gives_the_same_words():
    """Values the short path does not take (numpy integers, int subclasses, an address that is a
    numpy integer) pack as the checked path packs them; a bad address is named like a bad value."""
    import enum

    class Three(enum.IntEnum):
        THREE = 3

    s = ParamStruct("P", ("a", "b", "c", "d"))
    packed = s.pack(a=_Ptr(np.uint64(0xBEEF00)), b=np.int64(-2), c=Three.THREE, d=np.uint64((1 << 64) - 1))
    assert packed.shape == (1,) and packed.dtype == s.dtype
    assert packed.view(np.int64).tolist() == [0xBEEF00, -2, 3, -1]
    with pytest.raises(TypeError, match=r"P\.a: expected an integer"):
        s.pack(a=_Ptr(1.5), b=0, c=0, d=0)
    with pytest.raises(ValueError, match=r"P\.a: .* does not fit 64 bits"):
        s.pack(a=_Ptr(1 << 64), b=0, c=0, d=0)
    with pytest.raises(TypeError, match=r"P\.d: expected an integer"):
        s.pack(a=0, b=0, c=0, d="7")


def test_struct_fields_must_be_unique():
    with pytest.raises(ValueError, match=r"repeated: \['a'\]"):
        ParamStruct("P", ("a", "b", "a"))
    with pytest.raises(ValueError):
        ParamStruct("P", ())


# ---- the launch sites -------------------------------------------------------------------------
class FakeArray:
    """A device array stand-in: shape, dtype, an address; slicing the first axis offsets it."""

    _next = 0x10000

    def __init__(self, shape, dtype, ptr=None):
        self.shape = tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)
        self.dtype = np.dtype(dtype)
        self.itemsize = self.dtype.itemsize
        self.size = int(np.prod(self.shape))
        self.nbytes = self.size * self.itemsize
        if ptr is None:
            ptr, FakeArray._next = FakeArray._next, FakeArray._next + 0x10000
        self.data = type("Mem", (), {"ptr": ptr})()

    def __getitem__(self, key):
        assert isinstance(key, slice) and key.step is None and len(self.shape) == 1
        start, stop, _ = key.indices(self.shape[0])
        return FakeArray((stop - start,), self.dtype, self.data.ptr + start * self.itemsize)


class Recorder(dict):
    """``module[name](grid, block, args, **options)`` records the launch as (name, grid, block, args,
    options)."""

    def __init__(self):
        super().__init__()
        self.launches = []

    def __getitem__(self, name):
        return lambda grid, block, args, **options: self.launches.append((name, grid, block, args, options))


def unpack(struct, launch):
    """{field: int64 word} of a recorded launch whose one argument is ``struct``'s packing."""
    (args,) = [launch[3]]
    assert len(args) == 1 and args[0].dtype == struct.dtype
    return dict(zip(struct.fields, args[0].view(np.int64).tolist()))


@pytest.fixture
def kernels(monkeypatch):
    """An IntranodeKernels of rank 1 of 4 without a GPU: fake arrays, a recording module."""
    import cupy
    monkeypatch.setattr(cupy, "empty", lambda shape, dtype=np.float32: FakeArray(shape, dtype))
    monkeypatch.setattr(settings, "intranode_dispatch", "staged")
    k = object.__new__(IntranodeKernels)
    k.num_ranks, k.rank, k.puts, k.arena = 4, 1, False, None
    k.layout = SymmetricLayout.build(4, size_hint(4, 64, 512, 4), arena=False)   # room for F32 rows
    k.peer_bases, k.team_pes = FakeArray(4, np.uint64), FakeArray(4, np.int32)
    k.layout_struct, k.seq = FakeArray(120, np.uint8), FakeArray(1, np.uint64)
    k.chunk_counters = FakeArray(4096, np.uint64)
    k.errors = type("Err", (), {"ptr": 0xE0000})()
    k._info_pinned = type("Pinned", (), {"ptr": 0xF0000})()
    k.host_info = np.zeros(4096, dtype=np.int32)
    k.module = Recorder()
    k._copy_plans = {}
    k._tma_smem_limit = lambda: 227 * 1024 - 3000        # an H100's opt-in limit less some static bytes
    k.dynamic_smem_allowed = []
    k._allow_dynamic_smem = k.dynamic_smem_allowed.append
    return k


def _team_words(k):
    return dict(peer_bases=k.peer_bases.data.ptr, team_pes=k.team_pes.data.ptr, layout=k.layout_struct.data.ptr,
                seq=k.seq.data.ptr, err=0xE0000, timeout_ns=int(settings.timeout_seconds * 1e9), rank=1)


def test_notify_launch_packs_notify_params(kernels):
    T, E = 64, 16
    in_rank, per_rank, per_expert = FakeArray((T, 4), np.bool_), FakeArray(4, np.int32), FakeArray(E, np.int32)
    for host_record in (True, False):
        kernels.module.launches.clear()
        send_pos, recv_info, _ = kernels._launch_notify(in_rank, per_rank, per_expert, E, 8, host_record,
                                                        contextlib.nullcontext())
        (bump, notify) = kernels.module.launches
        assert bump[0] == "intranode_bump_seq" and notify[:3] == ("intranode_notify", (4,), (1024,))
        words = unpack(NOTIFY_PARAMS, notify)
        assert words == dict(is_token_in_rank=in_rank.data.ptr, num_tokens_per_rank=per_rank.data.ptr,
                             num_tokens_per_expert=per_expert.data.ptr, send_pos=send_pos.data.ptr,
                             recv_info=recv_info.data.ptr, host_info=0xF0000 if host_record else 0,
                             num_tokens=T, num_local_experts=E // 4, expert_alignment=8, **_team_words(kernels))


def test_direct_dispatch_launch_packs_direct_params(kernels, monkeypatch):
    """_launch_direct packs DirectDispatchParams: its outputs come as arrays, raw addresses (a fresh
    direct dispatch passes its arena blocks' addresses) or None; bump_seq adds the seq launch first."""
    monkeypatch.setattr(settings, "timeout_seconds", 2.5)
    monkeypatch.setattr(settings, "intranode_copy", "tma")
    T, H, K = 96, 7168, 8
    x, scales = FakeArray((T, H), np.uint16), FakeArray((T, 56), np.float32)
    idx, w = FakeArray((T, K), np.int64), FakeArray((T, K), np.float32)
    send_pos, recv_info = FakeArray((T, 4), np.int32), FakeArray(2 * 4 + 1 + 64, np.int32)
    recv_x, recv_w, recv_src = FakeArray((T, H), np.uint16), FakeArray((T, K), np.float32), FakeArray(T, np.int32)
    outputs = (recv_x, 0x80, None, recv_w, recv_src)          # arrays, a raw address, None
    kernels._launch_direct(DispatchPayload(x, scales, idx, w), DataPlan(None, send_pos, recv_info, T, 256, -1),
                           outputs, True, 24, contextlib.nullcontext(), row_bytes=14592, slot_rows=4096,
                           bump_seq=True)
    bump, launch = kernels.module.launches
    assert bump[:4] == ("intranode_bump_seq", (1,), (1,), (kernels.seq,))
    assert launch[:3] == ("intranode_dispatch_direct_tma", (24,), (512,))   # the TMA path's entry point
    # TMA copies: 2 producers of 8 rows of 14336 bytes
    assert launch[4] == {"shared_mem": 2 * 8 * H * 2} and kernels.dynamic_smem_allowed == [2 * 8 * H * 2]
    assert intranode.DIRECT_PARAM_FIELDS == DIRECT_PARAMS.fields
    assert unpack(DIRECT_PARAMS, launch) == dict(
        x=x.data.ptr, x_scales=scales.data.ptr, topk_idx=idx.data.ptr, topk_weights=w.data.ptr,
        send_pos=send_pos.data.ptr, recv_info=recv_info.data.ptr, recv_x=recv_x.data.ptr, recv_x_scales=0x80,
        recv_topk_idx=0, recv_topk_weights=recv_w.data.ptr, recv_src_idx=recv_src.data.ptr,
        peer_bases=kernels.peer_bases.data.ptr, layout=kernels.layout_struct.data.ptr, seq=kernels.seq.data.ptr,
        err=0xE0000, timeout_ns=2_500_000_000, num_tokens=T, hidden_bytes=H * 2, scale_bytes=56 * 4, num_topk=K,
        with_topk=1, with_weights=1, num_local_experts=64, num_worst_tokens=-1, rank=1, slot_rows=4096,
        row_bytes=14592, direct=1, tma_producers=2, tma_stages=8, chunk_counters=kernels.chunk_counters.data.ptr,
        tma_split=0, is_token_in_rank=0, num_tokens_per_rank=0, num_tokens_per_expert=0, host_info=0,
        expert_alignment=1)
    assert kernels.last_dispatch_direct is True


@pytest.mark.parametrize("copy", ["registers", "registers8"])
def test_fused_dispatch_launch_packs_the_routing(kernels, monkeypatch, copy):
    """The fused count exchange: the register path's _fused entry point, with the routing (layout
    arrays, alignment) and the pinned host record in the struct; no notify launch."""
    monkeypatch.setattr(settings, "intranode_copy", copy)
    T, H = 32, 2048
    x, send_pos, recv_info = FakeArray((T, H), np.uint16), FakeArray((T, 4), np.int32), FakeArray(9 + 64, np.int32)
    in_rank, per_rank, per_expert = FakeArray((T, 4), np.bool_), FakeArray(4, np.int32), FakeArray(256, np.int32)
    plan = kernels._fused_notify(H * 2)
    assert plan.kernel == {"registers": "intranode_dispatch_direct_fused",
                           "registers8": "intranode_dispatch_direct_r8_fused"}[copy] and plan.producers == 0
    outputs = (FakeArray((T, H), np.uint16), None, None, None, FakeArray(T, np.int32))
    kernels._launch_direct(DispatchPayload(x), DataPlan(in_rank, send_pos, recv_info, T, 256), outputs, False, 8,
                           contextlib.nullcontext(), row_bytes=4112, slot_rows=64, bump_seq=True, copy=plan,
                           fused=DispatchRouting(in_rank, per_rank, per_expert, 256, 4), host_record=True)
    bump, launch = kernels.module.launches
    assert bump[0] == "intranode_bump_seq" and launch[0] == plan.kernel
    words = unpack(DIRECT_PARAMS, launch)
    assert (words["is_token_in_rank"], words["num_tokens_per_rank"], words["num_tokens_per_expert"]) == (
        in_rank.data.ptr, per_rank.data.ptr, per_expert.data.ptr)
    assert words["host_info"] == 0xF0000 and words["expert_alignment"] == 4 and words["direct"] == 0
    assert (words["send_pos"], words["recv_info"]) == (send_pos.data.ptr, recv_info.data.ptr)   # the kernel fills them


def test_fused_exchange_setting(kernels, monkeypatch):
    """settings.intranode_notify: "kernel" and the TMA paths keep the notify kernel (None); an unknown
    value raises before any launch."""
    assert kernels._fused_notify(4096) is not None
    monkeypatch.setattr(settings, "intranode_copy", "tma")
    assert kernels._fused_notify(4096) is None
    monkeypatch.setattr(settings, "intranode_copy", "registers")
    monkeypatch.setattr(settings, "intranode_notify", "kernel")
    assert kernels._fused_notify(4096) is None
    monkeypatch.setattr(settings, "intranode_notify", "inline")
    with pytest.raises(DeepEPInvalid, match="settings.intranode_notify: expected one of 'fused', 'kernel', got 'inline'"):
        kernels._fused_notify(4096)
    assert kernels.module.launches == []


@pytest.mark.parametrize("copy", ["tma", "tma-grid", "registers", "registers8"])
def test_direct_dispatch_copy_setting(kernels, monkeypatch, copy):
    """settings.intranode_copy picks the direct kernel's copy path per call: "registers" packs zero
    producers and no shared memory, "tma" the block-range split and "tma-grid" the grid-strided one;
    an unknown value raises before any launch."""
    monkeypatch.setattr(settings, "intranode_copy", copy)
    T, H = 16, 2048
    x, send_pos, recv_info = FakeArray((T, H), np.uint8), FakeArray((T, 4), np.int32), FakeArray(9 + 64, np.int32)
    outputs = (FakeArray((T, H), np.uint8), None, None, None, None)
    kernels._launch_direct(DispatchPayload(x), DataPlan(None, send_pos, recv_info, T, 256), outputs, True, 8,
                           contextlib.nullcontext(), row_bytes=2064, slot_rows=64, bump_seq=False)
    (launch,) = kernels.module.launches
    words = unpack(DIRECT_PARAMS, launch)
    want = (0, 0) if copy.startswith("registers") else (4, 16)   # 2 KiB rows: 4 producers, the deepest ring
    assert (words["tma_producers"], words["tma_stages"]) == want
    assert words["tma_split"] == (copy == "tma-grid")
    assert launch[4] == {"shared_mem": want[0] * want[1] * H}
    # the TMA path has an entry point of its own
    assert launch[0] == {"registers": "intranode_dispatch_direct", "registers8": "intranode_dispatch_direct_r8"}.get(
        copy, "intranode_dispatch_direct_tma")
    monkeypatch.setattr(settings, "intranode_copy", "bulk")
    kernels.module.launches.clear()
    with pytest.raises(DeepEPInvalid, match="settings.intranode_copy: expected one of 'registers', 'registers8', 'tma', 'tma-grid', got 'bulk'"):
        kernels._launch_direct(DispatchPayload(x), DataPlan(None, send_pos, recv_info, T, 256), outputs, True, 8,
                               contextlib.nullcontext(), row_bytes=2064, slot_rows=64, bump_seq=False)
    assert kernels.module.launches == []


@pytest.mark.parametrize("hidden_bytes,smem,want", [
    (14336, 229_000, (2, 7)),      # BF16 rows of hidden 7168
    (7168, 229_000, (4, 7)),       # FP8 rows of hidden 7168
    (2048, 229_000, (4, 16)),      # short rows: the ring depth is capped
    (18432, 229_000, (2, 6)),      # BF16 hidden 9216
    (65536, 229_000, (1, 3)),      # long rows: one producer
    (131072, 229_000, (0, 0)),     # a ring of two does not fit: register path
    (7176, 229_000, (0, 0)),       # not whole 16-byte units
    (0, 229_000, (0, 0)),
])
def test_tma_plan(hidden_bytes, smem, want):
    got = intranode.tma_plan(hidden_bytes, smem)
    assert got == want
    producers, stages = got
    assert producers * stages * hidden_bytes <= smem and (producers == 0 or 32 % producers == 0)


@pytest.mark.parametrize("cached", [False, True])
def test_staged_dispatch_launch_packs_staged_dispatch_params(kernels, cached):
    T, H, K, E, rows = 64, 256, 4, 16, 40
    x, scales = FakeArray((T, H), np.uint8), FakeArray((T, H // 128), np.float32)
    idx = None if cached else FakeArray((T, K), np.int64)
    w = None if cached else FakeArray((T, K), np.float32)
    send_pos, recv_info = FakeArray((T, 4), np.int32), FakeArray(2 * 4 + 1 + E // 4, np.int32)
    src_idx = FakeArray(rows, np.int32) if cached else None
    tags = FakeArray(T, np.int32)
    out = kernels.dispatch(DispatchPayload(x, scales, idx, w),
                           DataPlan(FakeArray((T, 4), np.bool_), send_pos, recv_info, rows, E, 0, src_idx), 24,
                           contextlib.nullcontext(), src_tags=tags)
    recv_x, recv_scales, recv_idx, recv_w, recv_src = out
    launches = kernels.module.launches
    assert [name for name, *_ in launches] == (["intranode_bump_seq"] if cached else []) + ["intranode_dispatch"]
    assert launches[-1][1:3] == ((24,), (512,))
    row_bytes, slot_rows = kernels.check_dispatch_capacity(x, scales, idx)
    ptr = lambda a: 0 if a is None else a.data.ptr     # noqa: E731
    assert unpack(STAGED_DISPATCH_PARAMS, launches[-1]) == dict(
        x=x.data.ptr, x_scales=scales.data.ptr, topk_idx=ptr(idx), topk_weights=ptr(w), send_pos=send_pos.data.ptr,
        recv_info=recv_info.data.ptr, recv_x=recv_x.data.ptr, recv_x_scales=recv_scales.data.ptr,
        recv_topk_idx=ptr(recv_idx), recv_topk_weights=ptr(recv_w), recv_src_idx=recv_src.data.ptr,
        src_tags=tags.data.ptr, num_tokens=T, hidden_bytes=H, scale_bytes=(H // 128) * 4, num_topk=0 if cached else K,
        with_topk=int(not cached), with_weights=int(not cached), num_local_experts=E // 4, row_bytes=row_bytes,
        slot_rows=slot_rows, num_worst_tokens=0, barrier_first=int(cached), **_team_words(kernels))
    assert (recv_src is src_idx) if cached else recv_src.shape == (rows,)


@pytest.mark.parametrize("dtype, kernel", [(np.uint16, "intranode_combine_bf16"), (np.float32, "intranode_combine_f32")])
def test_combine_launch_packs_combine_params(kernels, dtype, kernel):
    T, H, K, rows = 64, 256, 4, 40
    recv_info = FakeArray(2 * 4 + 1 + 4, np.int32)
    handle = IntranodeHandle(FakeArray((T, 4), np.bool_), FakeArray((T, 4), np.int32), recv_info,
                             FakeArray(rows, np.int32), T, rows, rows, 0, 16, H)
    x, w, bias = FakeArray((rows, H), dtype), FakeArray((rows, K), np.float32), FakeArray((T, H), dtype)
    out, out_w = kernels.combine(x, handle, w, None, bias, 24, contextlib.nullcontext())
    bump, launch = kernels.module.launches
    assert bump[0] == "intranode_bump_seq" and launch[:3] == (kernel, (24,), (512,))
    row_bytes = intranode.combine_row_bytes(H * np.dtype(dtype).itemsize, K)
    assert unpack(COMBINE_PARAMS, launch) == dict(
        x=x.data.ptr, topk_weights=w.data.ptr, bias0=0, bias1=bias.data.ptr, send_pos=handle.send_pos.data.ptr,
        recv_offsets=recv_info.data.ptr, combined_x=out.data.ptr, combined_weights=out_w.data.ptr, num_tokens=T,
        hidden=H, num_topk=K, with_weights=1, row_bytes=row_bytes, slot_rows=kernels.layout.slot_rows(row_bytes),
        pull=0, **_team_words(kernels))


# ---- low-latency launch sites -------------------------------------------------------------------
@pytest.fixture
def ll(monkeypatch):
    """A LowLatencyKernels of rank 2 of 4 (M = 64, H = 512, E = 16) without a GPU: fake arrays, a
    recording module."""
    import cupy
    monkeypatch.setattr(cupy, "empty", lambda shape, dtype=np.float32: FakeArray(shape, dtype))
    k = object.__new__(LowLatencyKernels)
    k.num_ranks, k.rank = 4, 2
    k.layout = LowLatencyLayout.build(64, 512, 4, 16)
    k.region = cupy.uint64(0xA0000000)
    k.peer_regions, k.layout_struct = FakeArray(4, np.uint64), FakeArray(104, np.uint8)
    k.seq, k.done, k.counts = FakeArray(2, np.uint64), FakeArray(4, np.uint32), FakeArray(16, np.int32)
    k.errors = type("Err", (), {"ptr": 0xE0000})()
    k._sms, k.pending, k._guarded_sends = 24, [], 0
    k.module = Recorder()
    return k


def _ll_team(k, seq, done, num_tokens, num_topk, use_fp8=0, round_scale=0, use_ue8m0=0):
    """The words of the fields every low-latency struct has; seq / done: byte offsets into the
    counters (they stay device pointers: a graph replay reads and advances them)."""
    return dict(region=0xA0000000, layout=k.layout_struct.data.ptr, seq=k.seq.data.ptr + seq,
                done=k.done.data.ptr + done, err=0xE0000, timeout_ns=int(settings.timeout_seconds * 1e9),
                num_tokens=num_tokens, hidden=512, num_topk=num_topk, num_experts=16, use_fp8=use_fp8,
                round_scale=round_scale, use_ue8m0=use_ue8m0, rank=2)


def _recv_words(recv_x, recv_scales, hd):
    return dict(recv_x=recv_x.data.ptr, recv_scales=0 if recv_scales is None else recv_scales.data.ptr,
                recv_count=hd.recv_count.data.ptr, recv_src_info=hd.recv_src_info.data.ptr,
                recv_src_k=hd.recv_src_k.data.ptr, layout_begin=hd.layout_begin.data.ptr,
                layout_count=hd.layout_count.data.ptr, combine_slot=hd.combine_slot.data.ptr,
                src_tokens=hd.src_tokens.data.ptr)


@pytest.mark.parametrize("fp8", [False, True])
def test_ll_fused_dispatch_packs_ll_dispatch_params(ll, fp8):
    T, K = 10, 4
    x, idx = FakeArray((T, 512), np.uint16), FakeArray((T, K), np.int64)
    ll._guarded_sends = 1                     # after two in flight: this send is guarded
    recv_x, recv_scales, _, hd = ll.dispatch(x, idx, fp8, fp8, fp8, contextlib.nullcontext())
    (launch,) = ll.module.launches
    assert launch[:3] == ("ll_dispatch", (24,), (512,)) and launch[4] == {}
    assert (recv_scales is not None) == fp8
    assert unpack(LL_DISPATCH_PARAMS, launch) == dict(
        x=x.data.ptr, topk_idx=idx.data.ptr, counts=ll.counts.data.ptr, topk_slots=hd.topk_slots.data.ptr,
        peer_regions=ll.peer_regions.data.ptr, guard=1, **_recv_words(recv_x, recv_scales, hd),
        **_ll_team(ll, 0, 0, T, K, fp8, fp8, fp8))   # both counters from the first one
    assert ll._guarded_sends == 0


def test_ll_dispatch_send_and_recv_pack_their_params(ll):
    T, K = 10, 4
    x, idx = FakeArray((T, 512), np.uint16), FakeArray((T, K), np.int64)
    pending = ll.dispatch_send(x, idx, True, True, False, contextlib.nullcontext())
    ll.dispatch_recv(pending, contextlib.nullcontext())
    send, recv = ll.module.launches
    hd = pending.handle
    assert send[:3] == ("ll_dispatch_send", (T,), (512,))     # a block per token, at most one per SM
    assert unpack(LL_DISPATCH_SEND_PARAMS, send) == dict(
        x=x.data.ptr, topk_idx=idx.data.ptr, counts=ll.counts.data.ptr, topk_slots=hd.topk_slots.data.ptr,
        peer_regions=ll.peer_regions.data.ptr, guard=0, **_ll_team(ll, 0, 0, T, K, 1, 1, 0))
    assert recv[:3] == ("ll_dispatch_recv", (24,), (512,))
    # the receive: operations received (seq[1]), its own last-block counter (done[1]), no round_scale
    assert unpack(LL_DISPATCH_RECV_PARAMS, recv) == dict(
        **_recv_words(pending.recv_x, pending.recv_scales, hd), **_ll_team(ll, 8, 4, T, K, 1, 0, 0))


def _ll_handle(ll):
    """A dispatch's handle (sent and received) and the launches cleared."""
    pending = ll.dispatch_send(FakeArray((10, 512), np.uint16), FakeArray((10, 4), np.int64), False, False, False,
                               contextlib.nullcontext())
    ll.dispatch_recv(pending, contextlib.nullcontext())
    ll.module.launches.clear()
    return pending.handle


@pytest.mark.parametrize("tma, reduce_warps", [(False, 0), (True, 4)])
def test_ll_fused_combine_packs_ll_combine_params(ll, monkeypatch, tma, reduce_warps):
    hd = _ll_handle(ll)
    monkeypatch.setattr(settings, "ll_combine_tma", tma)
    monkeypatch.setattr(settings, "ll_combine_reduce_warps", reduce_warps)
    x = FakeArray((4, 256, 512), np.uint16)
    idx, w = FakeArray((10, 4), np.int64), FakeArray((10, 4), np.float32)
    out = ll.combine(x, hd, idx, w, None, contextlib.nullcontext())
    (launch,) = ll.module.launches
    assert launch[:3] == ("ll_combine", (24,), (512,))
    assert launch[4] == {"shared_mem": low_latency.TMA_SMEM_BYTES if tma else 0}
    assert unpack(LL_COMBINE_PARAMS, launch) == dict(
        x=x.data.ptr, combine_slot=hd.combine_slot.data.ptr, src_tokens=hd.src_tokens.data.ptr, topk_idx=idx.data.ptr,
        topk_weights=w.data.ptr, out=out.data.ptr, topk_slots=hd.topk_slots.data.ptr,
        peer_regions=ll.peer_regions.data.ptr, guard=0, use_tma=int(tma), reduce_warps=reduce_warps,
        **_ll_team(ll, 0, 8, 10, 4))   # both counters, the combine's pair of last-block counters


def test_ll_combine_send_and_recv_pack_their_params(ll, monkeypatch):
    hd = _ll_handle(ll)
    monkeypatch.setattr(settings, "ll_combine_tma", True)
    x = FakeArray((4, 256, 512), np.uint16)
    idx, w, out = FakeArray((10, 4), np.int64), FakeArray((10, 4), np.float32), FakeArray((10, 512), np.uint16)
    pending = ll.combine_send(x, hd, contextlib.nullcontext())
    assert ll.combine_recv(pending, idx, w, out, contextlib.nullcontext()) is out
    send, recv = ll.module.launches
    assert send[:3] == ("ll_combine_send", (24,), (512,)) and send[4] == {"shared_mem": low_latency.TMA_SMEM_BYTES}
    assert unpack(LL_COMBINE_SEND_PARAMS, send) == dict(
        x=x.data.ptr, combine_slot=hd.combine_slot.data.ptr, src_tokens=hd.src_tokens.data.ptr,
        peer_regions=ll.peer_regions.data.ptr, guard=0, use_tma=1, **_ll_team(ll, 0, 8, 10, 4))
    # a warp per (token, 256 channels): 10 x 2 warp items in blocks of 8 warps
    assert recv[:3] == ("ll_combine_recv", (3,), (low_latency.RECV_THREADS,)) and recv[4] == {}
    assert unpack(LL_COMBINE_RECV_PARAMS, recv) == dict(
        topk_idx=idx.data.ptr, topk_weights=w.data.ptr, out=out.data.ptr, topk_slots=hd.topk_slots.data.ptr,
        **_ll_team(ll, 8, 12, 10, 4))


def test_ll_send_guard_word_follows_the_operations_in_flight(ll):
    """Two sends in flight, both hooks, then the next two sends carry guard = 1 (as the positional
    int32 did); the packing reads the guard once per launch."""
    for _ in range(4):
        ll.dispatch_send(FakeArray((10, 512), np.uint16), FakeArray((10, 4), np.int64), False, False, False,
                         contextlib.nullcontext())
        if len(ll.pending) == 2:
            for p in list(ll.pending):
                ll.dispatch_recv(p, contextlib.nullcontext())
    guards = [unpack(LL_DISPATCH_SEND_PARAMS, launch)["guard"] for launch in ll.module.launches
              if launch[0] == "ll_dispatch_send"]
    assert guards == [0, 0, 1, 1]


# ---- the layout launch site ---------------------------------------------------------------------
@pytest.mark.parametrize("num_ranks, ranks_per_node", [(4, 4), (16, 8)])
def test_layout_launch_packs_dispatch_layout_params(monkeypatch, num_ranks, ranks_per_node):
    import cupy
    monkeypatch.setattr(cupy, "empty", lambda shape, dtype=np.float32: FakeArray(shape, dtype))
    k = object.__new__(LayoutKernel)
    k.num_ranks, k.ranks_per_node, k.num_nodes = num_ranks, ranks_per_node, num_ranks // ranks_per_node
    k._workspace = FakeArray(4096, np.int32)      # big enough: not reallocated
    module = Recorder()
    k._kernel = module["get_dispatch_layout"]
    T, K, E = 300, 4, 64
    idx = FakeArray((T, K), np.int64)
    per_rank, per_rdma, per_expert, in_rank = k(idx, E, contextlib.nullcontext(), error_record_ptr=0xE0000, rank=3)
    (launch,) = module.launches
    assert launch[1:3] == ((2,), (256,)) and launch[4] == {"shared_mem": (E + num_ranks + k.num_nodes) * 4}
    assert (per_rdma is None) == (k.num_nodes == 1)
    assert unpack(LAYOUT_PARAMS, launch) == dict(
        topk_idx=idx.data.ptr, num_tokens_per_rank=per_rank.data.ptr,
        num_tokens_per_rdma_rank=0 if per_rdma is None else per_rdma.data.ptr,
        num_tokens_per_expert=per_expert.data.ptr, is_token_in_rank=in_rank.data.ptr,
        workspace=k._workspace.data.ptr, err=0xE0000, num_tokens=T, num_topk=K, num_experts=E, rank=3)
    module.launches.clear()
    k(idx, E, contextlib.nullcontext())            # no error record: 0, rank -1
    words = unpack(LAYOUT_PARAMS, module.launches[0])
    assert words["err"] == 0 and words["rank"] == -1


def test_handles_list_the_arrays_their_kernels_read():
    """IntranodeHandle / InternodeHandle.device_arrays: what an async dispatch or combine keeps alive
    with its event (a caller may drop the handle first); None fields are left out."""
    from deepep_cupy.internode import InternodeHandle
    T, rows = 8, 5
    in_rank, send_pos, info, src = (FakeArray((T, 4), np.bool_), FakeArray((T, 4), np.int32), FakeArray(13, np.int32),
                                    FakeArray(rows, np.int32))
    h = IntranodeHandle(in_rank, send_pos, info, src, T, rows, rows, 0, 16, 256)
    assert h.device_arrays() == (in_rank, send_pos, info, src)
    cached_only = IntranodeHandle(in_rank, send_pos, info, None, T, rows, rows, 0, 16, 256)
    assert cached_only.device_arrays() == (in_rank, send_pos, info)
    tags, dest, perm, src2 = (FakeArray(rows, np.int32) for _ in range(4))
    both = InternodeHandle(h, cached_only, tags, dest, perm, src2, False, T, rows, rows, 0, 16, 256)
    assert both.device_arrays() == h.device_arrays() + cached_only.device_arrays() + (tags, dest, perm, src2)
    one_per_node = InternodeHandle(h, None, None, None, None, src2, False, T, rows, rows, 0, 16, 256)
    assert one_per_node.device_arrays() == h.device_arrays() + (src2,)
