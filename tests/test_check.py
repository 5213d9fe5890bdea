"""Buffer.check and settings.check_each_call on the CPU reference backend (the GPU behaviour, where
errors come from kernels, is in tests/gpu/test_check_gpu.py)."""

import numpy as np
import pytest


@pytest.fixture
def ref_buf():
    from mpi4py import MPI
    import deepep_cupy as ep
    b = ep.Buffer(MPI.COMM_SELF, backend="reference")
    yield b
    b.destroy()


def test_check_passes_on_a_healthy_reference_buffer(ref_buf):
    idx = np.array([[0, 3], [1, -1]], dtype=np.int64)
    per_rank, _, per_expert, in_rank, _ = ref_buf.get_dispatch_layout(idx, 4)
    assert per_expert.tolist() == [1, 1, 0, 1]
    ref_buf.check()                 # nothing reported: returns


def test_check_after_destroy_names_the_buffer():
    from mpi4py import MPI
    import deepep_cupy as ep
    b = ep.Buffer(MPI.COMM_SELF, backend="reference")
    b.destroy()
    with pytest.raises(ep.DeepEPInvalid, match="destroyed"):
        b.check()


def test_check_each_call_leaves_reference_results_unchanged(ref_buf):
    import deepep_cupy as ep
    idx = np.array([[2, 0]], dtype=np.int64)
    old = ep.settings.check_each_call
    ep.settings.check_each_call = True
    try:
        out = ref_buf.get_dispatch_layout(idx, 4)
    finally:
        ep.settings.check_each_call = old
    assert out[2].tolist() == [1, 0, 1, 0]
    # the decorator keeps each method's name and docstring
    assert ep.Buffer.dispatch.__name__ == "dispatch" and "dispatch" in ep.Buffer.dispatch.__doc__.lower()


def test_low_latency_handle_indexes_like_deepep_tuple():
    """DeepEP v1 code reads handle[0] (src_info) and handle[1] (layout_range) and unpacks the
    5-tuple; it runs unchanged on our named handle (reference backend here, same mixin on the GPU)."""
    from mpi4py import MPI
    import ml_dtypes
    import deepep_cupy as ep
    b = ep.Buffer(MPI.COMM_SELF, backend="reference", low_latency_mode=True)
    try:
        x = np.ones((3, 2048), ml_dtypes.bfloat16)
        idx = np.array([[0, 1], [2, -1], [3, 0]], np.int64)
        _, count, handle, _, _ = b.low_latency_dispatch(x, idx, 8, 4, use_fp8=False)
        src_info, layout_range, m, hidden, num_experts = handle       # DeepEP's unpacking
        assert len(handle) == 5 and (m, hidden, num_experts) == (8, 2048, 4)
        assert handle[0] is handle.recv_src_info
        assert np.array_equal(handle[1], handle.layout_range) and layout_range.dtype == np.int64
        # expert 0 got tokens 0 and 2 (k 0 and 1); DeepEP's packing: begin << 32 | count
        assert int(count[0]) == 2 and int(layout_range[0, 0]) == 2
        assert sorted(src_info[0, :2].tolist()) == [0, 2]
    finally:
        b.destroy()
