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
