"""NVSHMEM lifecycle from any mpi4py communicator, through nvshmem4py.

One PE per process and per GPU. ``acquire(comm, symmetric_bytes)`` initialises NVSHMEM on first use
(rank 0 makes a unique id, the communicator broadcasts it, every rank calls
``nvshmem.core.init(initializer_method="uid")``); later buffers share it, and ``release()`` by the
last holder frees everything and finalises. Init -> finalise -> init again in one process works.

The communicator's ranks become PEs 0..n-1 in order, so a sub-communicator gives its own PE numbering.
NVSHMEM reads its heap size from ``NVSHMEM_SYMMETRIC_SIZE`` at init; when the user has not set it,
``acquire`` sets it from the request (plus headroom) here, the only place the package writes the
environment.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from typing import Optional

from .. import discovery
from ..config import settings
from ..errors import DeepEPError, DeepEPInvalid

__all__ = ["NvshmemRuntime", "acquire", "release", "active", "forget", "timed_barrier"]

log = logging.getLogger(__name__)

_HEAP_HEADROOM = 64 << 20     # NVSHMEM keeps internal state (signals, barriers) on the heap too
_HEAP_ALIGN = 32 << 20
# the heap is fixed at init, so leave room for later buffers (DeepEP users keep a high-throughput
# and a low-latency buffer side by side); 1 GiB is also NVSHMEM's own default
_HEAP_FLOOR = 1 << 30


def _round_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def timed_barrier(comm, timeout_seconds: float) -> bool:
    """Collective barrier that gives up: True once every rank of ``comm`` arrived, False if some
    did not within ``timeout_seconds`` (a dead rank: ``comm.Barrier()`` would wait forever)."""
    import time
    request = comm.Ibarrier()
    deadline = time.monotonic() + timeout_seconds
    while not request.Test():
        if time.monotonic() > deadline:
            return False
        time.sleep(1e-3)
    return True


@dataclasses.dataclass
class _State:
    runtime: Optional["NvshmemRuntime"] = None
    holders: int = 0
    heap_env_we_set: Optional[str] = None   # so a later init may resize a heap we chose
    abandoned: bool = False                 # a teardown found a peer gone: no NVSHMEM again here


_state = _State()
_lock = threading.Lock()


class NvshmemRuntime:
    """The initialised NVSHMEM library of this process (use ``acquire``; never build it yourself).

    Attributes:
        comm: the mpi4py communicator it was built from. rank, num_ranks: this PE and the PE count.
        device_id: the CUDA device this PE is bound to. local_rank: rank among the node's ranks.
        heap_bytes: NVSHMEM_SYMMETRIC_SIZE in force.
    """

    def __init__(self, comm, heap_bytes: int):
        import cupy
        from mpi4py import MPI

        try:
            import nvshmem.core as nvcore
            import nvshmem.bindings as nvbind
            from cuda.core import Device as CoreDevice
        except ImportError as e:
            raise DeepEPError(f"nvshmem4py / cuda.core not importable ({e}); "
                              "pip install nvshmem4py-cu13 cuda-core") from e
        self._nvcore, self._nvbind = nvcore, nvbind
        self.comm = comm
        self.rank, self.num_ranks = comm.Get_rank(), comm.Get_size()
        local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
        local.Free()
        ndev = discovery.gpu_count()
        if ndev == 0:
            raise DeepEPError(f"rank {self.rank}: no CUDA GPU visible; use backend='reference' on CPUs")
        # settings.share_gpus (testing on a machine with fewer GPUs, under CUDA MPS): ranks share
        # a GPU, and kernels that wait on peers size their grids to their share of the SMs, since a
        # waiting grid must fit on the GPU beside its peers' grids
        if self.local_size > ndev and not settings.share_gpus:
            raise DeepEPError(f"rank {self.rank}: {self.local_size} ranks on this node but only {ndev} "
                              "GPUs; deepep_cupy runs one process per GPU (settings.share_gpus lets "
                              "ranks share GPUs under CUDA MPS, for tests only)")
        self.ranks_per_gpu = -(-self.local_size // ndev)
        self.device_id = self.local_rank % ndev
        cupy.cuda.Device(self.device_id).use()
        self._core_device = CoreDevice(self.device_id)
        self._core_device.set_current()
        self.heap_bytes = heap_bytes
        self.install = discovery.nvshmem()

        # unique id on rank 0, broadcast; an error on rank 0 is broadcast too so nobody hangs
        err, uid = None, None
        if self.rank == 0:
            try:
                uid = nvcore.get_unique_id()
            except Exception as e:  # noqa: BLE001 - reported to every rank below
                err = f"{type(e).__name__}: {e}"
        err = comm.bcast(err, root=0)
        if err:
            raise DeepEPError(f"NVSHMEM unique-id creation failed on rank 0: {err}")
        if uid is None:
            uid = nvcore.get_unique_id(empty=True)
        import numpy as np
        comm.Bcast(uid._data.view(np.int8), root=0)
        nvcore.init(device=self._core_device, uid=uid, rank=self.rank, nranks=self.num_ranks,
                    initializer_method="uid")
        pe, npes = int(nvbind.my_pe()), int(nvbind.n_pes())
        if (pe, npes) != (self.rank, self.num_ranks):
            raise DeepEPError(f"rank {self.rank}: NVSHMEM says PE {pe} of {npes}, expected "
                              f"{self.rank} of {self.num_ranks}")
        lib_version = nvcore.get_version().libnvshmem_version
        if lib_version != self.install.version_str:
            raise DeepEPError(f"NVSHMEM host library {lib_version} differs from the headers kernels "
                              f"compile against ({self.install.version_str} at {self.install.root})")
        self._arrays = []
        self._modules = []
        log.info("rank %d: NVSHMEM %s up on GPU %d, heap %d MiB", self.rank, lib_version,
                 self.device_id, heap_bytes >> 20)

    # -------------------------------------------------------------------------------------------
    def alloc(self, nbytes: int):
        """Collective: a symmetric uint8 CuPy array of ``nbytes`` (same size on every PE)."""
        from nvshmem.core.interop.cupy import array as nv_array
        arr = nv_array((max(int(nbytes), 1),), dtype="uint8")
        self._arrays.append(arr)
        return arr

    def free(self, arr) -> None:
        """Collective: free a symmetric array made by ``alloc``."""
        from nvshmem.core.interop.cupy import free_array
        self._arrays = [a for a in self._arrays if a is not arr]
        free_array(arr)

    def peer_ptr(self, arr, pe: int) -> int:
        """Address of ``arr``'s copy on PE ``pe`` as this GPU sees it over NVLink, or 0 where the
        peer is not load/store reachable (then kernels must use NVSHMEM puts)."""
        return int(self._nvbind.ptr(int(arr.data.ptr), int(pe)) or 0)

    def barrier(self, stream=None) -> None:
        """Barrier over all PEs: on ``stream`` (a CuPy stream) if given, else on the host."""
        if stream is None:
            self._nvbind.barrier_all()
        else:
            self._nvbind.barrier_all_on_stream(int(stream.ptr))

    def register_module(self, loaded) -> None:
        """Make a JIT module's NVSHMEM device calls work (``nvshmemx_cumodule_init``)."""
        if any(m is loaded for m in self._modules):
            return
        rc = self._nvbind.cumodule_init(loaded.handle)
        if rc not in (None, 0):
            raise DeepEPError(f"nvshmemx_cumodule_init failed (rc={rc}) for {loaded.compiled.spec.source}")
        self._modules.append(loaded)

    def _finalize(self) -> None:
        import cupy
        from .. import jit

        cupy.cuda.Device(self.device_id).synchronize()
        if not timed_barrier(self.comm, settings.timeout_seconds):
            self._abandon("finalising NVSHMEM")
            return
        for arr in list(self._arrays):
            self.free(arr)
        for mod in self._modules:
            self._nvbind.cumodule_finalize(mod.handle)   # nvshmem4py's module_finalize is broken
        registered = {id(m) for m in self._modules}
        jit.forget_loaded(lambda m: id(m) in registered)  # those modules die with this runtime
        self._modules = []
        self._nvcore.finalize()
        log.info("rank %d: NVSHMEM finalised", self.rank)

    def _abandon(self, during: str) -> None:
        """A peer did not arrive for a collective step: leave NVSHMEM as it is (freeing and
        finalising are collective and would wait for it forever). The memory goes with the
        process; NVSHMEM cannot be initialised again in it."""
        _state.abandoned = True
        self._arrays, self._modules = [], []
        log.warning("rank %d: a peer did not arrive while %s; NVSHMEM left unfinalised (exit this process)",
                    self.rank, during)


def acquire(comm, symmetric_bytes: int) -> NvshmemRuntime:
    """Collective: the process's NVSHMEM runtime, initialised on first use, with one more holder.

    Arguments:
        comm: mpi4py communicator; every rank of it must call.
        symmetric_bytes: symmetric heap the caller will allocate (sizes NVSHMEM_SYMMETRIC_SIZE,
            at least 1 GiB, when the user has not set it).
    Raises:
        DeepEPInvalid: a second buffer asks for a different communicator size or a bigger heap than
            the running runtime has.
        DeepEPError: NVSHMEM or the GPU setup failed.
    """
    with _lock:
        rt = _state.runtime
        if rt is None and _state.abandoned:
            raise DeepEPError("NVSHMEM was left unfinalised after a peer did not arrive at a buffer's "
                              "teardown; start a new process")
        if rt is None:
            want = max(_HEAP_FLOOR, _round_up(int(symmetric_bytes) + _HEAP_HEADROOM, _HEAP_ALIGN))
            user = os.environ.get("NVSHMEM_SYMMETRIC_SIZE")
            if user is None or user == _state.heap_env_we_set:
                os.environ["NVSHMEM_SYMMETRIC_SIZE"] = _state.heap_env_we_set = str(want)
                heap = want
            else:
                heap = _parse_size(user)
                if heap < int(symmetric_bytes) + _HEAP_HEADROOM:
                    raise DeepEPInvalid(f"num_nvl_bytes/num_rdma_bytes: {symmetric_bytes} bytes plus "
                                        f"{_HEAP_HEADROOM >> 20} MiB of NVSHMEM state exceed "
                                        f"NVSHMEM_SYMMETRIC_SIZE={user}; raise it or unset it")
            rt = NvshmemRuntime(comm, heap)
            _state.runtime = rt
        else:
            if comm.Get_size() != rt.num_ranks or comm.Get_rank() != rt.rank:
                raise DeepEPInvalid(f"comm: NVSHMEM already runs on {rt.num_ranks} PEs (this rank is PE "
                                    f"{rt.rank}); a second buffer must use the same communicator layout")
            used = sum(int(a.nbytes) for a in rt._arrays)
            if used + symmetric_bytes + _HEAP_HEADROOM > rt.heap_bytes:
                raise DeepEPInvalid(f"num_nvl_bytes/num_rdma_bytes: {symmetric_bytes} more bytes do not "
                                    f"fit the running NVSHMEM heap of {rt.heap_bytes} ({used} in use); "
                                    "destroy other buffers first or set NVSHMEM_SYMMETRIC_SIZE")
        _state.holders += 1
        return rt


def release() -> None:
    """Collective: drop one holder; the last one frees all symmetric memory and finalises NVSHMEM."""
    with _lock:
        if _state.holders == 0:
            return
        _state.holders -= 1
        if _state.holders == 0 and _state.runtime is not None:
            rt, _state.runtime = _state.runtime, None
            rt._finalize()


def forget() -> None:
    """Drop the runtime without finalising it (after ``NvshmemRuntime._abandon``)."""
    with _lock:
        _state.runtime, _state.holders = None, 0


def active() -> Optional[NvshmemRuntime]:
    """The running runtime, or None."""
    return _state.runtime


def _parse_size(text: str) -> int:
    """NVSHMEM_SYMMETRIC_SIZE as NVSHMEM reads it: bytes, or a number with K/M/G/T (an optional B)."""
    raw = text
    text = text.strip().upper().removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if text and text[-1] in scale:
            return int(float(text[:-1]) * scale[text[-1]])
        return int(text)
    except ValueError:
        raise DeepEPInvalid(f"NVSHMEM_SYMMETRIC_SIZE: expected bytes like 2147483648 or 2G, got {raw!r}") from None
