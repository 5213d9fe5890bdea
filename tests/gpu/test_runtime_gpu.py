"""GPU tier: the NVSHMEM runtime lifecycle and a symmetric exchange between all ranks.

Run with ``mpirun -n 2 python -m pytest tests/gpu`` on the GPU machine; skips without GPUs.
These tests need NVSHMEM not to be running when they start: other GPU test modules destroy their
buffers in module-scoped fixtures, so they may run before or after this file.
"""

import pytest

from testutil import assert_all_ranks, gpu_skip_reason, world

pytestmark = pytest.mark.skipif(gpu_skip_reason() is not None, reason=str(gpu_skip_reason()))


def test_init_exchange_finalize_twice_in_one_process():
    import deepep_cupy as ep
    from deepep_cupy import selftest
    from deepep_cupy.runtime import nvshmem as rt

    comm = world()
    assert rt.active() is None, "another test left NVSHMEM running"
    for round_id in (1, 2):
        buf = ep.Buffer(comm, num_nvl_bytes=16 << 20, backend="gpu")
        assert rt.active() is not None and rt.active().num_ranks == comm.Get_size()
        report = selftest.symmetric_exchange(buf, num_bytes=4 << 20, round_id=round_id)
        assert_all_ranks(comm, report.ok, str(report))
        assert report.put_bytes == 4 << 20 and report.put_mismatches == 0
        assert report.peer_mapped and report.store_mismatches == 0
        buf.destroy()
        buf.destroy()  # idempotent
        assert rt.active() is None, "the last buffer must finalise NVSHMEM"


def test_finalised_only_when_the_last_buffer_goes():
    import deepep_cupy as ep
    from deepep_cupy import selftest
    from deepep_cupy.runtime import nvshmem as rt

    comm = world()
    with ep.Buffer(comm, num_nvl_bytes=4 << 20, backend="gpu") as first:
        second = ep.Buffer(comm, num_nvl_bytes=4 << 20, backend="gpu")
        assert rt.active() is not None
        second.destroy()
        assert rt.active() is not None, "first buffer still holds NVSHMEM"
        report = selftest.symmetric_exchange(first, num_bytes=1 << 20, round_id=7)
        assert_all_ranks(comm, report.ok, str(report))
    assert rt.active() is None


def test_a_second_buffer_fits_the_heap_or_is_refused_before_allocating():
    """A small first buffer leaves room (the heap is at least 1 GiB) for a 200 MiB second one, as with
    a high-throughput and a low-latency buffer side by side; one that cannot fit raises
    DeepEPInvalid naming the arguments, and the first buffer stays usable."""
    import os
    import deepep_cupy as ep
    from deepep_cupy import selftest
    from deepep_cupy.runtime import nvshmem as rt

    comm = world()
    if "NVSHMEM_SYMMETRIC_SIZE" in os.environ and rt.active() is None and \
            os.environ["NVSHMEM_SYMMETRIC_SIZE"] != rt._state.heap_env_we_set:
        pytest.skip("NVSHMEM_SYMMETRIC_SIZE set by the user")
    with ep.Buffer(comm, num_nvl_bytes=8 << 20, backend="gpu") as first:
        with ep.Buffer(comm, num_rdma_bytes=200 << 20, low_latency_mode=True, backend="gpu"):
            pass
        with pytest.raises(ep.DeepEPInvalid, match="num_nvl_bytes/num_rdma_bytes"):
            ep.Buffer(comm, num_nvl_bytes=rt.active().heap_bytes, backend="gpu")
        report = selftest.symmetric_exchange(first, num_bytes=1 << 20, round_id=9)
        assert_all_ranks(comm, report.ok, str(report))


def test_destroyed_buffer_rejects_calls():
    import numpy as np
    import cupy as cp
    import deepep_cupy as ep

    buf = ep.Buffer(world(), num_nvl_bytes=1 << 20, backend="gpu")
    buf.destroy()
    with pytest.raises(ep.DeepEPInvalid, match="destroyed"):
        buf.get_dispatch_layout(cp.asarray(np.zeros((4, 2), np.int64)), 8)


def test_nvcc_route_modules_run():
    """The nvcc -rdc + libnvshmem_device.a route (keeps IBGDA) builds modules that run: the
    NVSHMEM exchange and the layout kernel, compiled that way, give the same answers."""
    import cupy as cp
    import numpy as np
    import deepep_cupy as ep
    from deepep_cupy import reference, selftest

    comm = world()
    with ep.Buffer(comm, num_nvl_bytes=8 << 20, backend="gpu",
                   jit_options=ep.JitOptions(route="nvcc")) as buf:
        report = selftest.symmetric_exchange(buf, num_bytes=2 << 20, round_id=3)
        assert_all_ranks(comm, report.ok, str(report))
        assert buf._backend.layout_kernel().module.compiled.route == "nvcc"
        rng = np.random.default_rng(buf.rank)
        topk = np.argsort(rng.random((1000, 64)), axis=1)[:, :6].astype(np.int64)
        outs = buf.get_dispatch_layout(cp.asarray(topk), 64)
        want = reference.get_dispatch_layout(topk, 64, buf.num_ranks)
        ok = all(np.array_equal(cp.asnumpy(outs[i]), want[i]) for i in (0, 2, 3))
        assert_all_ranks(comm, ok, "nvcc-route layout differs from the reference")
