"""GPU tier: bad input to the GPU backend raises before launch, naming the argument, and the buffer
stays usable (a good layout call right after each one matches the reference). Bad expert ids are
checked here through the blocking ``settings.check_values`` path (raising on the call itself); the
default device-side check, which raises at the next call, is tested in test_no_host_wait_gpu.py."""

import numpy as np
import pytest

from testutil import assert_all_ranks, gpu_skip_reason, world

pytestmark = pytest.mark.skipif(gpu_skip_reason() is not None, reason=str(gpu_skip_reason()))

E, T, K = 256, 512, 8


@pytest.fixture(scope="module")
def buf():
    import deepep_cupy as ep
    b = ep.Buffer(world(), num_nvl_bytes=1 << 20, backend="gpu")
    yield b
    b.destroy()


def _good(rank):
    rng = np.random.default_rng(rank)
    return np.argsort(rng.random((T, E)), axis=1)[:, :K].astype(np.int64)


def _checked(call):
    """``call`` with ``settings.check_values`` on: the host-side check raises on the call itself."""
    def run(b):
        from deepep_cupy import settings
        old = settings.check_values
        settings.check_values = True
        try:
            return call(b)
        finally:
            settings.check_values = old
    return run


def _cases(num_ranks):
    import cupy as cp
    topk = _good(0)
    g = cp.asarray(topk)
    return [
        ("int32", lambda b: b.get_dispatch_layout(g.astype(cp.int32), E), TypeError, "topk_idx: expected dtype int64"),
        ("1-D", lambda b: b.get_dispatch_layout(g[:, 0].copy(), E), ValueError, "expected 2 dimensions"),
        ("non-contiguous", lambda b: b.get_dispatch_layout(g[:, ::2], E), ValueError, "C-contiguous"),
        ("host array to the GPU backend", lambda b: b.get_dispatch_layout(topk, E), ValueError, "topk_idx: expected an array on cuda"),
        ("expert id >= num_experts", _checked(lambda b: b.get_dispatch_layout(cp.where(g == 3, E + 5, g), E)), ValueError, f"found {E + 5}"),
        ("expert id < -1", _checked(lambda b: b.get_dispatch_layout(cp.where(g == 3, -7, g), E)), ValueError, "found -7"),
        ("num_experts not divisible", lambda b: b.get_dispatch_layout(g, num_ranks * 4 + 1), ValueError, "multiple of the"),
        ("num_experts too large", lambda b: b.get_dispatch_layout(g, 1 << 20), ValueError, "at most"),
        ("previous_event type", lambda b: b.get_dispatch_layout(g, E, previous_event=1), TypeError, "previous_event"),
        ("allocate_on_comm_stream alone", lambda b: b.get_dispatch_layout(g, E, allocate_on_comm_stream=True), TypeError, "allocate_on_comm_stream"),
        ("async_finish not a bool", lambda b: b.get_dispatch_layout(g, E, async_finish="yes"), TypeError, "async_finish"),
        ("dispatch without topk_idx", lambda b: b.dispatch(cp.zeros((T, 128), cp.float32)), ValueError, "topk_idx: required"),
        ("low-latency x float32", lambda b: b.low_latency_dispatch(cp.zeros((T, 128), cp.float32), g, T, E), TypeError, "x: expected dtype bfloat16"),
        ("low-latency hidden not /128", lambda b: b.low_latency_dispatch(cp.zeros((T, 200), cp.dtype("bfloat16")), g, T, E), ValueError, "multiples of 128"),
    ]


def test_bad_inputs_then_good_call(buf):
    import cupy as cp
    import deepep_cupy as ep
    from deepep_cupy import reference
    comm = world()
    problems = []
    good = _good(buf.rank)
    want = reference.get_dispatch_layout(good, E, buf.num_ranks)
    for name, call, exc_type, fragment in _cases(buf.num_ranks):
        try:
            call(buf)
            problems.append(f"{name}: no exception")
        except exc_type as e:
            if fragment not in str(e):
                problems.append(f"{name}: message {e!r} lacks {fragment!r}")
            if exc_type is not NotImplementedError and not isinstance(e, ep.DeepEPInvalid):
                problems.append(f"{name}: {type(e).__name__} is not a DeepEPInvalid")
        outs = buf.get_dispatch_layout(cp.asarray(good), E)
        got = [cp.asnumpy(o) for o in (outs[0], outs[2], outs[3])]
        if not all(np.array_equal(a, b) for a, b in zip(got, (want[0], want[2], want[3]))):
            problems.append(f"{name}: the good call after it was wrong")
    assert_all_ranks(comm, not problems, "\n".join(problems))


class _CountingRangeCheck:
    """Counts the buffer's blocking id checks (``GpuBackend.check_index_range``) while installed."""

    def __init__(self, buf):
        self.backend, self.calls = buf._backend, 0
        self.original = self.backend.check_index_range

    def __call__(self, values, name, low, high):
        self.calls += 1
        return self.original(values, name, low, high)

    def __enter__(self):
        self.backend.check_index_range = self
        return self

    def __exit__(self, *exc):
        del self.backend.check_index_range   # the class's method again


def test_check_values_reads_topk_idx_once_per_call(buf):
    """With ``settings.check_values`` a call checks its ids once (each check is a device reduction
    and a host wait): the layout, a dispatch given only ``num_tokens_per_expert`` (it computes the
    rest, and compares what it was given with the layout of ``topk_idx``), and one given the whole
    layout. The results stay right."""
    import cupy as cp
    from deepep_cupy import reference, settings
    comm = world()
    tokens, hidden = 64, 128
    idx = _good(buf.rank)[:tokens]
    g = cp.asarray(idx)
    x = cp.asarray(np.random.default_rng(buf.rank).standard_normal((tokens, hidden), dtype=np.float32))
    counts, problems = {}, []
    want = reference.get_dispatch_layout(idx, E, buf.num_ranks)
    every = comm.allgather(idx)
    want_rows = sum(int(np.any((i >= buf.rank * (E // buf.num_ranks)) & (i < (buf.rank + 1) * (E // buf.num_ranks)),
                               axis=1).sum()) for i in every)
    old = settings.check_values
    settings.check_values = True
    try:
        with _CountingRangeCheck(buf) as c:
            layout = buf.get_dispatch_layout(g, E)
        counts["get_dispatch_layout"] = c.calls
        if not np.array_equal(cp.asnumpy(layout[0]), want[0]):
            problems.append("get_dispatch_layout: num_tokens_per_rank differs from the reference")
        with _CountingRangeCheck(buf) as c:   # the rank counts and the token-in-rank map computed
            recv = buf.dispatch(x, num_tokens_per_expert=layout[2], topk_idx=g)
        counts["dispatch computing the rest of the layout"] = c.calls
        if recv[0].shape[0] != want_rows:
            problems.append(f"dispatch computing the layout: {recv[0].shape[0]} rows, want {want_rows}")
        with _CountingRangeCheck(buf) as c:
            recv = buf.dispatch(x, num_tokens_per_rank=layout[0], is_token_in_rank=layout[3],
                                num_tokens_per_expert=layout[2], topk_idx=g)
        counts["dispatch with the layout"] = c.calls
        if recv[0].shape[0] != want_rows:
            problems.append(f"dispatch with the layout: {recv[0].shape[0]} rows, want {want_rows}")
    finally:
        settings.check_values = old
    problems += [f"{what}: {n} id checks, want 1" for what, n in counts.items() if n != 1]
    assert_all_ranks(comm, not problems, "\n".join(problems))
