"""GPU tier: get_dispatch_layout on the GPU equals the numpy reference on random and adversarial
routings, from CuPy and from JAX input; async events; bad inputs leave the buffer usable."""

import itertools

import numpy as np
import pytest

from testutil import assert_all_ranks, gpu_skip_reason, world

pytestmark = pytest.mark.skipif(gpu_skip_reason() is not None, reason=str(gpu_skip_reason()))


@pytest.fixture(scope="module")
def buf():
    import deepep_cupy as ep
    b = ep.Buffer(world(), num_nvl_bytes=1 << 20, backend="gpu")
    yield b
    b.destroy()


def make_routing(kind, num_tokens, num_topk, num_experts, num_ranks, seed):
    """topk_idx int64 [T, K] for a named routing pattern."""
    rng = np.random.default_rng(seed)
    per_rank = num_experts // num_ranks
    if num_tokens == 0:
        return np.zeros((0, num_topk), np.int64)
    if kind in ("random", "holes"):
        k = min(num_topk, num_experts)
        idx = np.argsort(rng.random((num_tokens, num_experts)), axis=1)[:, :k]
        out = np.full((num_tokens, num_topk), -1, np.int64)
        out[:, :k] = idx
        if kind == "holes":
            out[rng.random(out.shape) < 0.3] = -1
        return out
    if kind == "hot":            # every token picks expert 0 first, the rest random
        out = rng.integers(0, num_experts, (num_tokens, num_topk))
        out[:, 0] = 0
        return out.astype(np.int64)
    if kind == "rank0_only":     # every other rank receives nothing
        return rng.integers(0, per_rank, (num_tokens, num_topk)).astype(np.int64)
    if kind == "all_minus_one":
        return np.full((num_tokens, num_topk), -1, np.int64)
    if kind == "last_expert":
        return np.full((num_tokens, num_topk), num_experts - 1, np.int64)
    raise ValueError(kind)


def reference_layout(topk, num_experts, num_ranks, ranks_per_node):
    from deepep_cupy import reference
    return reference.get_dispatch_layout(topk, num_experts, num_ranks,
                                         ranks_per_node if ranks_per_node < num_ranks else None)


def check_equal(outs, ref):
    names = ("num_tokens_per_rank", "num_tokens_per_rdma_rank", "num_tokens_per_expert", "is_token_in_rank")
    problems = []
    for name, got, want in zip(names, outs, ref):
        if want is None or got is None:
            if (want is None) != (got is None):
                problems.append(f"{name}: got {type(got)}, expected {type(want)}")
            continue
        got = np.asarray(got)
        if got.shape != want.shape or got.dtype != want.dtype or not np.array_equal(got, want):
            problems.append(f"{name}: shape {got.shape}/{want.shape} dtype {got.dtype}/{want.dtype} "
                            f"equal={got.shape == want.shape and np.array_equal(got, want)}")
    return problems


CASES = list(itertools.product([0, 1, 4096], [1, 8, 9], [8, 256, 288]))
KINDS = ["random", "holes", "hot", "rank0_only", "all_minus_one", "last_expert"]


def test_layout_matches_reference_cupy(buf):
    import cupy as cp
    comm = world()
    problems, checked = [], 0
    for case_id, (t, k, e) in enumerate(CASES):
        kind = KINDS[case_id % len(KINDS)]
        for kind in {kind, "holes"}:
            topk = make_routing(kind, t, k, e, buf.num_ranks, seed=1000 * case_id + buf.rank)
            outs = buf.get_dispatch_layout(cp.asarray(topk), e)
            host = [None if o is None else cp.asnumpy(o) for o in outs[:4]]
            assert all(isinstance(o, cp.ndarray) for o in outs[:4] if o is not None)
            p = check_equal(host, reference_layout(topk, e, buf.num_ranks, buf.ranks_per_node))
            problems += [f"T={t} K={k} E={e} {kind}: {m}" for m in p]
            checked += 1
    assert checked >= 40
    assert_all_ranks(comm, not problems, "\n".join(problems[:10]))


def test_layout_matches_reference_jax(buf):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    jax.config.update("jax_enable_x64", True)
    comm = world()
    dev = [d for d in jax.devices() if d.platform == "gpu"][buf._backend.device_id]
    problems = []
    for case_id, (t, k, e) in enumerate(CASES[::2]):
        kind = KINDS[case_id % len(KINDS)]
        topk = make_routing(kind, t, k, e, buf.num_ranks, seed=77 + case_id)
        x = jax.device_put(jnp.asarray(topk, dtype=jnp.int64), dev)
        outs = buf.get_dispatch_layout(x, e)
        for o in outs[:4]:
            if o is not None and not isinstance(o, jax.Array):
                problems.append(f"output type {type(o)} is not a jax.Array")
        host = [None if o is None else np.asarray(o) for o in outs[:4]]
        p = check_equal(host, reference_layout(topk, e, buf.num_ranks, buf.ranks_per_node))
        problems += [f"jax T={t} K={k} E={e} {kind}: {m}" for m in p]
    assert_all_ranks(comm, not problems, "\n".join(problems[:10]))


def test_layout_async_event_and_previous_event(buf):
    import cupy as cp
    from deepep_cupy import EventOverlap
    topk = make_routing("random", 4096, 8, 256, buf.num_ranks, seed=5)
    x = cp.asarray(topk)
    outs = buf.get_dispatch_layout(x, 256, async_finish=True)
    event = outs[-1]
    assert isinstance(event, EventOverlap)
    event.current_stream_wait()
    ref = reference_layout(topk, 256, buf.num_ranks, buf.ranks_per_node)
    assert not check_equal([None if o is None else cp.asnumpy(o) for o in outs[:4]], ref)
    prev = buf.capture()            # DeepEP's name for an event recorded on the current stream
    assert isinstance(prev, EventOverlap) and isinstance(prev.event, cp.cuda.Event)
    outs = buf.get_dispatch_layout(x, 256, previous_event=prev, async_finish=True,
                                   allocate_on_comm_stream=True)
    with outs[-1]:
        pass
    assert not check_equal([None if o is None else cp.asnumpy(o) for o in outs[:4]], ref)


def test_layout_repeated_calls_are_identical(buf):
    """The workspace is left zeroed by every launch: 200 back-to-back calls give one answer."""
    import cupy as cp
    topk = cp.asarray(make_routing("hot", 4096, 8, 256, buf.num_ranks, seed=9))
    first = [cp.asnumpy(o) for o in buf.get_dispatch_layout(topk, 256)[:4] if o is not None]
    for _ in range(200):
        outs = buf.get_dispatch_layout(topk, 256, async_finish=True)
    outs[-1].current_stream_wait()
    last = [cp.asnumpy(o) for o in outs[:4] if o is not None]
    assert all(np.array_equal(a, b) for a, b in zip(first, last))


def test_layout_in_cuda_graph(buf):
    import cupy as cp
    topk_np = make_routing("random", 1024, 8, 256, buf.num_ranks, seed=11)
    topk = cp.asarray(topk_np)
    buf.get_dispatch_layout(topk, 256)  # compile + warm outside the capture
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        outs = buf.get_dispatch_layout(topk, 256)
        graph = stream.end_capture()
    ref = reference_layout(topk_np, 256, buf.num_ranks, buf.ranks_per_node)
    for it in range(20):
        new = make_routing("holes", 1024, 8, 256, buf.num_ranks, seed=100 + it)
        with stream:
            topk[...] = cp.asarray(new)
        graph.launch(stream)
        stream.synchronize()
        ref = reference_layout(new, 256, buf.num_ranks, buf.ranks_per_node)
        assert not check_equal([None if o is None else cp.asnumpy(o) for o in outs[:4]], ref)
