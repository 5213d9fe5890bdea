"""JAX operations of deepep_cupy: dispatch, combine and the low-latency kernels inside ``jax.jit``.

``import deepep_cupy.jaxep as epj`` (the module is not called ``jax``: a file of that name inside
the package would shadow the real ``jax`` for any script run from the package folder). Every function
takes the ``deepep_cupy.Buffer`` as its first argument, is an ordinary JAX operation (usable eagerly,
under ``jax.jit`` and, for the high-throughput ones, under ``jax.grad``), and works on both backends:

* ``backend="gpu"``: the call becomes ``jax.experimental.buffer_callback`` (an XLA FFI custom call).
  At run time XLA hands the callback its CUDA stream and its device buffers; the Buffer's kernels run
  on that stream (the communication stream is ordered after it and joined back, as for any eager
  call), reading XLA's input buffers in place. Nothing waits on the host (dispatch uses
  ``num_worst_tokens``). Run on one H100 (2 ranks, MPS): docs/jax.md says what passed.
* ``backend="reference"``: the call becomes ``jax.experimental.io_callback(..., ordered=True)`` that
  runs the numpy reference backend across the MPI ranks. ``ordered=True`` threads XLA's effect token
  through every call, so each rank runs its collectives in program order (XLA's CPU runtime may
  otherwise run independent callbacks concurrently, in an order that differs between ranks), and XLA
  never removes or merges them.

Shapes are static, as jit needs:

* ``dispatch`` always pads to ``num_worst_tokens`` rows, the same on every rank (default
  ``num_ranks * T``: pass it when ranks hold different token counts). Padding rows: ``recv_x`` 0,
  ``recv_topk_idx`` -1, ``recv_topk_weights`` 0, ``handle.recv_src_idx`` -1, on both backends.
* ``low_latency_dispatch`` returns DeepEP's fixed ``[L, R*M, ...]`` layout; slots past
  ``recv_count[l]`` hold 0 (and -1 in the handle), on both backends.

Handles are pytrees of arrays (:class:`DispatchHandle`, :class:`LowLatencyHandle`): they cross jit
boundaries, ``jax.lax`` control flow and ``custom_vjp`` residuals like any array; the callback turns
them back into the backend's handle object.

Differentiation (``jax.custom_vjp``, DeepEP's autograd convention):

* ``dispatch``: the cotangent of ``x`` is the ``combine`` of the cotangent of ``recv_x``; that of
  ``topk_weights`` is the combined cotangent of ``recv_topk_weights`` (its non-local and padding
  entries masked out: they do not depend on the weights).
* ``cached_dispatch``: the cotangent of ``x`` is the ``combine`` of the cotangent of ``recv_x``.
* ``combine``: the cotangents of ``x`` and ``topk_weights`` are cached dispatches of the output
  cotangents.

The low-latency pair and FP8 inputs are not differentiable (decode, quantised data).

Every rank must run the same sequence of these operations (the same jitted program). Do not mix
eager ``Buffer`` calls with jitted ones still in flight: call ``block_until_ready`` on the jitted
results first (JAX dispatches asynchronously, and the eager call would overtake them).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import weakref
from typing import Optional, Tuple

import numpy as np

try:
    import jax
    import jax.numpy as jnp
    from jax.experimental import io_callback
    from jax._src import core as _jax_core   # older JAX's trace context, for _current_trace
    try:
        from jax.extend.core import get_opaque_trace_state as _get_trace_state
    except ImportError:  # pragma: no cover - older JAX
        _get_trace_state = None
except ImportError as _e:  # pragma: no cover - exercised only without jax
    raise ImportError("deepep_cupy.jaxep needs JAX: pip install jax (CPU) or jax[cuda13] (GPU)") from _e

from .errors import DeepEPInvalid, DeepEPTypeError

__all__ = ["DispatchHandle", "LowLatencyHandle", "dispatch", "cached_dispatch", "combine",
           "low_latency_dispatch", "low_latency_combine", "num_recv_tokens_per_expert", "use_local_gpu"]

_FP8 = "float8_e4m3fn"


# ------------------------------------------------------------------------------------------------
# Handles: pytrees of arrays with static metadata
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _HandleMeta:
    """Static facts of a dispatch (hashable: the pytree's aux data, part of jit's cache key)."""

    backend: str           # "reference" or "gpu": which array set the handle holds
    num_ranks: int
    num_tokens: int        # T of this rank
    num_worst_tokens: int  # W: rows of every dispatch output
    num_experts: int
    hidden: int            # H of the dispatch that made the handle
    names: Tuple[str, ...]


class _ArrayHandle:
    """A handle as a pytree: its arrays are the leaves (they cross jit, custom_vjp residuals and
    scan), its meta (static shapes, flags, the arrays' names) the aux data; each array reads as
    the attribute of its name."""

    def __init__(self, arrays: tuple, meta):
        self.arrays = tuple(arrays)
        self.meta = meta

    def tree_flatten(self):
        return self.arrays, self.meta

    @classmethod
    def tree_unflatten(cls, meta, arrays):
        return cls(arrays, meta)

    def __getattr__(self, name):
        meta = self.__dict__.get("meta")
        if meta is not None and name in meta.names:
            return self.arrays[meta.names.index(name)]
        raise AttributeError(name)


@jax.tree_util.register_pytree_node_class
class DispatchHandle(_ArrayHandle):
    """The routing of one high-throughput :func:`dispatch`, as arrays; drives :func:`combine` and
    :func:`cached_dispatch`. Treat it as opaque: its arrays depend on the backend.

    Always present: ``is_token_in_rank`` (bool ``[T, R]``) and ``recv_src_idx`` (int32 ``[W]``,
    source token of each received row, -1 for padding). Reference backend: also
    ``rank_prefix_matrix`` (int32 ``[R, R]``), ``recv_src_rank`` (int32 ``[W]``) and
    ``src_num_tokens`` (int32 ``[R]``). GPU backend: ``send_pos`` (int32 ``[T, R]``) and
    ``recv_info`` (int32 ``[2R+1+L]``).
    """

    @property
    def num_worst_tokens(self) -> int:
        """Rows of every dispatch output (static)."""
        return self.meta.num_worst_tokens

    @property
    def num_tokens(self) -> int:
        """Tokens this rank dispatched (static)."""
        return self.meta.num_tokens

    @property
    def valid(self):
        """bool ``[W]``: which received rows are real (not padding)."""
        return self.recv_src_idx >= 0

    def __repr__(self) -> str:
        m = self.meta
        return (f"DispatchHandle(backend={m.backend}, num_tokens={m.num_tokens}, "
                f"num_worst_tokens={m.num_worst_tokens}, num_experts={m.num_experts})")


@dataclasses.dataclass(frozen=True)
class _LowLatencyMeta:
    backend: str
    num_ranks: int
    num_tokens: int
    num_topk: int
    hidden: int
    num_experts: int
    num_max_dispatch_tokens_per_rank: int
    use_fp8: bool
    use_ue8m0: bool
    names: Tuple[str, ...]


@jax.tree_util.register_pytree_node_class
class LowLatencyHandle(_ArrayHandle):
    """The layout of one :func:`low_latency_dispatch`, as arrays; drives :func:`low_latency_combine`.

    Always present: ``recv_src_info`` and ``recv_src_k`` (int32 ``[L, R*M]``, source token and top-k
    slot of each received entry, -1 in unused slots), ``layout_begin`` and ``layout_count`` (int32
    ``[L, R]``). GPU backend: also ``recv_count``, ``topk_slots``, ``combine_slot`` and
    ``src_tokens`` (see ``deepep_cupy.low_latency.LowLatencyHandle``).
    """

    def __repr__(self) -> str:
        m = self.meta
        return (f"LowLatencyHandle(backend={m.backend}, num_tokens={m.num_tokens}, num_topk={m.num_topk}, "
                f"M={m.num_max_dispatch_tokens_per_rank}, num_experts={m.num_experts})")


def _handle_specs(backend: str, num_ranks: int, num_tokens: int, num_worst_tokens: int,
                  num_experts: int) -> tuple:
    """(name, shape, dtype) of a DispatchHandle's arrays on ``backend``."""
    t, r, w = num_tokens, num_ranks, num_worst_tokens
    if backend == "reference":
        return (("is_token_in_rank", (t, r), np.bool_), ("rank_prefix_matrix", (r, r), np.int32),
                ("recv_src_rank", (w,), np.int32), ("recv_src_idx", (w,), np.int32),
                ("src_num_tokens", (r,), np.int32))
    num_local = num_experts // num_ranks
    return (("is_token_in_rank", (t, r), np.bool_), ("send_pos", (t, r), np.int32),
            ("recv_info", (2 * r + 1 + num_local,), np.int32), ("recv_src_idx", (w,), np.int32))


def _ll_handle_specs(backend: str, num_ranks: int, num_tokens: int, num_topk: int, num_experts: int,
                     m: int) -> tuple:
    """(name, shape, dtype) of a LowLatencyHandle's arrays on ``backend``."""
    r, num_local = num_ranks, num_experts // num_ranks
    common = (("recv_src_info", (num_local, r * m), np.int32), ("recv_src_k", (num_local, r * m), np.int32),
              ("layout_begin", (num_local, r), np.int32), ("layout_count", (num_local, r), np.int32))
    if backend == "reference":
        return common
    return common + (("recv_count", (num_local,), np.int32), ("topk_slots", (num_tokens, num_topk), np.int32),
                     ("combine_slot", (r, m, num_topk), np.int32), ("src_tokens", (r,), np.int32))


def _sds(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(int(s) for s in shape), np.dtype(dtype) if not isinstance(dtype, str)
                                else _np_dtype(dtype))


def _np_dtype(name: str) -> np.dtype:
    if name in ("bfloat16", _FP8):
        import ml_dtypes
        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


# ------------------------------------------------------------------------------------------------
# Backend operations. Each op has a reference form (numpy in, numpy out, run by io_callback) and a
# GPU form (CuPy views of XLA's buffers in, written into XLA's output buffers, run by buffer_callback
# on XLA's stream).
# ------------------------------------------------------------------------------------------------


def _alive(ref):
    """The Buffer behind a weak reference (a compiled program may outlive it)."""
    buf = ref()
    if buf is None:
        raise DeepEPInvalid("buf: the Buffer this JAX program was traced with no longer exists")
    return buf


def _adopt(buf, handle):
    """Make ``buf`` accept a handle rebuilt from arrays (``Buffer.adopt_handle``): these were built
    from arrays that this buffer's dispatch produced and JAX carried."""
    return buf.adopt_handle(handle)


@dataclasses.dataclass(frozen=True)
class _DispatchSpec:
    fp8: bool
    idx_dtype: str
    with_weights: bool
    expert_alignment: int


@dataclasses.dataclass(frozen=True)
class _LowLatencySpec:
    round_scale: bool


class _ReferenceOps:
    """The five operations on the CPU reference backend: numpy arrays in (from io_callback), numpy
    arrays out. ``outs`` is always None here (the GPU form writes into it instead)."""

    backend = "reference"
    device_id = None

    def __init__(self, buf):
        self._buf = weakref.ref(buf)   # weak: _OPS is keyed weakly by the buffer
        self.callbacks: dict = {}      # see _call

    buf = property(lambda self: _alive(self._buf))

    # handles ----------------------------------------------------------------------------------
    @staticmethod
    def handle_arrays(h, names) -> tuple:
        by_name = dict(is_token_in_rank=h.is_token_in_rank, rank_prefix_matrix=h.rank_prefix_matrix,
                       recv_src_rank=h.recv_src_rank, recv_src_idx=h.recv_src_idx,
                       src_num_tokens=np.asarray(h.src_num_tokens, dtype=np.int32))
        return tuple(by_name[n] for n in names)

    def rebuild(self, meta: _HandleMeta, arrays):
        """The ReferenceDispatchHandle the arrays describe (registered with the buffer)."""
        from .reference_backend import ReferenceDispatchHandle
        a = dict(zip(meta.names, arrays))
        prefix = np.ascontiguousarray(a["rank_prefix_matrix"], dtype=np.int32)
        h = ReferenceDispatchHandle(
            is_token_in_rank=np.ascontiguousarray(a["is_token_in_rank"], dtype=bool), rank_prefix_matrix=prefix,
            recv_src_rank=np.ascontiguousarray(a["recv_src_rank"], dtype=np.int32),
            recv_src_idx=np.ascontiguousarray(a["recv_src_idx"], dtype=np.int32),
            num_tokens=meta.num_tokens, num_recv_tokens=int(prefix[-1, self.buf.rank]),
            num_worst_tokens=meta.num_worst_tokens, num_experts=meta.num_experts, hidden=meta.hidden,
            src_num_tokens=tuple(int(v) for v in a["src_num_tokens"]))
        return _adopt(self.buf, h)

    # high throughput --------------------------------------------------------------------------
    def dispatch(self, outs, meta: _HandleMeta, spec: _DispatchSpec, x, scales, idx, w) -> tuple:
        buf = self.buf
        idx64 = np.ascontiguousarray(idx, dtype=np.int64)
        per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx64, meta.num_experts)
        recv, recv_idx, recv_w, _, h, _ = buf.dispatch(
            (x, scales) if spec.fp8 else x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert, topk_idx=idx64, topk_weights=w,
            expert_alignment=spec.expert_alignment, num_worst_tokens=meta.num_worst_tokens)
        res = list(recv) if spec.fp8 else [recv]
        res.append(recv_idx)
        if w is not None:
            res.append(recv_w)
        return tuple(res) + self.handle_arrays(h, meta.names)

    def cached_dispatch(self, outs, meta: _HandleMeta, fp8: bool, x, scales, harrays) -> tuple:
        h = self.rebuild(meta, harrays)
        recv, _, _, _, _, _ = self.buf.dispatch((x, scales) if fp8 else x, handle=h)
        return tuple(recv) if fp8 else (recv,)

    def combine(self, outs, meta: _HandleMeta, x, w, harrays) -> tuple:
        h = self.rebuild(meta, harrays)
        out, out_w, _ = self.buf.combine(x, h, topk_weights=w)
        return (out,) if w is None else (out, out_w)

    # low latency ------------------------------------------------------------------------------
    def ll_dispatch(self, outs, meta: _LowLatencyMeta, spec: _LowLatencySpec, x, idx) -> tuple:
        recv, count, h, _, _ = self.buf.low_latency_dispatch(
            x, np.ascontiguousarray(idx, dtype=np.int64), meta.num_max_dispatch_tokens_per_rank,
            meta.num_experts, use_fp8=meta.use_fp8, round_scale=spec.round_scale, use_ue8m0=meta.use_ue8m0)
        res = tuple(recv) if meta.use_fp8 else (recv,)
        return res + (count, h.recv_src_info, h.recv_src_k, h.layout_begin, h.layout_count)

    def ll_combine(self, outs, meta: _LowLatencyMeta, x, idx, w, harrays) -> tuple:
        from .reference_backend import ReferenceLowLatencyHandle
        a = {n: np.ascontiguousarray(v, dtype=np.int32) for n, v in zip(meta.names, harrays)}
        h = _adopt(self.buf, ReferenceLowLatencyHandle(
            recv_src_info=a["recv_src_info"], recv_src_k=a["recv_src_k"], layout_begin=a["layout_begin"],
            layout_count=a["layout_count"], num_max_dispatch_tokens_per_rank=meta.num_max_dispatch_tokens_per_rank,
            hidden=meta.hidden, num_experts=meta.num_experts, num_tokens=meta.num_tokens, use_fp8=meta.use_fp8,
            use_ue8m0=meta.use_ue8m0, num_topk=meta.num_topk))
        out, _, _ = self.buf.low_latency_combine(x, np.ascontiguousarray(idx, dtype=np.int64), w, h)
        return (out,)


class _GpuOps:
    """The five operations on the GPU backend: CuPy views of XLA's buffers in, results written into
    XLA's output buffers ``outs``, everything queued on XLA's stream (the current CuPy stream inside
    the callback). Run on one H100 (2 ranks, MPS): docs/jax.md says what passed.

    Copies that remain until Buffer takes output arrays (docs/jax.md): dispatch outputs come from the
    buffer's receive arena and are copied into XLA's buffers (the padding rows zeroed in the same
    pass), and so is the high-throughput combine's output. The low-latency combine writes straight
    into XLA's output (``out=``).
    """

    backend = "gpu"

    def __init__(self, buf):
        if buf.num_nodes > 1:
            raise NotImplementedError(
                "deepep_cupy.jaxep: the hierarchical (internode) handle cannot travel as JAX arrays yet; "
                "on the GPU jaxep supports one NVLink domain (ranks_per_node == num_ranks)")
        self._buf = weakref.ref(buf)   # weak: _OPS is keyed weakly by the buffer
        self.device_id = buf.device_id
        self.callbacks: dict = {}      # see _call
        self.chain = None              # (the trace's opaque state, its last order token): _chain_token
        self.executed = collections.deque(maxlen=64)   # (op, first input address) as run: _make_callback

    buf = property(lambda self: _alive(self._buf))

    # handles ----------------------------------------------------------------------------------
    def rebuild(self, meta: _HandleMeta, arrays):
        """The IntranodeHandle the arrays describe (registered with the buffer)."""
        import cupy
        from .intranode import IntranodeHandle
        a = dict(zip(meta.names, arrays))
        # the staged kernel rewrites recv_src_idx in cached mode (with the same values): it gets a
        # copy, XLA's input buffers are not ours to write
        h = IntranodeHandle(is_token_in_rank=a["is_token_in_rank"], send_pos=a["send_pos"], recv_info=a["recv_info"],
                            recv_src_idx=cupy.array(a["recv_src_idx"]), num_tokens=meta.num_tokens,
                            num_rows=meta.num_worst_tokens, num_recv_tokens=-1,
                            num_worst_tokens=meta.num_worst_tokens, num_experts=meta.num_experts, hidden=meta.hidden)
        return _adopt(self.buf, h)

    # high throughput --------------------------------------------------------------------------
    def dispatch(self, outs, meta: _HandleMeta, spec: _DispatchSpec, x, scales, idx, w) -> None:
        import cupy
        buf = self.buf
        idx64 = idx.astype(cupy.int64)
        per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx64, meta.num_experts)
        recv, recv_idx, recv_w, _, h, _ = buf.dispatch(
            (x, scales) if spec.fp8 else x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert, topk_idx=idx64, topk_weights=w,
            expert_alignment=spec.expert_alignment, num_worst_tokens=meta.num_worst_tokens)
        valid = h.recv_src_idx >= 0          # the kernels leave the padding rows of recv_x unwritten
        outs = list(outs)
        for arr in (recv if spec.fp8 else (recv,)):
            _masked_copy(outs.pop(0), arr, valid)
        _copy(outs.pop(0), recv_idx)          # padding rows are -1 already; int64 -> the caller's dtype
        if w is not None:
            _copy(outs.pop(0), recv_w)        # padding rows are 0 already
        by_name = dict(is_token_in_rank=in_rank, send_pos=h.send_pos, recv_info=h.recv_info,
                       recv_src_idx=h.recv_src_idx)
        for name, out in zip(meta.names, outs):
            _copy(out, by_name[name])

    def cached_dispatch(self, outs, meta: _HandleMeta, fp8: bool, x, scales, harrays) -> None:
        h = self.rebuild(meta, harrays)
        recv, _, _, _, _, _ = self.buf.dispatch((x, scales) if fp8 else x, handle=h)
        valid = h.recv_src_idx >= 0
        for out, arr in zip(outs, recv if fp8 else (recv,)):
            _masked_copy(out, arr, valid)

    def combine(self, outs, meta: _HandleMeta, x, w, harrays) -> None:
        h = self.rebuild(meta, harrays)
        out, out_w, _ = self.buf.combine(x, h, topk_weights=w)
        _copy(outs[0], out)
        if w is not None:
            _copy(outs[1], out_w)

    # low latency ------------------------------------------------------------------------------
    def ll_dispatch(self, outs, meta: _LowLatencyMeta, spec: _LowLatencySpec, x, idx) -> None:
        import cupy
        recv, count, h, _, _ = self.buf.low_latency_dispatch(
            x, idx.astype(cupy.int64), meta.num_max_dispatch_tokens_per_rank, meta.num_experts,
            use_fp8=meta.use_fp8, round_scale=spec.round_scale, use_ue8m0=meta.use_ue8m0)
        slots = meta.num_ranks * meta.num_max_dispatch_tokens_per_rank
        # slots past recv_count are uninitialised on the GPU: zero them (-1 in the handle), as the
        # reference backend does, so that both backends give the same arrays
        valid = cupy.arange(slots, dtype=cupy.int32)[None, :] < count[:, None]
        outs = list(outs)
        for arr in (recv if meta.use_fp8 else (recv,)):
            _masked_copy(outs.pop(0), arr, valid)
        _copy(outs.pop(0), count)
        for name, out in zip(meta.names, outs):
            arr = getattr(h, name)
            if name in ("recv_src_info", "recv_src_k"):
                _masked_copy(out, arr, valid, fill=-1)
            else:
                _copy(out, arr)

    def ll_combine(self, outs, meta: _LowLatencyMeta, x, idx, w, harrays) -> None:
        import cupy
        from .low_latency import LowLatencyHandle as GpuLowLatencyHandle
        h = _adopt(self.buf, GpuLowLatencyHandle(
            **dict(zip(meta.names, harrays)), num_tokens=meta.num_tokens, num_experts=meta.num_experts,
            hidden=meta.hidden, num_topk=meta.num_topk, use_fp8=meta.use_fp8, use_ue8m0=meta.use_ue8m0,
            num_max_dispatch_tokens_per_rank=meta.num_max_dispatch_tokens_per_rank))
        # the kernels read the handle's arrays and x in place and write straight into XLA's output
        self.buf.low_latency_combine(x, idx.astype(cupy.int64), w, h, out=outs[0])


# --- CuPy helpers of the GPU form ---------------------------------------------------------------

_MASKED_COPY_KERNEL = None


def _unsigned(itemsize: int) -> np.dtype:
    return np.dtype({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[itemsize])


def _copy(dst, src) -> None:
    """``dst[...] = src`` on the current stream: a bit copy when the dtypes match, else a cast."""
    if dst.size == 0:
        return
    if dst.dtype == src.dtype and dst.dtype.kind != "b":
        u = _unsigned(dst.dtype.itemsize)
        dst.view(u)[...] = src.view(u)
    else:
        dst[...] = src


def _masked_copy(dst, src, valid, fill: int = 0) -> None:
    """``dst = src`` where ``valid`` else ``fill``, one kernel on the current stream. ``valid`` holds
    one flag per leading index (a row of ``dst.size // valid.size`` elements). Float data is copied
    as raw bits, so ``fill=0`` writes +0.0."""
    import cupy
    global _MASKED_COPY_KERNEL
    if dst.size == 0:
        return
    if _MASKED_COPY_KERNEL is None:
        _MASKED_COPY_KERNEL = cupy.ElementwiseKernel(
            "T src, raw bool valid, int64 row, T fill", "T dst",
            "dst = valid[i / row] ? src : fill", "deepep_cupy_jaxep_masked_copy")
    valid = cupy.ascontiguousarray(valid)
    row = dst.size // max(1, valid.size)
    if src.dtype.kind in "iu" and src.dtype == dst.dtype:
        s, d = src, dst
    else:
        u = _unsigned(dst.dtype.itemsize)
        s, d = cupy.ascontiguousarray(src).view(u), dst.view(u)
    _MASKED_COPY_KERNEL(cupy.ascontiguousarray(s), valid, row, s.dtype.type(fill), d)


def _c_strides(shape, itemsize: int) -> tuple:
    strides, acc = [], itemsize
    for s in reversed(shape):
        strides.append(acc)
        acc *= s
    return tuple(reversed(strides))


def _cupy_view(xla_buffer, dtype: np.dtype, device_id: int):
    """A CuPy array over an XLA device buffer (no copy; the buffer object is kept as its owner).
    bfloat16 stays CuPy bfloat16; FP8 becomes uint8 storage (CuPy has no FP8 dtype; Buffer accepts
    uint8 for e4m3 data)."""
    import cupy
    shape = tuple(int(s) for s in xla_buffer.shape)
    storage = np.dtype(np.uint8) if dtype.name.startswith("float8") else dtype
    if math.prod(shape) == 0:
        return cupy.empty(shape, storage)
    cai = xla_buffer.__cuda_array_interface__
    strides = cai.get("strides")
    if strides is not None and tuple(strides) != _c_strides(shape, storage.itemsize):
        raise DeepEPInvalid(f"an XLA buffer of shape {shape} is not row-major (strides {strides})")
    mem = cupy.cuda.UnownedMemory(int(cai["data"][0]), math.prod(shape) * storage.itemsize, xla_buffer, device_id)
    return cupy.ndarray(shape, storage, cupy.cuda.MemoryPointer(mem, 0))


# ------------------------------------------------------------------------------------------------
# Calling an operation from JAX
# ------------------------------------------------------------------------------------------------

_OPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _ops_for(buf):
    """The operation set of ``buf`` (one per Buffer, dropped with it)."""
    if not buf.alive:   # raised here, at trace time
        raise DeepEPInvalid("buf: this Buffer was destroyed")
    ops = _OPS.get(buf)
    if ops is None:
        if buf.backend_name == "gpu":
            if jax.default_backend() != "gpu":
                raise DeepEPInvalid(f"deepep_cupy.jaxep: the Buffer runs on the GPU but JAX's default backend is "
                                    f"{jax.default_backend()!r}: install jax[cuda13], or use backend='reference'")
            ops = _GpuOps(buf)
        else:
            ops = _ReferenceOps(buf)
        _OPS[buf] = ops
    return ops


def _current_trace():
    """An opaque, comparable name of the JAX trace that operations are being staged into
    (``jax.extend.core.get_opaque_trace_state``; where that is missing or takes other arguments,
    JAX's internal trace context), or None when neither answers (then no chaining: see
    ``_chain_token``; tests/test_jaxep_order.py checks that the installed JAX answers)."""
    if _get_trace_state is not None:
        for args in ((), (None,)):
            try:
                return _get_trace_state(*args)
            except TypeError:
                continue
            except Exception:   # pragma: no cover - no trace (JAX asserts one exists)
                break
    ctx = getattr(_jax_core, "trace_ctx", None)
    return getattr(getattr(ctx, "trace", None), "_weakref", None)


def _chain_token(ops, trace):
    """The order token of the last operation staged into ``trace`` on this buffer, or a new one.

    XLA orders custom calls only by data dependence: two collectives with no dependence between them
    (two micro-batches' dispatches, the backward pass's combine beside a later layer's dispatch) may
    be scheduled in different orders on ranks whose programs differ (different token counts give
    different cost estimates; seen on the GPU: a rank ran its third dispatch first), and each rank
    then meets a different collective of its peers. So every GPU callback takes the previous one's
    token as an extra input and returns a new one: a chain of data dependences in program order, per
    buffer and per trace. The public functions fetch the token here, in the caller's trace, and pass
    it through their ``custom_vjp`` as an ordinary float32 ``[1]`` input and output (a token looked up
    inside the custom_vjp would belong to its private trace and chain nothing). Its cotangent chains
    the backward pass the same way, in reverse: the gradient of an operation's output token is the
    token the next operation's backward returned; and each backward callback also takes its own
    forward's output token (a residual), so the backward chain starts after the whole forward chain
    staged before it (the last operation's output token has no user, so its cotangent is a
    constant). (The reference backend gets the order from ``io_callback(ordered=True)``; the token
    passes through it untouched.) Operations staged in different traces (a ``lax.scan`` body and
    the code around it) are ordered only by their data.
    """
    if ops.backend == "reference":
        return jnp.zeros((1,), jnp.float32)
    if trace is not None and ops.chain is not None:
        state, token = ops.chain
        if state == trace:
            return token
    ops.chain = None        # the chain's trace ended or is not this one: drop its tracer
    return jnp.zeros((1,), jnp.float32)


def _in_order(ops, op, *args) -> list:
    """``op(*args, token)`` chained after the last operation staged on this buffer in the current
    trace (``_chain_token``). ``op`` returns its outputs followed by its own token, which the next
    operation takes; the outputs come back as a list."""
    trace = _current_trace()
    *outs, token = op(*args, _chain_token(ops, trace))
    if trace is not None and ops.backend != "reference":
        ops.chain = (trace, token)
    return outs


def _as_storage(a):
    """FP8 arrays as uint8 (a free bitcast): XLA's buffer objects cannot export F8E4M3FN through the
    CUDA array interface, and the kernels take e4m3 data as bytes anyway."""
    return jax.lax.bitcast_convert_type(a, jnp.uint8) if np.dtype(a.dtype).name.startswith("float8") else a


def _storage_spec(s):
    return jax.ShapeDtypeStruct(s.shape, np.uint8) if np.dtype(s.dtype).name.startswith("float8") else s


def _call(ops, result_specs: tuple, args: tuple, run, key: tuple, token):
    """Run ``run(outs, arrays)`` as one JAX operation with outputs ``result_specs``, ordered after
    the operation(s) whose order token is ``token`` (or a tuple of tokens: after all of them);
    returns ``(outputs, this operation's token)``.

    Reference backend: an ordered io_callback; ``run`` gets numpy arrays and returns the outputs
    (the token comes back unchanged: the io_callback's effect orders the calls).
    GPU: a side-effecting buffer_callback; inside it ``run`` gets CuPy views of XLA's input and
    output buffers, with XLA's stream current, and writes the outputs. FP8 inputs and outputs cross
    as uint8 (``_as_storage``); the token is one more input and output (``_chain_token``), whose
    value nobody reads (the callback leaves the output token unwritten).

    ``key`` (hashable) names everything static that ``run`` depends on: the callback made for a key
    is reused, so that eager calls hit JAX's compilation cache instead of compiling a new callback
    every time (under jit it only saves tracing work).
    """
    result_specs = tuple(result_specs)
    gpu = ops.backend != "reference"
    tokens = token if isinstance(token, tuple) else (token,)
    if gpu:
        want_specs = result_specs
        result_specs = tuple(_storage_spec(s) for s in result_specs) + (jax.ShapeDtypeStruct((1,), np.float32),)
        args = tuple(_as_storage(a) for a in args) + (
            jnp.concatenate([jnp.asarray(t, jnp.float32).reshape(-1) for t in tokens]),)
    full_key = (key, tuple((s.shape, np.dtype(s.dtype)) for s in result_specs),
                tuple((tuple(a.shape), np.dtype(a.dtype)) for a in args))
    callback = ops.callbacks.get(full_key)
    if callback is None:
        callback = _make_callback(ops, result_specs, tuple(np.dtype(a.dtype) for a in args), run, str(key[0]))
        if len(ops.callbacks) > 512:      # many shapes: start over rather than grow without end
            ops.callbacks.clear()
        ops.callbacks[full_key] = callback
    outs = list(callback(*args))
    if not gpu:
        return outs, tokens[0]
    token = outs.pop()
    return [o if np.dtype(o.dtype) == np.dtype(s.dtype) else jax.lax.bitcast_convert_type(o, s.dtype)
            for o, s in zip(outs, want_specs)], token


def _make_callback(ops, result_specs: tuple, in_dtypes: tuple, run, label: str = ""):
    """The JAX-callable for one (operation, shapes) of ``_call``. On the GPU the last input and the
    last output are the order token, which the callback leaves alone, and each execution appends
    ``(label, device address of its first input)`` to ``ops.executed`` (the last 64: which
    collectives a rank ran in which order, for a test or a hang to compare across ranks)."""
    if ops.backend == "reference":
        def host(*arrays):
            outs = run(None, arrays)
            return tuple(np.asarray(o).astype(s.dtype, copy=False).reshape(s.shape)
                         for o, s in zip(outs, result_specs))
        return lambda *args: io_callback(host, result_specs, *args, ordered=True)

    from jax.experimental.buffer_callback import ExecutionStage, buffer_callback
    out_dtypes = tuple(np.dtype(s.dtype) for s in result_specs[:-1])
    in_dtypes = in_dtypes[:-1]
    device_id = ops.device_id

    def on_stream(ctx, outs, *ins):
        if getattr(ctx, "stage", ExecutionStage.EXECUTE) != ExecutionStage.EXECUTE:
            return
        import cupy
        try:
            first = int(ins[0].__cuda_array_interface__["data"][0]) if len(ins) > 1 else 0
        except Exception:   # an empty buffer may export no address
            first = 0
        ops.executed.append((label, first))
        with cupy.cuda.Device(device_id):
            with cupy.cuda.ExternalStream(int(ctx.stream), device_id):
                run([_cupy_view(b, d, device_id) for b, d in zip(outs[:-1], out_dtypes)],
                    [_cupy_view(b, d, device_id) for b, d in zip(ins[:-1], in_dtypes)])

    return buffer_callback(on_stream, result_specs, has_side_effect=True)


# ------------------------------------------------------------------------------------------------
# Argument checks, at trace time (shapes and dtypes are static)
# ------------------------------------------------------------------------------------------------

def _dtype_name(a) -> str:
    return np.dtype(a.dtype).name


def _check_x(x, name: str = "x"):
    """``x`` bf16/float32 ``[T, H]`` or the FP8 pair: (data, scales or None, T, H)."""
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise DeepEPInvalid(f"{name}: an FP8 input is a pair (x_e4m3, scales), got {len(x)} items")
        data, scales = x
        if _dtype_name(data) != _FP8:
            raise DeepEPTypeError(f"{name}[0]: expected dtype {_FP8}, got {_dtype_name(data)}")
        if data.ndim != 2 or data.shape[1] % 128:
            raise DeepEPInvalid(f"{name}[0]: expected [T, H] with H a multiple of 128, got shape {tuple(data.shape)}")
        want = (int(data.shape[0]), int(data.shape[1]) // 128)
        if _dtype_name(scales) != "float32" or tuple(scales.shape) != want:
            raise DeepEPInvalid(f"{name}[1]: expected float32 {want}, got {_dtype_name(scales)} "
                                f"{tuple(scales.shape)}")
        return data, scales, int(data.shape[0]), int(data.shape[1])
    if not hasattr(x, "dtype") or _dtype_name(x) not in ("bfloat16", "float32"):
        raise DeepEPTypeError(f"{name}: expected a bfloat16 or float32 array, got "
                              f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.ndim != 2:
        raise DeepEPInvalid(f"{name}: expected 2 dimensions [T, H], got shape {tuple(x.shape)}")
    return x, None, int(x.shape[0]), int(x.shape[1])


def _check_idx(topk_idx, num_tokens: int, name: str = "topk_idx") -> int:
    if not hasattr(topk_idx, "dtype") or not jnp.issubdtype(topk_idx.dtype, jnp.integer):
        raise DeepEPTypeError(f"{name}: expected an integer array, got {getattr(topk_idx, 'dtype', type(topk_idx))}")
    if topk_idx.ndim != 2 or topk_idx.shape[0] != num_tokens or topk_idx.shape[1] < 1:
        raise DeepEPInvalid(f"{name}: expected shape ({num_tokens}, K>=1), got {tuple(topk_idx.shape)}")
    return int(topk_idx.shape[1])


def _check_weights(w, shape, name: str = "topk_weights") -> None:
    if w is None:
        return
    if not hasattr(w, "dtype") or _dtype_name(w) != "float32" or tuple(w.shape) != tuple(shape):
        raise DeepEPInvalid(f"{name}: expected float32 {tuple(shape)}, got "
                            f"{getattr(w, 'dtype', type(w).__name__)} {tuple(getattr(w, 'shape', ()))}")


def _check_handle(handle, kind, buf) -> None:
    if not isinstance(handle, kind):
        raise DeepEPTypeError(f"handle: expected the {kind.__name__} that deepep_cupy.jaxep returned, "
                              f"got {type(handle).__name__}")
    m = handle.meta
    if m.backend != buf.backend_name or m.num_ranks != buf.num_ranks:
        raise DeepEPInvalid(f"handle: made by a {m.backend} buffer of {m.num_ranks} ranks, this one is "
                            f"{buf.backend_name} with {buf.num_ranks}")


def _int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise DeepEPTypeError(f"{name}: expected a Python int (static under jit), got {type(value).__name__}")
    if value < minimum:
        raise DeepEPInvalid(f"{name}: expected >= {minimum}, got {value}")
    return int(value)


# ------------------------------------------------------------------------------------------------
# High-throughput operations without autodiff
# ------------------------------------------------------------------------------------------------

def _raw_dispatch(ops, meta: _HandleMeta, spec: _DispatchSpec, x, scales, idx, w, token):
    """(recv_x or pair, recv_idx, recv_w or None, handle arrays, order token)."""
    rows, k = meta.num_worst_tokens, int(idx.shape[1])
    specs = [_sds((rows, meta.hidden), x.dtype)]
    if spec.fp8:
        specs.append(_sds((rows, scales.shape[1]), np.float32))
    specs.append(_sds((rows, k), idx.dtype))
    if spec.with_weights:
        specs.append(_sds((rows, k), np.float32))
    specs += [_sds(shape, dt) for _, shape, dt in
              _handle_specs(meta.backend, meta.num_ranks, meta.num_tokens, rows, meta.num_experts)]
    args = (x,) + ((scales,) if spec.fp8 else ()) + (idx,) + ((w,) if spec.with_weights else ())

    def run(outs, a):
        a = list(a)
        ax = a.pop(0)
        ascales = a.pop(0) if spec.fp8 else None
        aidx = a.pop(0)
        aw = a.pop(0) if spec.with_weights else None
        return ops.dispatch(outs, meta, spec, ax, ascales, aidx, aw)

    outs, token = _call(ops, specs, args, run, ("dispatch", meta, spec), token)
    recv_x = outs.pop(0)
    if spec.fp8:
        recv_x = (recv_x, outs.pop(0))
    recv_idx = outs.pop(0)
    recv_w = outs.pop(0) if spec.with_weights else None
    return recv_x, recv_idx, recv_w, tuple(outs), token


def _raw_cached_dispatch(ops, meta: _HandleMeta, x, harrays, token):
    """(recv_x (a pair for FP8 ``x``) routed like the handle's dispatch, order token)."""
    data, scales, _, hidden = _check_x(x)
    fp8 = scales is not None
    rows = meta.num_worst_tokens
    specs = [_sds((rows, hidden), data.dtype)] + ([_sds((rows, scales.shape[1]), np.float32)] if fp8 else [])
    args = (data,) + ((scales,) if fp8 else ()) + tuple(harrays)

    def run(outs, a):
        a = list(a)
        ax = a.pop(0)
        ascales = a.pop(0) if fp8 else None
        return ops.cached_dispatch(outs, meta, fp8, ax, ascales, a)

    outs, token = _call(ops, specs, args, run, ("cached_dispatch", meta, fp8), token)
    return (tuple(outs) if fp8 else outs[0]), token


def _raw_combine(ops, meta: _HandleMeta, x, w, harrays, token):
    """(combined_x [T, H], combined_w [T, K] or None, order token)."""
    specs = [_sds((meta.num_tokens, x.shape[1]), x.dtype)]
    if w is not None:
        specs.append(_sds((meta.num_tokens, w.shape[1]), np.float32))
    args = (x,) + ((w,) if w is not None else ()) + tuple(harrays)
    with_w = w is not None

    def run(outs, a):
        a = list(a)
        ax = a.pop(0)
        aw = a.pop(0) if with_w else None
        return ops.combine(outs, meta, ax, aw, a)

    outs, token = _call(ops, specs, args, run, ("combine", meta, with_w), token)
    return outs[0], (outs[1] if with_w else None), token


def _pad_columns(a, multiple: int):
    """Pad a [N, K] array with zero columns to a multiple of ``multiple`` (GPU rows move in 16-byte units)."""
    k = a.shape[1]
    extra = (-k) % multiple
    return a if extra == 0 else jnp.pad(a, ((0, 0), (0, extra)))


def _cached_dispatch_f32(ops, meta: _HandleMeta, g, harrays, token):
    """Cached dispatch of a float32 ``[T, K]`` cotangent (of combine's weights). The GPU moves rows in
    16-byte units, so the columns are padded to a multiple of 4 there, and sliced back."""
    k = int(g.shape[1])
    g = g.astype(jnp.float32)
    if ops.backend == "gpu":
        g = _pad_columns(g, 4)
    out, token = _raw_cached_dispatch(ops, meta, g, harrays, token)
    return out[:, :k], token


# ------------------------------------------------------------------------------------------------
# custom_vjp wrappers: the backward of a dispatch is a combine and vice versa
# ------------------------------------------------------------------------------------------------

def _make_dispatch(ops, meta: _HandleMeta, spec: _DispatchSpec):
    def primal(x, idx, w, token):
        data, scales = x if spec.fp8 else (x, None)
        return _raw_dispatch(ops, meta, spec, data, scales, idx, w, token)

    def fwd(x, idx, w, token):
        out = primal(x, idx, w, token)
        return out, (out[1], out[3], out[4])   # recv_topk_idx, handle arrays, token (see _chain_token)

    def bwd(res, cts):
        if spec.fp8:
            raise TypeError("deepep_cupy.jaxep.dispatch: an FP8 input is not differentiable (dispatch the "
                            "bf16/float32 activations, or stop the gradient before quantising)")
        recv_idx, harrays, token = res
        g_x, _, g_w, _, g_token = cts
        if spec.with_weights:
            # only local entries of real rows depend on the weights (the rest are constant zeros)
            g_w = jnp.where(recv_idx >= 0, g_w, jnp.zeros_like(g_w)).astype(jnp.float32)
            if ops.backend == "gpu":
                g_w = _pad_columns(g_w, 4)
        else:
            g_w = None
        g_x_in, g_w_in, g_token = _raw_combine(ops, meta, g_x, g_w, harrays, (g_token, token))
        if g_w_in is not None:
            g_w_in = g_w_in[:, :int(recv_idx.shape[1])]
        return g_x_in, None, g_w_in, g_token

    f = jax.custom_vjp(primal)
    f.defvjp(fwd, bwd)
    return f


def _make_cached_dispatch(ops, meta: _HandleMeta, fp8: bool):
    def primal(x, harrays, token):
        return _raw_cached_dispatch(ops, meta, x, harrays, token)

    def fwd(x, harrays, token):
        out = primal(x, harrays, token)
        return out, (harrays, out[1])

    def bwd(res, cts):
        if fp8:
            raise TypeError("deepep_cupy.jaxep.cached_dispatch: an FP8 input is not differentiable")
        harrays, token = res
        g, g_token = cts
        g_x, _, g_token = _raw_combine(ops, meta, g, None, harrays, (g_token, token))
        return g_x, None, g_token

    f = jax.custom_vjp(primal)
    f.defvjp(fwd, bwd)
    return f


def _make_combine(ops, meta: _HandleMeta):
    def primal(x, w, harrays, token):
        return _raw_combine(ops, meta, x, w, harrays, token)

    def fwd(x, w, harrays, token):
        out = primal(x, w, harrays, token)
        return out, (harrays, out[2])

    def bwd(res, cts):
        harrays, token = res
        g_out, g_w, g_token = cts
        g_x, g_token = _raw_cached_dispatch(ops, meta, g_out, harrays, (g_token, token))
        if g_w is not None:
            g_w, g_token = _cached_dispatch_f32(ops, meta, g_w, harrays, g_token)
        return g_x, g_w, None, g_token

    f = jax.custom_vjp(primal)
    f.defvjp(fwd, bwd)
    return f


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------

def num_recv_tokens_per_expert(recv_topk_idx, num_local_experts: int, expert_alignment: int = 1):
    """int32 ``[num_local_experts]``: received ``(row, k)`` entries per local expert (padding rows
    hold -1 and count nowhere), each rounded up to a multiple of ``expert_alignment``. The array form
    of DeepEP's ``num_recv_tokens_per_expert_list`` (a host list cannot exist under jit)."""
    ids = recv_topk_idx.reshape(-1).astype(jnp.int32)
    ids = jnp.where(ids >= 0, ids, num_local_experts)           # -1 -> one past the end: dropped
    counts = jnp.zeros(num_local_experts, jnp.int32).at[ids].add(1, mode="drop")
    a = int(expert_alignment)
    return counts if a == 1 else (counts + (a - 1)) // a * a


def dispatch(buf, x, topk_idx, topk_weights=None, *, num_experts: int, num_worst_tokens: Optional[int] = None,
             expert_alignment: int = 1):
    """High-throughput dispatch as a JAX operation (collective; differentiable in ``x`` and
    ``topk_weights``).

    Arguments:
        buf: the ``deepep_cupy.Buffer`` (every rank calls with its own).
        x: bf16 or float32 ``[T, H]``, or the FP8 pair ``(float8_e4m3fn [T, H], float32 [T, H/128])``
            (not differentiable).
        topk_idx: integer ``[T, K]`` global expert ids, -1 = none (int32 is fine: JAX's default).
        topk_weights: float32 ``[T, K]`` or None.
        num_experts: ``E``, a multiple of the rank count (static).
        num_worst_tokens: rows of every output (static, >= 1, the same on every rank); default
            ``num_ranks * T``, right when every rank has ``T`` tokens (pass it when token counts
            differ). A rank that would receive more raises (on every rank) at run time.
        expert_alignment: rounding of the per-expert counts.

    Returns:
        ``(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert, handle)``:
        recv_x like ``x`` with ``W`` rows ordered by source rank then token (padding rows 0);
        recv_topk_idx ``[W, K]`` (dtype of ``topk_idx``) local expert ids, -1 elsewhere and in padding;
        recv_topk_weights float32 ``[W, K]`` (0 where not local; None without weights);
        num_recv_tokens_per_expert int32 ``[E / R]`` (an array, not DeepEP's host list);
        handle a :class:`DispatchHandle`.
    """
    ops = _ops_for(buf)
    data, scales, t, hidden = _check_x(x)
    k = _check_idx(topk_idx, t)
    _check_weights(topk_weights, (t, k))
    num_experts = _int(num_experts, "num_experts", 1)
    if num_experts % buf.num_ranks:
        raise DeepEPInvalid(f"num_experts: expected a multiple of the {buf.num_ranks} ranks, got {num_experts}")
    if num_worst_tokens is None:
        num_worst_tokens = max(1, buf.num_ranks * t)
    rows = _int(num_worst_tokens, "num_worst_tokens", 1)
    alignment = _int(expert_alignment, "expert_alignment", 1)
    names = tuple(n for n, _, _ in _handle_specs(ops.backend, buf.num_ranks, t, rows, num_experts))
    meta = _HandleMeta(ops.backend, buf.num_ranks, t, rows, num_experts, hidden, names)
    spec = _DispatchSpec(scales is not None, _dtype_name(topk_idx), topk_weights is not None, alignment)
    x_in = (data, scales) if spec.fp8 else data
    recv_x, recv_idx, recv_w, harrays = _in_order(ops, _make_dispatch(ops, meta, spec), x_in, topk_idx, topk_weights)
    counts = num_recv_tokens_per_expert(recv_idx, num_experts // buf.num_ranks, alignment)
    return recv_x, recv_idx, recv_w, counts, DispatchHandle(harrays, meta)


def cached_dispatch(buf, x, handle: DispatchHandle):
    """Dispatch other data with the routing of an earlier :func:`dispatch` (collective; only ``x``
    travels; differentiable in ``x``).

    Arguments:
        buf: the Buffer of that dispatch.
        x: bf16 or float32 ``[T, H']`` (any hidden size), or an FP8 pair; ``T`` as dispatched.
        handle: the :class:`DispatchHandle` the dispatch returned.

    Returns:
        recv_x like ``x``, ``[W, H']``, the rows of the handle's dispatch (padding rows 0).
    """
    ops = _ops_for(buf)
    _check_handle(handle, DispatchHandle, buf)
    data, scales, t, _ = _check_x(x)
    if t != handle.meta.num_tokens:
        raise DeepEPInvalid(f"x: the handle was made for {handle.meta.num_tokens} tokens, got {t}")
    fp8 = scales is not None
    return _in_order(ops, _make_cached_dispatch(ops, handle.meta, fp8), (data, scales) if fp8 else data,
                     handle.arrays)[0]


def combine(buf, x, handle: DispatchHandle, topk_weights=None):
    """High-throughput combine as a JAX operation (collective; differentiable in ``x`` and
    ``topk_weights``): every token gets the sum of its copies back (unweighted, as DeepEP's combine;
    float32 accumulation in ascending rank order, rounded once to the dtype of ``x``).

    Arguments:
        buf: the Buffer of the dispatch.
        x: bf16 or float32 ``[W, H']``, rows as the dispatch returned them (padding rows ignored).
        handle: the :class:`DispatchHandle` of the dispatch.
        topk_weights: float32 ``[W, K]``, reduced the same way, or None.

    Returns:
        ``(combined_x [T, H'] dtype of x, combined_topk_weights float32 [T, K] or None)``.
    """
    ops = _ops_for(buf)
    _check_handle(handle, DispatchHandle, buf)
    rows = handle.meta.num_worst_tokens
    data, scales, n, _ = _check_x(x)
    if scales is not None:
        raise DeepEPTypeError("x: combine takes bf16 or float32, not an FP8 pair")
    if n != rows:
        raise DeepEPInvalid(f"x: expected {rows} rows (the dispatch's num_worst_tokens), got {n}")
    if topk_weights is not None:
        if not hasattr(topk_weights, "shape") or topk_weights.ndim != 2:
            raise DeepEPInvalid("topk_weights: expected a float32 [W, K] array")
        _check_weights(topk_weights, (rows, topk_weights.shape[1]))
    out, out_w = _in_order(ops, _make_combine(ops, handle.meta), data, topk_weights, handle.arrays)
    return out, out_w


def low_latency_dispatch(buf, x, topk_idx, num_max_dispatch_tokens_per_rank: int, num_experts: int,
                         use_fp8: bool = True, round_scale: bool = False, use_ue8m0: bool = False):
    """Low-latency dispatch as a JAX operation (collective; not differentiable).

    Arguments:
        buf: a ``deepep_cupy.Buffer`` with room for the low-latency kernels on the GPU
            (``num_rdma_bytes``, ``low_latency_mode=True``).
        x: bf16 ``[T, H]``, ``T <= M``, ``H`` a multiple of 128.
        topk_idx: integer ``[T, K]``, -1 = none.
        num_max_dispatch_tokens_per_rank: ``M`` (static).
        num_experts: ``E`` (static).
        use_fp8, round_scale, use_ue8m0: as ``Buffer.low_latency_dispatch``.

    Returns:
        ``(recv_x, recv_count, handle)``: recv_x bf16 ``[L, R*M, H]``, or with ``use_fp8`` the pair
        ``(float8_e4m3fn [L, R*M, H], scales)`` (float32 ``[L, R*M, H/128]``, or int32
        ``[L, R*M, ceil(H/512)]`` with ``use_ue8m0``); slots past ``recv_count[l]`` hold 0.
        recv_count int32 ``[L]``; handle a :class:`LowLatencyHandle`.
    """
    ops = _ops_for(buf)
    if not hasattr(x, "dtype") or _dtype_name(x) != "bfloat16" or x.ndim != 2:
        raise DeepEPTypeError(f"x: expected a bfloat16 [T, H] array, got {getattr(x, 'dtype', type(x).__name__)} "
                              f"{tuple(getattr(x, 'shape', ()))}")
    t, hidden = int(x.shape[0]), int(x.shape[1])
    k = _check_idx(topk_idx, t)
    m = _int(num_max_dispatch_tokens_per_rank, "num_max_dispatch_tokens_per_rank", 1)
    num_experts = _int(num_experts, "num_experts", 1)
    r = buf.num_ranks
    if num_experts % r:
        raise DeepEPInvalid(f"num_experts: expected a multiple of the {r} ranks, got {num_experts}")
    if t > m:
        raise DeepEPInvalid(f"x: {t} tokens exceed num_max_dispatch_tokens_per_rank={m}")
    if hidden % 128:
        raise DeepEPInvalid(f"x: low-latency hidden sizes are multiples of 128, got {hidden}")
    for flag, name in ((use_fp8, "use_fp8"), (round_scale, "round_scale"), (use_ue8m0, "use_ue8m0")):
        if not isinstance(flag, bool):
            raise DeepEPTypeError(f"{name}: expected a bool, got {type(flag).__name__}")
    use_ue8m0 = bool(use_ue8m0 and use_fp8)
    names = tuple(n for n, _, _ in _ll_handle_specs(ops.backend, r, t, k, num_experts, m))
    meta = _LowLatencyMeta(ops.backend, r, t, k, hidden, num_experts, m, use_fp8, use_ue8m0, names)
    spec = _LowLatencySpec(round_scale)
    num_local, slots = num_experts // r, r * m
    specs = [_sds((num_local, slots, hidden), _FP8 if use_fp8 else "bfloat16")]
    if use_fp8:
        specs.append(_sds((num_local, slots, -(-hidden // 512)), np.int32) if use_ue8m0
                     else _sds((num_local, slots, hidden // 128), np.float32))
    specs.append(_sds((num_local,), np.int32))
    specs += [_sds(shape, dt) for _, shape, dt in _ll_handle_specs(ops.backend, r, t, k, num_experts, m)]
    outs, = _in_order(ops, lambda token: _call(ops, specs, (x, topk_idx),
                                               lambda o, a: ops.ll_dispatch(o, meta, spec, *a),
                                               ("low_latency_dispatch", meta, spec), token))
    recv_x = (outs.pop(0), outs.pop(0)) if use_fp8 else outs.pop(0)
    recv_count = outs.pop(0)
    return recv_x, recv_count, LowLatencyHandle(tuple(outs), meta)


def low_latency_combine(buf, x, topk_idx, topk_weights, handle: LowLatencyHandle):
    """Low-latency combine as a JAX operation (collective; not differentiable): each token's weighted
    sum over its top-k experts' outputs, float32 accumulation in ascending ``k``, bf16 out.

    Arguments:
        buf: the Buffer of the dispatch.
        x: bf16 ``[L, R*M, H]`` expert outputs in the dispatch's layout (unused slots ignored).
        topk_idx: integer ``[T, K]`` as dispatched. topk_weights: float32 ``[T, K]``.
        handle: the :class:`LowLatencyHandle` of the dispatch.

    Returns:
        bf16 ``[T, H]``.
    """
    ops = _ops_for(buf)
    _check_handle(handle, LowLatencyHandle, buf)
    m = handle.meta
    shape = (m.num_experts // m.num_ranks, m.num_ranks * m.num_max_dispatch_tokens_per_rank, m.hidden)
    if not hasattr(x, "dtype") or _dtype_name(x) != "bfloat16" or tuple(x.shape) != shape:
        raise DeepEPInvalid(f"x: expected bfloat16 {shape}, got {getattr(x, 'dtype', type(x).__name__)} "
                            f"{tuple(getattr(x, 'shape', ()))}")
    if _check_idx(topk_idx, m.num_tokens) != m.num_topk:
        raise DeepEPInvalid(f"topk_idx: the handle was made for {m.num_topk} top-k columns, got {topk_idx.shape[1]}")
    _check_weights(topk_weights, (m.num_tokens, m.num_topk))
    specs = [_sds((m.num_tokens, m.hidden), "bfloat16")]
    args = (x, topk_idx, topk_weights) + tuple(handle.arrays)
    outs, = _in_order(ops, lambda token: _call(ops, specs, args,
                                               lambda o, a: ops.ll_combine(o, m, a[0], a[1], a[2], a[3:]),
                                               ("low_latency_combine", m), token))
    return outs[0]


def use_local_gpu(comm=None) -> Optional[int]:
    """Make JAX use only this rank's GPU, the one ``deepep_cupy.Buffer`` picks (node-local rank
    modulo the visible GPUs), so that the arrays XLA hands the kernels live on the buffer's device.

    Call it before JAX touches a device (it sets ``jax_cuda_visible_devices``; CuPy still sees every
    GPU, which NVSHMEM's peer mappings need). No GPU: does nothing and returns None.

    Arguments:
        comm: mpi4py communicator (default ``MPI.COMM_WORLD``).

    Returns:
        the CUDA device index chosen, or None.
    """
    from mpi4py import MPI

    from . import discovery
    if discovery.gpu_count() == 0:
        return None
    comm = MPI.COMM_WORLD if comm is None else comm
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        local_rank = local.Get_rank()
    finally:
        local.Free()
    device = local_rank % discovery.gpu_count()
    jax.config.update("jax_cuda_visible_devices", str(device))
    return device
