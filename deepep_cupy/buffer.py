"""``Buffer``: the one public class, DeepEP's ``deep_ep.Buffer`` without PyTorch.

Methods are ordered as in DeepEP: lifecycle, static helpers, high-throughput mode, low-latency
mode. Every public method validates its arguments first (``validation.py``): bad input raises
before anything is launched or sent, and the buffer stays usable. Then it hands CuPy views (GPU
backend) or numpy arrays (reference backend) to the backend, in one request per operation through
the ``Backend`` interface (``backend.py``; ``Buffer`` never asks which backend it holds), and
returns the results in the caller's framework, that of the call's primary input (``x``;
``topk_idx`` for the layout): on the GPU through ``arrays.from_cupy``, on the reference backend
through ``arrays.from_numpy`` (numpy stays numpy at no cost; JAX and PyTorch CPU arrays come back
as such, bfloat16 and FP8 included).

The reference backend holds code to the GPU backend's rules (issue #15), through the same checks
here, so that what passes on a CPU does not fail on a GPU: top-k at most 32, at most 1022 experts
per rank and 8192 in a layout, at most 131072 tokens per rank, ``config`` and every bool and
``previous_event`` type-checked, ``out=`` writable (never a JAX array), ``zero_copy`` only with
the combine buffer. A buffer given ``num_nvl_bytes``/``num_rdma_bytes`` (sized for the GPU) is also
held to the GPU's memory rules: rows of whole 16-byte units, ``num_nvl_bytes`` for the
high-throughput calls and a large enough ``num_rdma_bytes`` for the low-latency ones; a buffer of no
bytes is the reference backend's own mode (it needs no memory) and skips those. ``topk_idx`` is
int64, or int32 from JAX (its default integer type; int64 needs ``jax_enable_x64``), widened here.

Before anything collective happens, the ranks agree (``agreement.py``, issue #15): each call sends
its signature (the shapes, dtypes and options every rank must share, never per-rank token counts),
or the error its own checks raised, to every other rank, so a rank whose input is bad or differs
(another ``hidden``, top-k, ``num_experts`` or dtype) makes every rank raise the same
``DeepEPInvalid`` naming the argument and the ranks, instead of the others waiting in the
collective until the timeout or computing a wrong result. ``settings.check_agreement`` (default
``"auto"``: on for the reference backend, off on the GPU until its cost there is measured; ``True``
everywhere, ``False`` nowhere); it is skipped on one rank and during CUDA-graph capture.

Values inside arrays are the exception on the GPU: reading them on the host would mean waiting for
the GPU on every call. The kernels that read ``topk_idx`` check each expert id against
[-1, num_experts) themselves, treat a bad one as -1 (nothing is written out of bounds) and record
it; the next call on the buffer raises ``DeepEPInvalid`` naming ``topk_idx`` and the value, before
it launches anything (as it does for a timeout). ``settings.check_values = True`` adds a blocking
check that raises on the call itself (debugging). The reference backend checks values at once.

Backends:
    * ``"gpu"``: CUDA kernels over NVLink/NVSHMEM (``gpu_backend.py``).
    * ``"reference"``: the same API on the CPU across the MPI ranks (``reference_backend.py``), for
      developing MoE code with no GPU; also the oracle the GPU tests compare against.
    * ``"auto"``: ``"gpu"`` when a GPU is visible, else ``"reference"``.
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

from . import arrays, discovery, jit, mpienv
from .agreement import Agreement
from .backend import (Backend, CombineRequest, DispatchRequest, DispatchResult, LayoutRequest,
                      LowLatencyCombineRequest, LowLatencyDispatchRequest)
from .config import Config, settings
from .errors import DeepEPError, DeepEPInvalid, DeepEPTypeError
from .event import EventOverlap
from .validation import (MAX_HT_TOPK, VECTOR_ALIGNMENT, HandleRegistry, check_finite, check_same_values,
                         expect_array, expect_bool, expect_int, expect_optional_array, expect_row_bytes,
                         expect_stream_args, expect_writable)

__all__ = ["Buffer"]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "gpu", "reference")


def _checked(method):
    """With ``settings.check_each_call``, run ``Buffer.check`` after the call (and after the hook it
    returns, if any), unless the current stream is capturing a CUDA graph."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        out = method(self, *args, **kwargs)
        backend = self._backend
        if not settings.check_each_call or not backend.reports_errors_later or backend.capturing():
            return out
        self.check(method.__name__)
        if isinstance(out, tuple) and out and callable(out[-1]):
            hook = out[-1]

            def checked_hook():
                hook()
                if not backend.capturing():
                    self.check(f"{method.__name__} (hook)")
            out = out[:-1] + (checked_hook,)
        return out
    return wrapper


class _Call:
    """One collective call in progress: its operation and whether it has agreed yet."""
    __slots__ = ("op", "agreed")

    def __init__(self, op: str):
        self.op, self.agreed = op, False


def _collective(op: str, low_latency: bool = False):
    """Make a collective method agree across ranks before anything is launched or sent (issue #15).

    The method runs its own argument checks, then calls ``self._agreed(signature)`` just before
    its first backend call: every rank exchanges its signature (``agreement.py``) and raises the
    same ``DeepEPInvalid`` if they differ. If the checks raise first, the exception is posted to
    the peers (which raise it too, naming this rank) and re-raised here without waiting. Where
    ``_agreeing`` says no (``settings.check_agreement``, one rank, CUDA-graph capture), the method
    runs as it is. ``low_latency``: the call is a low-latency one (``"auto"`` skips those on the
    GPU). Hooks the method returns never agree (they are not collective on the host).
    """
    def decorate(method):
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            if self._destroyed or not self._agreeing(low_latency):
                return method(self, *args, **kwargs)
            call = _Call(op)
            outer, self._call = self._call, call
            try:
                self._raise_reported(op)
                out = method(self, *args, **kwargs)
            except Exception as e:
                if not call.agreed:
                    call.agreed = True
                    self._agreement.agree(op, local_error=e, timeout=settings.timeout_seconds)
                raise
            finally:
                self._call = outer
            if not call.agreed:   # a path that skipped _agreed: the peers now wait for us
                raise AssertionError(f"deepep_cupy bug: {op} returned without agreeing across ranks")
            return out
        return wrapper
    return decorate


class Buffer:
    """Communication buffers and kernels for expert-parallel dispatch and combine.

    Collective: every rank of ``comm`` constructs it together, and every collective method (the
    layout, dispatch, combine and low-latency calls, ``clean_low_latency_buffer``, ``destroy``)
    must be called by every rank in the same order, with the same shapes, dtypes and options
    (checked across the ranks before each call: see the module docstring).

    Arguments:
        comm: an mpi4py communicator (``None``: ``MPI.COMM_WORLD``); one process per GPU, the rank
            on its node picks the GPU. A communicator of size 1 works (a notebook).
        num_nvl_bytes: symmetric bytes for the intranode (NVLink) high-throughput kernels.
        num_rdma_bytes: symmetric bytes for the internode and low-latency kernels.
        low_latency_mode: reserve the buffer for the low-latency kernels (DeepEP's flag).
        num_qps_per_rank: RDMA queue pairs per peer (DeepEP's knob; kept for API parity).
        ranks_per_node: ranks sharing one NVLink domain; ``None`` detects it
            (``MPI.COMM_TYPE_SHARED``); a smaller value makes one host behave as several nodes.
        backend: ``"auto"``, ``"gpu"`` or ``"reference"``.
        jit_options: how kernels are compiled (``deepep_cupy.JitOptions``); default NVRTC.
        allow_nvlink_for_low_latency_mode: False sends every low-latency message through NVSHMEM
            puts (the RDMA path) even to peers reachable over NVLink (DeepEP's flag; tests use it).

    Raises:
        DeepEPInvalid / DeepEPTypeError: bad arguments, before any launch, on every rank when any
            rank's are bad or the ranks' differ (the message names the argument and the ranks); an
            expert id outside [-1, num_experts) in ``topk_idx``, found by the GPU, at the next call
            (see above).
            DeepEPError: GPU or NVSHMEM setup failed. DeepEPTimeout: a peer never arrived.
    """

    # -------------------------------------------------------------------------------- lifecycle
    def __init__(self, comm=None, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0,
                 low_latency_mode: bool = False, num_qps_per_rank: int = 24,
                 ranks_per_node: Optional[int] = None, backend: str = "auto",
                 jit_options: Optional[jit.JitOptions] = None, allow_nvlink_for_low_latency_mode: bool = True):
        MPI = mpienv.import_mpi()   # a missing MPI library: a DeepEPError saying what to install

        if comm is None:
            comm = MPI.COMM_WORLD
        if not isinstance(comm, MPI.Comm):
            raise DeepEPTypeError(f"comm: expected an mpi4py communicator, got {type(comm).__name__}")
        mpienv.check_world(comm)    # launched as N ranks but each process alone: the wrong libmpi
        self.num_nvl_bytes = expect_int(num_nvl_bytes, "num_nvl_bytes", minimum=0)
        self.num_rdma_bytes = expect_int(num_rdma_bytes, "num_rdma_bytes", minimum=0)
        self.low_latency_mode = expect_bool(low_latency_mode, "low_latency_mode")
        self.num_qps_per_rank = expect_int(num_qps_per_rank, "num_qps_per_rank", minimum=1)
        self.allow_nvlink_for_low_latency_mode = expect_bool(allow_nvlink_for_low_latency_mode,
                                                             "allow_nvlink_for_low_latency_mode")
        if backend not in BACKENDS:
            raise DeepEPInvalid(f"backend: expected one of {BACKENDS}, got {backend!r}")
        if jit_options is not None and not isinstance(jit_options, jit.JitOptions):
            raise DeepEPTypeError(f"jit_options: expected a JitOptions, got {type(jit_options).__name__}")
        self.comm = comm
        self.rank, self.num_ranks = comm.Get_rank(), comm.Get_size()
        self.ranks_per_node = self._resolve_ranks_per_node(comm, ranks_per_node)
        self.num_nodes = self.num_ranks // self.ranks_per_node

        # every rank must pick the same backend and sizes, or the collectives below would not match
        local_choice = backend if backend != "auto" else ("gpu" if discovery.gpu_count() > 0 else "reference")
        mine = (local_choice, self.num_nvl_bytes, self.num_rdma_bytes, self.low_latency_mode)
        everyone = comm.allgather(mine)
        for what, i in (("backend", 0), ("num_nvl_bytes", 1), ("num_rdma_bytes", 2), ("low_latency_mode", 3)):
            values = [e[i] for e in everyone]
            if len(set(values)) != 1:
                raise DeepEPInvalid(f"{what}: every rank must pass the same value, got {values} by rank")
        self._call: Optional[_Call] = None
        self._destroyed = True   # until the backend is up
        # private channel of the cross-rank agreement (collective; None on one rank: nothing to do)
        self._agreement = Agreement.create(comm)
        try:
            self._backend = self._make_backend(comm, local_choice, jit_options)
        except BaseException:
            if self._agreement is not None:
                self._agreement.free()
            raise
        self._handles = HandleRegistry(f"Buffer(rank={self.rank}, backend={local_choice})")
        self._destroyed = False
        log.info("rank %d/%d: Buffer up (backend %s, %d nodes of %d)", self.rank, self.num_ranks,
                 self.backend_name, self.num_nodes, self.ranks_per_node)

    @property
    def backend_name(self) -> str:
        """The backend this buffer runs on: ``"gpu"`` or ``"reference"`` (``"auto"`` resolved)."""
        return self._backend.name

    def _make_backend(self, comm, local_choice: str, jit_options) -> Backend:
        if local_choice == "gpu":
            import importlib.util
            if importlib.util.find_spec("cupy") is None:
                raise DeepEPError("backend: 'gpu' needs CuPy and the CUDA wheels, which a CPU-only install "
                                  "(requirements-cpu.txt) leaves out: pip install deepep_cupy (the full "
                                  "install), or use backend='reference'")
            from .gpu_backend import GpuBackend
            return GpuBackend(comm, self.num_nvl_bytes, self.num_rdma_bytes,
                              self.ranks_per_node, jit_options, self.allow_nvlink_for_low_latency_mode)
        from .reference_backend import ReferenceBackend
        return ReferenceBackend(comm, ranks_per_node=self.ranks_per_node)

    @staticmethod
    def _resolve_ranks_per_node(comm, ranks_per_node) -> int:
        from mpi4py import MPI

        local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
        detected = local.Get_size()
        local.Free()
        sizes = set(comm.allgather(detected))
        num_ranks = comm.Get_size()
        if ranks_per_node is None:
            if len(sizes) != 1:
                raise DeepEPInvalid(f"ranks_per_node: nodes hold different rank counts {sorted(sizes)}; "
                                    "pass ranks_per_node explicitly")
            return detected
        ranks_per_node = expect_int(ranks_per_node, "ranks_per_node", minimum=1)
        if num_ranks % ranks_per_node or ranks_per_node > min(sizes):
            raise DeepEPInvalid(f"ranks_per_node: expected a divisor of the {num_ranks} ranks that is at "
                                f"most the {min(sizes)} ranks sharing a node, got {ranks_per_node}")
        return ranks_per_node

    def destroy(self) -> None:
        """Collective: free the buffer's memory; the last buffer of the process finalises NVSHMEM.

        Explicit, because garbage collection order across ranks is not collective. Idempotent.
        A peer that does not arrive within ``settings.timeout_seconds`` (it died) does not hang it:
        the GPU backend then leaves its memory and NVSHMEM to the process, which should exit
        (``os._exit``: MPI_Finalize would wait for the dead rank too); the reference backend's
        teardown is local anyway.
        """
        if getattr(self, "_destroyed", True):
            return
        self._destroyed = True
        self._handles.close()
        if self._agreement is not None:
            self._agreement.free()
        self._backend.destroy()

    def check(self, what: str = "the last operation") -> None:
        """Raise what this buffer's kernels reported, on the call that caused it.

        Kernels report timeouts (a peer that never arrived), overflow and bad expert ids through an
        error record that the next call on the buffer raises before it launches anything. ``check``
        instead waits for the GPU (every kernel queued on this device; not a pending low-latency
        hook, whose receive has not been launched) and raises at once: ``DeepEPTimeout`` naming
        the rank, the phase and the peer, ``DeepEPInvalid`` for a bad expert id, ``DeepEPError``
        for overflow. The record is cleared. ``settings.check_each_call = True`` does this after
        every call. On the reference backend errors are raised by the call itself, so this only
        checks that the buffer is alive. Not allowed while the stream captures a CUDA graph."""
        self._live().check(what)

    def __enter__(self) -> "Buffer":
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()

    def _live(self):
        if self._destroyed:
            raise DeepEPInvalid("self: this Buffer was destroyed")
        return self._backend

    @property
    def alive(self) -> bool:
        """False once ``destroy()`` ran (every call then raises ``DeepEPInvalid``)."""
        return not self._destroyed

    @property
    def device_id(self) -> Optional[int]:
        """The CUDA device this buffer's kernels run on (its arrays must live there), or None on the
        reference backend. Framework integrations put their arrays on it (``deepep_cupy.jaxep``)."""
        device_id = self._backend.device_id
        return None if device_id is None else int(device_id)

    def adopt_handle(self, handle):
        """Accept ``handle`` in later calls of this buffer, and return it. For framework integrations
        that carry a dispatch's handle as arrays and rebuild it (``deepep_cupy.jaxep`` does, across
        ``jax.jit``): calls refuse handles this buffer's dispatch did not return, because a handle of
        another buffer describes memory and routing that mean nothing here. Adopt only handles rebuilt
        from the arrays of this buffer's own dispatch."""
        from .internode import InternodeHandle
        from .intranode import IntranodeHandle
        from .low_latency import LowLatencyHandle
        from .reference_backend import ReferenceDispatchHandle, ReferenceLowLatencyHandle
        self._live()
        kinds = (IntranodeHandle, InternodeHandle, LowLatencyHandle, ReferenceDispatchHandle, ReferenceLowLatencyHandle)
        if not isinstance(handle, kinds):
            names = ", ".join(k.__name__ for k in kinds)
            raise DeepEPTypeError(f"handle: expected a handle of a dispatch (one of {names}), got {type(handle).__name__}")
        return self._handles.add(handle)

    # ------------------------------------------------------------------------ cross-rank agreement
    def _agreeing(self, low_latency: bool) -> bool:
        """Whether this call agrees across ranks first (``settings.check_agreement``): never on one
        rank or while the current stream captures a CUDA graph (a replay could not re-check);
        ``"auto"`` (the default) agrees on the reference backend only: on the GPU each agreement is a
        host round trip between the ranks, +39 to +58 us of host time per call on the GPU machine
        (2026-12-06, one H100, 2 ranks under MPS; ``scripts/bench_agreement.py``) against 80 to 375
        us for the call itself, so the GPU takes it with ``True`` (while debugging). Every rank must
        use the same setting."""
        if self._agreement is None:
            return False
        mode = getattr(settings, "check_agreement", "auto")
        if mode is False:
            return False
        if mode is not True and mode != "auto":
            raise DeepEPInvalid(f"settings.check_agreement: expected True, False or 'auto', got {mode!r}")
        if mode == "auto" and not self._backend.agrees_by_default:
            return False
        return not self._backend.capturing()

    @property
    def _agreeing_now(self) -> bool:
        """Whether this call still has to agree: its signature is only built then (building one
        costs a few us of host time on calls that do not agree, the GPU default)."""
        call = self._call
        return call is not None and not call.agreed

    def _agreed(self, signature) -> None:
        """Agree on ``signature`` (``(argument, field, value)`` entries that must be equal on every
        rank) with the peers, inside a ``_collective`` method, after its checks and before its
        first backend call; raises the verdict. A no-op when the call does not agree."""
        call = self._call
        if call is None or call.agreed:
            return
        call.agreed = True
        self._agreement.agree(call.op, signature, timeout=settings.timeout_seconds)

    def _raise_reported(self, what: str) -> None:
        """GPU: raise what earlier kernels reported (bad expert ids, timeouts) now, among the
        call's own checks, so the peers learn of it before anything is launched (the backend
        would raise it on this rank alone at its start). Reads pinned memory; no wait."""
        self._backend.raise_reported(what)

    def _check_ids(self, idx, num_experts: int) -> bool:
        """The expert-id check among the call's own checks (before the agreement, so that a bad id
        reaches every rank where the call agrees): on numpy always; on the GPU the blocking check of
        ``settings.check_values`` (a no-op without it: the kernels check and report). Returns whether
        it checked: the request then says ``ids_checked`` and the backend does not check again."""
        return self._backend.check_ids(idx, num_experts, blocking=True)

    # ---------------------------------------------------------------------------- static helpers
    @staticmethod
    def get_intranode_size_hint(num_max_tokens_per_rank: int, hidden: int, num_ranks: int,
                                num_topk: int = 8, dtype="bfloat16") -> int:
        """``num_nvl_bytes`` the GPU high-throughput kernels need for up to ``num_max_tokens_per_rank``
        tokens of ``hidden`` channels of ``dtype`` (bf16 by default; an FP8 dispatch fits the bf16
        size, its combine being bf16) with ``num_topk`` experts each, on ``num_ranks`` ranks of one
        NVLink domain: the control area, one staging area (shared by the staged dispatch and the
        combine) with one slot of that many rows per other rank, and a receive arena for two
        dispatches' outputs, which senders then write in place (one copy per row; docs/intranode.md).
        ``dtype``: "bfloat16", "float32" or "float8_e4m3fn" (or the numpy/ml_dtypes dtype); float32
        rows take twice the bytes."""
        from .intranode import size_hint
        expect_int(num_max_tokens_per_rank, "num_max_tokens_per_rank", minimum=1)
        expect_int(hidden, "hidden", minimum=1)
        expect_int(num_ranks, "num_ranks", minimum=1)
        expect_int(num_topk, "num_topk", minimum=0, maximum=32)
        try:
            name = arrays.canonical_dtype(dtype)
        except DeepEPTypeError:
            name = str(dtype)
        elem_bytes = {"bfloat16": 2, "float8_e4m3fn": 2, "float32": 4}.get(name)
        if elem_bytes is None:
            raise DeepEPInvalid(f"dtype: expected bfloat16, float32 or float8_e4m3fn (what dispatch takes), got {name}")
        return size_hint(num_ranks, num_max_tokens_per_rank, hidden, num_topk, elem_bytes=elem_bytes, arena=True)

    @staticmethod
    def get_internode_size_hint(num_max_tokens_per_rank: int, hidden: int, num_ranks: int, ranks_per_node: int,
                                num_topk: int = 8) -> tuple:
        """``(num_nvl_bytes, num_rdma_bytes)`` the hierarchical kernels need for up to
        ``num_max_tokens_per_rank`` tokens of ``hidden`` bf16 (or FP8 + scales) channels on
        ``num_ranks`` ranks in nodes of ``ranks_per_node``: the RDMA region stages one slot of that
        many rows per other node (and a send area as large, where rows wait to be put), the NVLink
        region one slot per other local rank of what a forwarder
        may receive from every node (``num_nodes`` times as many rows). See docs/internode.md."""
        from .intranode import size_hint
        t = expect_int(num_max_tokens_per_rank, "num_max_tokens_per_rank", minimum=1)
        h = expect_int(hidden, "hidden", minimum=1)
        r = expect_int(num_ranks, "num_ranks", minimum=1)
        per_node = expect_int(ranks_per_node, "ranks_per_node", minimum=1)
        k = expect_int(num_topk, "num_topk", minimum=0, maximum=32)
        if r % per_node:
            raise DeepEPInvalid(f"ranks_per_node: expected a divisor of num_ranks={r}, got {per_node}")
        nodes = r // per_node
        return size_hint(per_node, nodes * t, h, k), size_hint(nodes, t, h, k, send_area=True)

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        """``num_rdma_bytes`` the low-latency kernels need (both halves of the double buffer; combine
        rows sized for up to 16 top-k slots). See docs/low_latency.md for the layout."""
        from .low_latency import size_hint
        m = expect_int(num_max_dispatch_tokens_per_rank, "num_max_dispatch_tokens_per_rank", minimum=1)
        h = expect_int(hidden, "hidden", minimum=128)
        r = expect_int(num_ranks, "num_ranks", minimum=1)
        e = expect_int(num_experts, "num_experts", minimum=1)
        if e % r:
            raise DeepEPInvalid(f"num_experts: expected a multiple of num_ranks={r}, got {e}")
        return size_hint(m, h, r, e)

    @staticmethod
    def set_num_sms(num_sms: int) -> None:
        """Set the SMs the high-throughput kernels take when no ``config`` is passed (process-wide,
        ``deepep_cupy.settings.num_sms``; DeepEP's class-level knob). Must be even."""
        from .config import settings
        num_sms = expect_int(num_sms, "num_sms", minimum=2)
        Config(num_sms=num_sms)   # validates evenness
        settings.num_sms = num_sms

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """Default high-throughput dispatch Config for ``num_ranks``: the tuned table
        (deepep_cupy/tuned_configs.json, re-tuned by scripts/tune_intranode.py), with
        ``set_num_sms`` overriding the SM count."""
        from .config import tuned_config
        return tuned_config("dispatch", expect_int(num_ranks, "num_ranks", minimum=1))

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """Default high-throughput combine Config for ``num_ranks`` (see ``get_dispatch_config``)."""
        from .config import tuned_config
        return tuned_config("combine", expect_int(num_ranks, "num_ranks", minimum=1))

    def capture(self) -> EventOverlap:
        """DeepEP's ``Buffer.capture()``: an ``EventOverlap`` of the work queued so far on the
        current stream, to pass as ``previous_event`` (the call's communication stream then starts
        after that work). On the reference backend nothing is queued: an event that is done."""
        self._live()
        return self._backend.current_stream_event()

    # ------------------------------------------------------------------------- arrays in and out
    @property
    def _device(self) -> tuple:
        return self._backend.device

    def _take(self, x, name: str, align: int = 0):
        """A validated input as the backend's array type (``Backend.take``: a CuPy view or numpy).

        On the GPU the view's data pointer must be a multiple of its element size, and of ``align``
        bytes when given (``VECTOR_ALIGNMENT`` for arrays the kernels move with 16-byte accesses:
        dispatch/combine ``x``, ``bias``, ``out``): a misaligned access would fault and take the
        CUDA context down, so it raises ``DeepEPInvalid`` here, before any launch. Host arrays of
        the reference backend are not checked (their alignment says nothing about a device copy).
        """
        return self._backend.take(x, name, align)

    def _give(self, arr, like_framework, dtype: Optional[str] = None):
        """A backend result in the caller's framework (``like_framework``: that of the call's
        primary input), ``Backend.give``. GPU: CuPy results as CuPy (no conversion), JAX or PyTorch
        arrays over the same memory (``arrays.from_cupy``). Reference: numpy stays numpy (no
        conversion, no cost); JAX and PyTorch CPU arrays through ``arrays.from_numpy``."""
        return self._backend.give(arr, like_framework, dtype)

    def _checks_values(self) -> bool:
        """Whether values inside arrays (NaN weights, layout outputs against topk_idx) are read before
        a launch: always on the reference backend (free on numpy); on the GPU only with
        ``settings.check_values`` and outside CUDA-graph capture (a device reduction and a host wait)."""
        return self._backend.checks_values()

    @property
    def _xp(self):
        return self._backend.xp

    def _check_layout_args(self, idx, num_experts: int, given: dict, previous_event, ids_checked: bool) -> None:
        """The ``get_dispatch_layout`` outputs passed to a dispatch must be those of ``idx`` and
        ``num_experts`` (``given``: name -> backend array or None). Only where ``_checks_values``."""
        if not any(a is not None for a in given.values()):
            return
        layout = self._backend.expected_layout(idx, num_experts, previous_event, ids_checked)
        if layout is None:   # (more experts than the GPU's layout kernel counts)
            return
        want = dict(num_tokens_per_rank=layout.num_tokens_per_rank,
                    num_tokens_per_rdma_rank=layout.num_tokens_per_rdma_rank,
                    num_tokens_per_expert=layout.num_tokens_per_expert, is_token_in_rank=layout.is_token_in_rank)
        for name, arr in given.items():
            if arr is not None and want[name] is not None:
                check_same_values(arr, want[name], name, self._xp, f"topk_idx and num_experts={num_experts}",
                                  "pass what get_dispatch_layout returned for this topk_idx and num_experts "
                                  "(a stale layout, or one for another num_experts?)")

    def _check_num_experts(self, num_experts) -> int:
        num_experts = expect_int(num_experts, "num_experts", minimum=1)
        if num_experts % self.num_ranks:
            raise DeepEPInvalid(f"num_experts: expected a multiple of the {self.num_ranks} ranks, "
                                f"got {num_experts}")
        return num_experts

    def _check_topk_idx(self, topk_idx, num_experts: int) -> "arrays.ArrayDesc":
        """``topk_idx`` is int64 ``[T, K >= 1]``, or int32 from JAX: JAX's default integer type
        (int64 needs ``jax_enable_x64``), widened by ``_take_topk_idx``."""
        from_jax = topk_idx is not None and arrays.framework_of(topk_idx, "topk_idx") is arrays.Framework.JAX
        desc = expect_array(topk_idx, "topk_idx", dtype=("int64", "int32") if from_jax else "int64", ndim=2,
                            device=self._device)
        if desc.shape[1] < 1:
            raise DeepEPInvalid(f"topk_idx: expected at least one top-k column, got shape {desc.shape}")
        return desc

    def _take_topk_idx(self, topk_idx):
        """A checked ``topk_idx`` as the backend's int64 array: JAX's int32 is widened here (a copy,
        on the GPU a small cast kernel on the current stream; int64 input is taken as it is)."""
        idx = self._take(topk_idx, "topk_idx")
        if idx.dtype != self._xp.int64:
            idx = idx.astype(self._xp.int64)
        return idx

    # ---------------------------------------------------------------------- high-throughput mode
    @_checked
    @_collective("get_dispatch_layout")
    def get_dispatch_layout(self, topk_idx, num_experts: int, previous_event: Optional[EventOverlap] = None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False) -> tuple:
        """Count what a dispatch will send: tokens per rank, per node and per expert (collective:
        the computation is local, but the ranks agree on ``num_experts`` and top-k first, so a
        rank whose ``topk_idx`` is bad makes every rank raise here rather than in the dispatch).

        Arguments:
            topk_idx: int64 ``[num_tokens, num_topk]`` expert ids, ``-1`` for an unused slot (from
                JAX also int32, widened). On the GPU an id outside [-1, num_experts) counts nowhere
                (as -1) and the next call raises ``DeepEPInvalid`` (this one, with
                ``settings.check_values = True``).
            num_experts: total experts over all ranks (a multiple of the rank count, at most 8192);
                expert ``e`` lives on rank ``e // (num_experts // num_ranks)``.
            previous_event: wait for this ``EventOverlap`` instead of the current stream.
            async_finish: return an event rather than making the current stream wait.
            allocate_on_comm_stream: allocate the outputs on the communication stream.

        Returns (arrays of ``topk_idx``'s framework):
            num_tokens_per_rank: int32 ``[num_ranks]``, tokens with at least one expert on each rank.
            num_tokens_per_rdma_rank: int32 ``[num_nodes]`` likewise per node, or None on one node.
            num_tokens_per_expert: int32 ``[num_experts]``, (token, slot) entries per expert.
            is_token_in_rank: bool ``[num_tokens, num_ranks]``.
            event: ``EventOverlap`` (waitable only with ``async_finish``).
        """
        backend = self._live()
        num_experts = self._check_num_experts(num_experts)
        from .layout import MAX_LAYOUT_EXPERTS
        if num_experts > MAX_LAYOUT_EXPERTS:   # the GPU's limit, on every backend (issue #15)
            raise DeepEPInvalid(f"num_experts: at most {MAX_LAYOUT_EXPERTS} supported, got {num_experts}")
        desc = self._check_topk_idx(topk_idx, num_experts)
        expect_stream_args(previous_event, async_finish, allocate_on_comm_stream, EventOverlap)
        idx = self._take_topk_idx(topk_idx)
        ids_checked = self._check_ids(idx, num_experts)
        self._agreed([("num_experts", "num_experts", num_experts), ("topk_idx", "top-k", desc.shape[1])])
        out = backend.get_dispatch_layout(LayoutRequest(idx, num_experts, previous_event, async_finish,
                                                        allocate_on_comm_stream, ids_checked))
        fw = desc.framework
        return (self._give(out.num_tokens_per_rank, fw), self._give(out.num_tokens_per_rdma_rank, fw),
                self._give(out.num_tokens_per_expert, fw), self._give(out.is_token_in_rank, fw), out.event)

    def _check_x(self, x, name: str = "x"):
        """``x`` is ``[T, H]`` bf16/float32, or an FP8 pair ``(x_e4m3 [T, H], scales float32 [T, H/128])``.
        Returns (data, scales or None, data desc)."""
        if isinstance(x, tuple):
            if len(x) != 2:
                raise DeepEPInvalid(f"{name}: an FP8 input is a pair (x_e4m3, scales), got {len(x)} items")
            # CuPy has no FP8 dtype: its users pass the e4m3 bytes as uint8
            d = expect_array(x[0], f"{name}[0]", dtype=("float8_e4m3fn", "uint8"), ndim=2, device=self._device)
            if d.shape[1] % 128:
                raise DeepEPInvalid(f"{name}[0]: FP8 hidden size must be a multiple of 128, got {d.shape[1]}")
            expect_array(x[1], f"{name}[1]", dtype="float32", shape=(d.shape[0], d.shape[1] // 128),
                         device=self._device)
            return self._take(x[0], f"{name}[0]", VECTOR_ALIGNMENT), self._take(x[1], f"{name}[1]"), d
        d = expect_array(x, name, dtype=("bfloat16", "float32"), ndim=2, device=self._device)
        self._check_row_bytes(d)
        return self._take(x, name, VECTOR_ALIGNMENT), None, d

    @_checked
    @_collective("dispatch")
    def dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                 is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None,
                 expert_alignment: int = 1, num_worst_tokens: int = 0, config: Optional[Config] = None,
                 previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False) -> tuple:
        """Send every token to the ranks holding its top-k experts (collective).

        Arguments:
            x: bf16 or float32 ``[T, H]``, or the FP8 pair ``(x_e4m3 [T, H], scales float32 [T, H/128])``.
                On the GPU rows are moved with 16-byte accesses: a row is a multiple of 16 bytes and
                the data pointer 16-byte aligned (a view starting mid-row raises ``DeepEPInvalid``).
            handle: a previous dispatch's handle: cached mode (same routing, only ``x`` travels;
                ``topk_idx``/``topk_weights`` must be None and come back as None).
            num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank, num_tokens_per_expert:
                the outputs of ``get_dispatch_layout`` for ``topk_idx`` (shapes checked; routing
                follows ``topk_idx``). ``num_tokens_per_expert`` is required (it gives num_experts).
            topk_idx: int64 ``[T, K]`` (from JAX also int32), ``K <= 32``, at most 1022 experts per
                rank. Without it (and without ``handle``) the routing comes from
                ``is_token_in_rank`` alone (with ``num_tokens_per_rank``), and no expert
                information travels: ``recv_topk_idx``/``recv_topk_weights`` are None and the
                per-expert list is empty. topk_weights: float32 ``[T, K]`` (needs topk_idx).
            expert_alignment: round each per-expert count up to a multiple of this.
            num_worst_tokens: > 0 pads every output to this many rows and skips the host
                synchronisation (graph-capturable); ``num_recv_tokens_per_expert_list`` is then ``[]``.
            config, previous_event, async_finish, allocate_on_comm_stream: as DeepEP's.

        Returns (arrays of ``x``'s framework):
            recv_x: like ``x`` (FP8: a pair), ``[N, H]`` ordered by source rank then token index.
            recv_topk_idx: int64 ``[N, K]`` local expert ids, -1 elsewhere (None in cached mode).
            recv_topk_weights: float32 ``[N, K]``, 0 where not local (None in cached mode or without weights).
            num_recv_tokens_per_expert_list: list of ``num_experts / num_ranks`` ints (aligned).
            handle: drives ``combine`` and cached dispatches.
            event: ``EventOverlap``.
        """
        self._live()
        data, scales, xd = self._check_x(x)
        self._check_high_throughput_bytes("dispatch")
        expect_stream_args(previous_event, async_finish, allocate_on_comm_stream, EventOverlap)
        expert_alignment = expect_int(expert_alignment, "expert_alignment", minimum=1)
        num_worst_tokens = expect_int(num_worst_tokens, "num_worst_tokens", minimum=0)
        if config is not None and not isinstance(config, Config):
            raise DeepEPTypeError(f"config: expected a Config, got {type(config).__name__}")
        num_tokens = xd.shape[0]
        from .intranode import CHUNK_TOKENS, MAX_CHUNKS
        if num_tokens > CHUNK_TOKENS * MAX_CHUNKS:   # the GPU kernels' chunk table
            raise DeepEPInvalid(f"x: at most {CHUNK_TOKENS * MAX_CHUNKS} tokens per rank, got {num_tokens}")
        if self._backend.uses_config:
            config = config or self.get_dispatch_config(self.num_ranks)
        if config is not None:
            self._check_num_sms(config)
        if handle is not None:
            self._check_handle(handle, self._handle_kind)
            if topk_idx is not None or topk_weights is not None:
                raise DeepEPInvalid("topk_idx: must be None in cached mode (with handle)")
            if num_tokens != handle.num_tokens:
                raise DeepEPInvalid(f"x: the handle was made for {handle.num_tokens} tokens, got {num_tokens}")
            if num_tokens_per_expert is not None:   # ignored in cached mode, but must not contradict the handle
                expect_array(num_tokens_per_expert, "num_tokens_per_expert", dtype="int32",
                             shape=(handle.num_experts,), device=self._device)
            self._precheck_dispatch(data, scales, None, handle.num_experts, handle)
            if self._agreeing_now:
                self._agreed(self._dispatch_signature(xd, scales is not None, config, handle=True))
            return self._dispatch_result(self._backend.dispatch(DispatchRequest(
                data, scales, handle.num_experts, num_worst_tokens=handle.num_worst_tokens, handle=handle,
                config=config, previous_event=previous_event, async_finish=async_finish,
                allocate_on_comm_stream=allocate_on_comm_stream)), xd, scales is not None)
        else:
            if topk_idx is None:
                return self._dispatch_by_rank_mask(
                    data, scales, xd, num_tokens_per_rank, is_token_in_rank, topk_weights,
                    num_worst_tokens, config, previous_event, async_finish, allocate_on_comm_stream)
            if num_tokens_per_expert is None:
                raise DeepEPInvalid("num_tokens_per_expert: required without a handle (from get_dispatch_layout)")
            ed = expect_array(num_tokens_per_expert, "num_tokens_per_expert", dtype="int32", ndim=1,
                              device=self._device)
            num_experts = self._check_num_experts(ed.shape[0])
            kd = self._check_topk_idx(topk_idx, num_experts)
            if kd.shape[0] != num_tokens:
                raise DeepEPInvalid(f"topk_idx: expected {num_tokens} rows like x, got {kd.shape[0]}")
            expect_optional_array(topk_weights, "topk_weights", dtype="float32", shape=kd.shape,
                                  device=self._device)
            expect_optional_array(num_tokens_per_rank, "num_tokens_per_rank", dtype="int32",
                                  shape=(self.num_ranks,), device=self._device)
            expect_optional_array(num_tokens_per_rdma_rank, "num_tokens_per_rdma_rank", dtype="int32",
                                  shape=(self.num_nodes,), device=self._device)
            expect_optional_array(is_token_in_rank, "is_token_in_rank", dtype="bool",
                                  shape=(num_tokens, self.num_ranks), device=self._device)
            # the GPU kernels' limits, enforced on every backend (issue #15)
            if kd.shape[1] > MAX_HT_TOPK:
                raise DeepEPInvalid(f"topk_idx: at most {MAX_HT_TOPK} top-k columns on the GPU, got {kd.shape[1]}")
            from .intranode import MAX_LOCAL_EXPERTS
            if num_experts // self.num_ranks > MAX_LOCAL_EXPERTS:
                raise DeepEPInvalid(f"num_tokens_per_expert: at most {MAX_LOCAL_EXPERTS} experts per rank, got "
                                    f"{num_experts // self.num_ranks}")
            idx = self._take_topk_idx(topk_idx)
            weights = None if topk_weights is None else self._take(topk_weights, "topk_weights")
            taken = {}   # the layout arrays as the backend's, each taken once

            def take(a, n):
                if a is not None and n not in taken:
                    taken[n] = self._take(a, n)
                return taken.get(n)
            ids_checked = self._check_ids(idx, num_experts)   # (else the GPU checks them on the device)
            if self._checks_values():
                if weights is not None:     # the weights of -1 slots are never read
                    check_finite(weights, "topk_weights", self._xp, where=idx >= 0)
                self._check_layout_args(idx, num_experts, {
                    n: take(a, n) for n, a in (("num_tokens_per_rank", num_tokens_per_rank),
                                               ("num_tokens_per_rdma_rank", num_tokens_per_rdma_rank),
                                               ("num_tokens_per_expert", num_tokens_per_expert),
                                               ("is_token_in_rank", is_token_in_rank))}, previous_event,
                                        ids_checked)
            self._precheck_dispatch(data, scales, idx, num_experts, None)
            if self._agreeing_now:
                self._agreed(self._dispatch_signature(
                    xd, scales is not None, config, handle=False, topk=True, num_experts=num_experts,
                    num_topk=kd.shape[1], weights=weights is not None, expert_alignment=expert_alignment,
                    num_worst_tokens=num_worst_tokens))
            return self._dispatch_result(self._backend.dispatch(DispatchRequest(
                data, scales, num_experts, topk_idx=idx, topk_weights=weights,
                num_tokens_per_rank=take(num_tokens_per_rank, "num_tokens_per_rank"),
                is_token_in_rank=take(is_token_in_rank, "is_token_in_rank"),
                num_tokens_per_expert=take(num_tokens_per_expert, "num_tokens_per_expert"),
                expert_alignment=expert_alignment, num_worst_tokens=num_worst_tokens, config=config,
                previous_event=previous_event, async_finish=async_finish,
                allocate_on_comm_stream=allocate_on_comm_stream, ids_checked=ids_checked)), xd, scales is not None)

    def _dispatch_result(self, out: DispatchResult, xd, fp8: bool) -> tuple:
        """A dispatch's outputs in the framework of ``x`` (``xd``; ``fp8``: ``x`` was the FP8 pair), as
        ``dispatch`` returns them; the handle keeps the backend's arrays (it never leaves the buffer's
        own calls)."""
        fw = xd.framework
        recv = self._give(out.recv_x, fw, xd.dtype)
        if fp8:
            recv = (recv, self._give(out.recv_x_scales, fw, "float32"))
        return (recv, self._give(out.recv_topk_idx, fw), self._give(out.recv_topk_weights, fw),
                out.num_recv_tokens_per_expert_list, self._handles.add(out.handle), out.event)

    def _dispatch_by_rank_mask(self, data, scales, xd, num_tokens_per_rank, is_token_in_rank,
                               topk_weights, num_worst_tokens, config, previous_event, async_finish,
                               allocate_on_comm_stream) -> tuple:
        """Dispatch routed by ``is_token_in_rank`` only (DeepEP's dispatch without ``topk_idx``):
        internally one expert per rank, so rank r receives the tokens with is_token_in_rank[:, r]."""
        if topk_weights is not None:
            raise DeepEPInvalid("topk_weights: needs topk_idx")
        if is_token_in_rank is None or num_tokens_per_rank is None:
            raise DeepEPInvalid("topk_idx: required unless is_token_in_rank and num_tokens_per_rank "
                                "give the routing")
        num_tokens = xd.shape[0]
        expect_array(is_token_in_rank, "is_token_in_rank", dtype="bool", shape=(num_tokens, self.num_ranks),
                     device=self._device)
        expect_array(num_tokens_per_rank, "num_tokens_per_rank", dtype="int32", shape=(self.num_ranks,),
                     device=self._device)
        in_rank = self._take(is_token_in_rank, "is_token_in_rank")
        per_rank = self._take(num_tokens_per_rank, "num_tokens_per_rank")
        if self._checks_values():
            check_same_values(per_rank, in_rank.sum(axis=0, dtype=self._xp.int32), "num_tokens_per_rank",
                              self._xp, "the column sums of is_token_in_rank")
        self._precheck_dispatch(data, scales, None, self.num_ranks, None)
        self._agreed(self._dispatch_signature(xd, scales is not None, config, handle=False, topk=False,
                                              num_worst_tokens=num_worst_tokens))
        # one expert per rank (the backend builds what its kernels need for that)
        return self._dispatch_result(self._backend.dispatch(DispatchRequest(
            data, scales, self.num_ranks, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
            num_worst_tokens=num_worst_tokens, by_rank_mask=True, config=config, previous_event=previous_event,
            async_finish=async_finish, allocate_on_comm_stream=allocate_on_comm_stream)), xd, scales is not None)

    def _dispatch_signature(self, xd, fp8: bool, config, handle: bool, topk: bool = False,
                            num_experts=None, num_topk=None, weights: bool = False, expert_alignment: int = 1,
                            num_worst_tokens: int = 0) -> list:
        """What every rank's dispatch must share: the row format, the mode (cached, routed by
        ``topk_idx`` or by ``is_token_in_rank`` alone), the expert count and top-k, weights or
        not, alignment, padding and (GPU) the SM count. Not the token counts: those are per rank."""
        sig = [("x", "hidden", int(xd.shape[1])), ("x", "dtype", "float8_e4m3fn" if fp8 else xd.dtype),
               ("handle", "handle", "a handle" if handle else None)]
        if not handle:
            sig += [("topk_idx", "topk_idx", "an array" if topk else None),
                    ("num_worst_tokens", "num_worst_tokens", int(num_worst_tokens))]
        if topk:
            sig += [("num_tokens_per_expert", "num_experts", int(num_experts)), ("topk_idx", "top-k", int(num_topk)),
                    ("topk_weights", "topk_weights", "an array" if weights else None),
                    ("expert_alignment", "expert_alignment", int(expert_alignment))]
        if self._backend.uses_config:
            sig.append(("config", "num_sms", int(config.num_sms)))
        return sig

    def _precheck_dispatch(self, data, scales, idx, num_experts: int, handle) -> None:
        """While agreeing: the backend's own pre-launch checks of a dispatch that depend on this
        rank's token count (the GPU's staging capacity), run among the call's checks so that a rank
        that fails them tells its peers instead of leaving them in the kernel until the timeout."""
        if self._call is not None:
            self._backend.precheck_dispatch(data, scales, idx, num_experts, handle)

    @property
    def _handle_kind(self) -> str:
        return self._backend.dispatch_handle_kind

    def _checks_gpu_bytes(self) -> bool:
        """Whether the reference backend checks this buffer's byte counts as the GPU backend would
        (issue #15): when the buffer was given any (``num_nvl_bytes`` or ``num_rdma_bytes``), i.e.
        sized for the GPU, so code that passes here has the memory it needs there. A buffer of no
        bytes is the reference backend's own mode (it needs no memory) and is not checked. (The GPU
        backend checks its own memory when it lays out its kernels: ``Backend.checks_own_memory``.)"""
        return not self._backend.checks_own_memory and (self.num_nvl_bytes > 0 or self.num_rdma_bytes > 0)

    def _check_row_bytes(self, desc) -> None:
        """A row of ``desc`` (a 2-D ``x``) must be a multiple of 16 bytes: the GPU moves rows with
        16-byte accesses. On the GPU always; on the reference backend where the buffer is sized for
        the GPU (``_checks_gpu_bytes``). (Not for every reference buffer: ``jaxep`` dispatches
        ``[T, K]`` float32 weight gradients unpadded there.)"""
        if self._backend.needs_aligned_rows or self._checks_gpu_bytes():
            expect_row_bytes(desc, desc.name)

    def _check_high_throughput_bytes(self, what: str) -> None:
        """Reference backend, sized buffer: the memory the GPU's high-throughput kernels run in must
        be there: ``num_nvl_bytes`` on one node, and on several ``num_rdma_bytes`` for the RDMA stage.
        (Whether this rank's rows fit the GPU's staging is left to the GPU: it depends on the row
        format the size hint was computed for.)"""
        if not self._checks_gpu_bytes():
            return
        if self.num_nodes > 1:
            if self.num_rdma_bytes <= 0:
                raise DeepEPInvalid(f"num_rdma_bytes: {what} across {self.num_nodes} nodes needs the RDMA region; "
                                    "size it with Buffer.get_internode_size_hint")
            return
        if self.num_nvl_bytes <= 0:
            from .intranode import size_hint
            raise DeepEPInvalid(f"num_nvl_bytes: the high-throughput kernels need symmetric memory; at least "
                                f"{size_hint(self.num_ranks, 1, 128, 1)} bytes (Buffer.get_intranode_size_hint)")

    def _check_low_latency_bytes(self, m: int, hidden: int, num_experts: int) -> None:
        """Reference backend, sized buffer: ``num_rdma_bytes`` must hold the GPU's low-latency region
        for these shapes (``low_latency.size_hint``, as ``get_low_latency_rdma_size_hint``)."""
        if not self._checks_gpu_bytes():
            return
        from .low_latency import size_hint
        need = size_hint(m, hidden, self.num_ranks, num_experts)
        if self.num_rdma_bytes < need:
            raise DeepEPInvalid(f"num_rdma_bytes: the low-latency kernels need {need} bytes for these shapes, "
                                f"the buffer has {self.num_rdma_bytes} (Buffer.get_low_latency_rdma_size_hint)")

    def _check_num_sms(self, config: Config) -> None:
        if config.num_sms < 2:
            raise DeepEPInvalid(f"config.num_sms: need at least 2 (a sender and a receiver), got {config.num_sms}")

    @_checked
    @_collective("combine")
    def combine(self, x, handle, topk_weights=None, bias=None, config: Optional[Config] = None,
                previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                allocate_on_comm_stream: bool = False) -> tuple:
        """Bring every token's copies back to its source and sum them (collective; unweighted,
        like DeepEP's normal combine).

        Arguments:
            x: bf16 or float32 ``[N, H]``, rows as ``dispatch`` returned them.
            handle: the dispatch's handle.
            topk_weights: float32 ``[N, K]``, reduced the same way (optional).
            bias: ``[T, H]`` array or a pair of them (either may be None), added once.
            On the GPU ``x`` and ``bias`` need 16-byte aligned data pointers (16-byte accesses).
            config, previous_event, async_finish, allocate_on_comm_stream: as DeepEP's.

        Returns (arrays of ``x``'s framework):
            combined_x ``[T, H]`` (dtype of ``x``), combined_topk_weights float32 ``[T, K]`` or None,
            event.
        """
        self._live()
        self._check_handle(handle, self._handle_kind)
        expect_stream_args(previous_event, async_finish, allocate_on_comm_stream, EventOverlap)
        rows = self._backend.combine_rows(handle)
        xd = expect_array(x, "x", dtype=("bfloat16", "float32"), shape=(rows, None), device=self._device)
        self._check_row_bytes(xd)
        wd = expect_optional_array(topk_weights, "topk_weights", dtype="float32", shape=(rows, None),
                                   device=self._device)
        if wd is not None and wd.shape[1] > MAX_HT_TOPK:
            raise DeepEPInvalid(f"topk_weights: at most {MAX_HT_TOPK} top-k columns on the GPU, got {wd.shape[1]}")
        if config is not None and not isinstance(config, Config):
            raise DeepEPTypeError(f"config: expected a Config, got {type(config).__name__}")
        biases = bias if isinstance(bias, tuple) else (bias,)
        if len(biases) > 2:
            raise DeepEPInvalid(f"bias: expected an array or a pair, got {len(biases)} items")
        for i, b in enumerate(biases):
            expect_optional_array(b, f"bias[{i}]" if isinstance(bias, tuple) else "bias",
                                  dtype=("bfloat16", "float32"), shape=(handle.num_tokens, xd.shape[1]),
                                  device=self._device)
        for i, b in enumerate(biases):
            if b is not None and arrays.describe(b).dtype != xd.dtype:
                raise DeepEPTypeError(f"bias: expected dtype {xd.dtype} like x, got {arrays.describe(b).dtype}")
        taken = tuple(None if b is None else self._take(b, f"bias[{i}]" if isinstance(bias, tuple) else "bias",
                                                        VECTOR_ALIGNMENT) for i, b in enumerate(biases))
        xt = self._take(x, "x", VECTOR_ALIGNMENT)
        wt = None if topk_weights is None else self._take(topk_weights, "topk_weights")
        if wt is not None and self._checks_values():   # padding rows (source -1) are not read
            check_finite(wt, "topk_weights", self._xp, where=(handle.recv_src_idx >= 0)[:, None])
        if self._backend.uses_config:
            config = config or self.get_combine_config(self.num_ranks)
        if config is not None:
            self._check_num_sms(config)
        self._check_high_throughput_bytes("combine")
        if self._agreeing_now:
            num_biases = sum(b is not None for b in biases)
            sig = [("x", "hidden", int(xd.shape[1])), ("x", "dtype", xd.dtype),
                   ("topk_weights", "topk_weights", None if topk_weights is None else "an array"),
                   ("topk_weights", "top-k", None if topk_weights is None else int(wt.shape[1])),
                   ("bias", "bias", f"{num_biases} array{'s' if num_biases != 1 else ''}" if num_biases else None)]
            if self._backend.uses_config:
                sig.append(("config", "num_sms", int(config.num_sms)))
            self._agreed(sig)
        pair = (taken + (None, None))[:2]   # (a bias, or None, or a pair of them: either may be None)
        out = self._backend.combine(CombineRequest(xt, handle, wt, pair, config, previous_event, async_finish,
                                                   allocate_on_comm_stream))
        fw = xd.framework
        return self._give(out.combined_x, fw, xd.dtype), self._give(out.combined_topk_weights, fw), out.event

    # ---------------------------------------------------------------------------- low-latency mode
    def _check_low_latency_shapes(self, m: int, hidden: int, num_topk: int, num_experts: int,
                                  hidden_name: str = "x") -> None:
        from .low_latency import MAX_EXPERTS, MAX_HIDDEN, MAX_TOKENS, MAX_TOPK
        if num_experts > MAX_EXPERTS:
            raise DeepEPInvalid(f"num_experts: at most {MAX_EXPERTS} supported in low-latency mode, got {num_experts}")
        if m > MAX_TOKENS:
            raise DeepEPInvalid(f"num_max_dispatch_tokens_per_rank: at most {MAX_TOKENS} supported, got {m}")
        if hidden % 128 or not 128 <= hidden <= MAX_HIDDEN:
            raise DeepEPInvalid(f"{hidden_name}: low-latency hidden sizes are multiples of 128 up to {MAX_HIDDEN}, "
                                f"got {hidden}")
        if num_topk > MAX_TOPK:
            raise DeepEPInvalid(f"topk_idx: at most {MAX_TOPK} top-k columns supported, got {num_topk}")

    @_checked
    @_collective("low_latency_dispatch", low_latency=True)
    def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank: int, num_experts: int,
                             use_fp8: bool = True, round_scale: bool = False, use_ue8m0: bool = False,
                             async_finish: bool = False, return_recv_hook: bool = False,
                             cumulative_local_expert_recv_stats=None) -> tuple:
        """Send each token to each of its top-k experts for decoding (collective).

        Arguments:
            x: bf16 ``[T, H]``, ``T <= num_max_dispatch_tokens_per_rank``; ``H`` a multiple of 128 up
                to 8192; on the GPU a 16-byte aligned data pointer.
            topk_idx: int64 ``[T, K]`` (from JAX also int32), -1 for none, ``K <= 16``. On the GPU an id outside
                [-1, num_experts) is sent nowhere (as -1) and the next low-latency call raises
                ``DeepEPInvalid`` (this one, with ``settings.check_values = True``).
            num_max_dispatch_tokens_per_rank: ``M <= 1024``, fixed for the buffer's life (a change
                re-lays the buffer: a collective clean, not allowed during graph capture).
            num_experts: total experts (a multiple of the rank count, at most 1024).
            use_fp8: cast to e4m3 with one float scale per 128 channels; round_scale: powers-of-two
                scales; use_ue8m0: pack those as exponent bytes (needs round_scale).
            async_finish: run on the buffer's stream and return an event instead of making the
                current stream wait.
            return_recv_hook: only issue the sends (on the current stream) and return; ``hook()``
                receives later, on the stream current then. Outputs are valid after the hook. At
                most two operations may wait for their hooks; hooks run in call order. Not with
                ``async_finish``.
            cumulative_local_expert_recv_stats: optional int32 ``[L]`` (writable: not a JAX array)
                that the receive adds ``recv_count`` into, in stream order with it (after the hook
                with ``return_recv_hook``; inside a captured graph at each replay): DeepEP's running
                per-expert load count for monitoring and expert load balancing. Keyword only here
                (DeepEP has it before ``use_fp8``).

        Returns (arrays of ``x``'s framework; with the hook on the reference backend, complete at once):
            recv_x: bf16 ``[L, R*M, H]`` or the pair ``(e4m3 [L, R*M, H], scales)`` (scales float32
            ``[L, R*M, H/128]``, or int32 ``[L, R*M, ceil(H/512)]`` packed UE8M0); recv_count
            int32 ``[L]``; handle; event; hook (None without ``return_recv_hook``).
        """
        self._live()
        m = expect_int(num_max_dispatch_tokens_per_rank, "num_max_dispatch_tokens_per_rank", minimum=1)
        num_experts = self._check_num_experts(num_experts)
        xd = expect_array(x, "x", dtype="bfloat16", ndim=2, device=self._device)
        kd = self._check_topk_idx(topk_idx, num_experts)
        for flag, name in ((use_fp8, "use_fp8"), (round_scale, "round_scale"), (use_ue8m0, "use_ue8m0"),
                           (async_finish, "async_finish"), (return_recv_hook, "return_recv_hook")):
            expect_bool(flag, name)
        if kd.shape[0] != xd.shape[0]:
            raise DeepEPInvalid(f"topk_idx: expected {xd.shape[0]} rows like x, got {kd.shape[0]}")
        if xd.shape[0] > m:
            raise DeepEPInvalid(f"x: {xd.shape[0]} tokens exceed num_max_dispatch_tokens_per_rank={m}")
        self._check_low_latency_shapes(m, xd.shape[1], kd.shape[1], num_experts)
        self._check_low_latency_bytes(m, xd.shape[1], num_experts)
        if use_fp8 and use_ue8m0 and not round_scale:
            raise DeepEPInvalid("use_ue8m0: needs round_scale=True (UE8M0 scales are powers of two)")
        if async_finish and return_recv_hook:
            raise DeepEPInvalid("async_finish: not with return_recv_hook (the hook decides when the receive runs)")
        stats = cumulative_local_expert_recv_stats
        expect_optional_array(stats, "cumulative_local_expert_recv_stats", dtype="int32",
                              shape=(num_experts // self.num_ranks,), device=self._device)
        if stats is not None:
            expect_writable(stats, "cumulative_local_expert_recv_stats")
        idx = self._take_topk_idx(topk_idx)
        xt = self._take(x, "x", VECTOR_ALIGNMENT)
        statst = None if stats is None else self._take(stats, "cumulative_local_expert_recv_stats")
        ids_checked = self._check_ids(idx, num_experts)
        # one source fills at most M slots of an expert's region (only duplicates could exceed it)
        self._backend.check_low_latency_capacity(idx, num_experts, m)
        self._agreed([("x", "hidden", int(xd.shape[1])),
                      ("num_max_dispatch_tokens_per_rank", "num_max_dispatch_tokens_per_rank", m),
                      ("num_experts", "num_experts", num_experts), ("topk_idx", "top-k", int(kd.shape[1])),
                      ("use_fp8", "use_fp8", bool(use_fp8)),
                      ("round_scale", "round_scale", bool(round_scale) if use_fp8 else None),
                      ("use_ue8m0", "use_ue8m0", bool(use_ue8m0) if use_fp8 else None),
                      ("return_recv_hook", "return_recv_hook", bool(return_recv_hook))])
        out = self._backend.low_latency_dispatch(LowLatencyDispatchRequest(
            xt, idx, m, num_experts, use_fp8, round_scale, use_ue8m0, async_finish, return_recv_hook,
            ids_checked, statst))
        fw = xd.framework
        recv = self._give(out.recv_x, fw, "float8_e4m3fn" if use_fp8 else "bfloat16")
        if use_fp8:
            recv = (recv, self._give(out.recv_x_scales, fw))
        return recv, self._give(out.recv_count, fw), self._handles.add(out.handle), out.event, out.hook

    @_checked
    @_collective("low_latency_combine", low_latency=True)
    def low_latency_combine(self, x, topk_idx, topk_weights, handle, zero_copy: bool = False,
                            async_finish: bool = False, return_recv_hook: bool = False, out=None) -> tuple:
        """Weighted sum of each token's top-k expert outputs, back at its source (collective).

        Arguments:
            x: bf16 ``[L, R*M, H]`` expert outputs in the layout ``low_latency_dispatch`` returned.
            topk_idx: int64 ``[T, K]`` as dispatched. topk_weights: float32 ``[T, K]``.
            handle: the dispatch's handle.
            zero_copy: ``x`` is the array ``get_next_low_latency_combine_buffer(handle)`` returned
                (checked). Our combine reads ``x`` in place either way (NVLink stores go straight
                from it); the flag exists for DeepEP compatibility.
            async_finish, return_recv_hook: as in ``low_latency_dispatch``. With the hook, the send
                kernel (on the stream current at the call) is the last reader of ``x``; work queued
                after it on that stream may overwrite ``x`` before ``hook()``.
            out: optional bf16 ``[T, H]`` to write into, writable: not a JAX array (immutable) nor a
                read-only numpy array. On the GPU ``x`` and ``out`` need 16-byte aligned data pointers.

        Returns:
            combined_x bf16 ``[T, H]``: ``out`` itself when given, else an array of ``x``'s framework
            (valid after the hook with ``return_recv_hook``), event, hook (None without
            ``return_recv_hook``).
        """
        self._live()
        self._check_handle(handle, self._backend.low_latency_handle_kind)
        self._check_low_latency_bytes(handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts)
        num_local = handle.num_experts // self.num_ranks
        slots = self.num_ranks * handle.num_max_dispatch_tokens_per_rank
        xd = expect_array(x, "x", dtype="bfloat16", shape=(num_local, slots, handle.hidden), device=self._device)
        kd = self._check_topk_idx(topk_idx, handle.num_experts)
        if kd.shape[0] != handle.num_tokens or kd.shape[1] != handle.num_topk:
            raise DeepEPInvalid(f"topk_idx: the handle was made for shape ({handle.num_tokens}, {handle.num_topk}), "
                                f"got {kd.shape}")
        expect_array(topk_weights, "topk_weights", dtype="float32", shape=kd.shape, device=self._device)
        expect_optional_array(out, "out", dtype="bfloat16", shape=(handle.num_tokens, handle.hidden),
                              device=self._device)
        if out is not None:
            expect_writable(out, "out")
        for flag, name in ((zero_copy, "zero_copy"), (async_finish, "async_finish"),
                           (return_recv_hook, "return_recv_hook")):
            expect_bool(flag, name)
        if async_finish and return_recv_hook:
            raise DeepEPInvalid("async_finish: not with return_recv_hook (the hook decides when the receive runs)")
        xt = self._take(x, "x", VECTOR_ALIGNMENT)
        idx = self._take_topk_idx(topk_idx)
        wt = self._take(topk_weights, "topk_weights")
        outt = None if out is None else self._take(out, "out", VECTOR_ALIGNMENT)
        if self._checks_values():   # the weights of -1 slots are never read
            check_finite(wt, "topk_weights", self._xp, where=idx >= 0)
        if zero_copy and not self._backend.is_low_latency_combine_buffer(xt):
            raise DeepEPInvalid("x: with zero_copy=True, x must be the array get_next_low_latency_combine_buffer"
                                "(handle) returned")
        # where it costs no wait (the reference backend); no blocking check on the GPU here
        self._backend.check_ids(idx, handle.num_experts, blocking=False)
        self._agreed([("x", "hidden", int(handle.hidden)),
                      ("handle", "num_max_dispatch_tokens_per_rank", int(handle.num_max_dispatch_tokens_per_rank)),
                      ("handle", "num_experts", int(handle.num_experts)), ("topk_idx", "top-k", int(kd.shape[1])),
                      ("return_recv_hook", "return_recv_hook", bool(return_recv_hook))])
        res = self._backend.low_latency_combine(LowLatencyCombineRequest(
            xt, idx, wt, handle, outt, async_finish, return_recv_hook))
        # out= was written in place through the backend's view: hand back the caller's own array
        return (out if out is not None else self._give(res.combined_x, xd.framework)), res.event, res.hook

    @_collective("clean_low_latency_buffer")
    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Collective: zero the low-latency buffer and its sequence counters for these shapes.

        Needed only after a failed call (a timeout leaves ranks out of step); a change of shapes
        cleans by itself. Drops operations still waiting for their hooks.
        """
        self._live()
        m = expect_int(num_max_dispatch_tokens_per_rank, "num_max_dispatch_tokens_per_rank", minimum=1)
        hidden = expect_int(hidden, "hidden", minimum=1)
        num_experts = self._check_num_experts(num_experts)
        self._check_low_latency_shapes(m, hidden, 1, num_experts, hidden_name="hidden")
        self._check_low_latency_bytes(m, hidden, num_experts)
        self._agreed([("num_max_dispatch_tokens_per_rank", "num_max_dispatch_tokens_per_rank", m),
                      ("hidden", "hidden", hidden), ("num_experts", "num_experts", num_experts)])
        self._backend.clean_low_latency_buffer(m, hidden, num_experts)   # (reference: a bounded barrier)

    def get_next_low_latency_combine_buffer(self, handle):
        """The bf16 ``[L, R*M, H]`` array to write expert outputs into for a ``zero_copy`` combine
        (owned by the buffer, reused by every call with the same shapes): the backend's own array,
        CuPy on the GPU, numpy on the reference backend (there is no input array to follow)."""
        self._live()
        self._check_handle(handle, self._backend.low_latency_handle_kind)
        return self._backend.get_next_low_latency_combine_buffer(handle)

    def _check_handle(self, handle, kind: str) -> None:
        if type(handle).__name__ != kind:
            raise DeepEPTypeError(f"handle: expected the {kind} returned by this backend's dispatch, "
                                  f"got {type(handle).__name__}")
        self._handles.check(handle, "handle")

    def __repr__(self) -> str:
        state = "destroyed" if self._destroyed else self.backend_name
        return f"Buffer(rank={self.rank}, num_ranks={self.num_ranks}, {state})"
