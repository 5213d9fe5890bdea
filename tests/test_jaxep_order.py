"""The GPU form of jaxep chains its callbacks with an order token (``jaxep._chain_token``), so that
XLA cannot run two collectives of one program in different orders on different ranks (it did, on
the GPU, before the token went through the custom_vjp: a rank ran its third dispatch first).

The GPU itself is not needed to check the chain: a fake callback stands in for the buffer_callback.
It fills every output with "1 + the largest token it was given" and returns that as its token, so
the values a jitted program returns say in which order its callbacks were chained: without a data
dependence from each callback to the previous one, two of them would both see 0 and return 1. The
chain reads JAX's current-trace state, which a JAX upgrade could move: these run under the JAX
installed here (and on the GPU machine's).
"""

import types

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy

from deepep_cupy import jaxep  # noqa: E402


class FakeGpuOps:
    """What jaxep reads of a GPU operation set, without a Buffer or a GPU."""

    backend = "gpu"
    device_id = 0

    def __init__(self):
        self.callbacks = {}
        self.chain = None


@pytest.fixture
def fake(monkeypatch):
    """(a fake GPU buffer for the public functions, the labels of the callbacks as staged)."""
    ops = FakeGpuOps()
    labels = []

    def make_callback(ops_, result_specs, in_dtypes, run, label=""):
        assert np.dtype(in_dtypes[-1]) == np.float32 and tuple(result_specs[-1].shape) == (1,)
        assert all(np.dtype(d).name != "float8_e4m3fn" for d in in_dtypes), "FP8 must cross as uint8"

        def callback(*args):
            labels.append(label)
            step = jnp.max(args[-1]) + 1          # 1 + the latest of the tokens given
            outs = tuple(jnp.full(s.shape, step).astype(s.dtype) for s in result_specs[:-1])
            return outs + (jnp.reshape(step, (1,)).astype(jnp.float32),)
        return callback

    monkeypatch.setattr(jaxep, "_make_callback", make_callback)
    monkeypatch.setattr(jaxep, "_ops_for", lambda buf: ops)
    return types.SimpleNamespace(num_ranks=2, backend_name="gpu"), labels


T, H, K, E = 4, 128, 2, 4


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((T, H)), jnp.float32)
    idx = jnp.asarray(rng.integers(0, E, (T, K)), jnp.int32)
    return x, idx


def first(a):
    return float(np.asarray(a).reshape(-1)[0])


def test_independent_dispatches_in_one_jit_run_in_program_order(fake):
    buf, labels = fake
    x, idx = inputs()

    @jax.jit
    def f(x, y, z):
        a = jaxep.dispatch(buf, x, idx, num_experts=E)[0]
        b = jaxep.dispatch(buf, y, idx, num_experts=E)[0]
        c = jaxep.dispatch(buf, z[::-1], idx[::-1], num_experts=E)[0]
        return a, b, c

    a, b, c = f(x, x * 2, x * 3)
    assert labels == ["dispatch"] * 3
    assert [first(a), first(b), first(c)] == [1.0, 2.0, 3.0]


def test_every_public_operation_joins_the_chain(fake):
    buf, _ = fake
    x, idx = inputs()
    w = jnp.ones((T, K), jnp.float32)

    @jax.jit
    def f(x):
        recv, _, _, _, h = jaxep.dispatch(buf, x, idx, w, num_experts=E)
        again = jaxep.cached_dispatch(buf, x, h)
        out, out_w = jaxep.combine(buf, recv, h, jnp.ones((recv.shape[0], K), jnp.float32))
        lx, _, lh = jaxep.low_latency_dispatch(buf, x.astype(jnp.bfloat16), idx, 8, E, use_fp8=False)
        ly = jaxep.low_latency_combine(buf, lx, idx, w, lh)
        return recv, again, out, out_w, lx, ly

    values = [first(v) for v in f(x)]
    assert values == [1.0, 2.0, 3.0, 3.0, 4.0, 5.0]


def test_two_micro_batches_forward_and_backward_form_one_chain(fake):
    """Forward: A's dispatch, B's dispatch, A's combine, B's combine (1..4). Backward, in reverse,
    after the whole forward (each backward callback also takes its forward's token): B's combine
    (a cached dispatch, 5), A's combine (6), B's dispatch (a combine, 7), A's dispatch (8)."""
    buf, labels = fake
    xa, idx = inputs(1)
    xb, _ = inputs(2)

    def loss(xa, xb):
        ra, _, _, _, ha = jaxep.dispatch(buf, xa, idx, num_experts=E)
        rb, _, _, _, hb = jaxep.dispatch(buf, xb, idx, num_experts=E)
        ya = jaxep.combine(buf, ra, ha)[0]
        yb = jaxep.combine(buf, rb, hb)[0]
        return jnp.sum(ya) + jnp.sum(yb)

    ga, gb = jax.jit(jax.grad(loss, argnums=(0, 1)))(xa, xb)
    assert labels[:4] == ["dispatch", "dispatch", "combine", "combine"]
    assert labels[4:] == ["cached_dispatch", "cached_dispatch", "combine", "combine"]
    # the gradients are the outputs of the dispatches' backward combines
    assert (first(gb), first(ga)) == (7.0, 8.0)


def test_a_new_trace_starts_a_new_chain(fake):
    buf, _ = fake
    x, idx = inputs()
    for _ in range(2):      # a new function each time: JAX caches traces by function
        out = jax.jit(lambda x: jaxep.dispatch(buf, x, idx, num_experts=E)[0])(x)
        # the second trace must not pick up the first's (dead) tracer: it starts again from 0
        assert first(out) == 1.0


def test_fp8_crosses_as_bytes_and_comes_back_as_fp8(fake):
    ops = jaxep._ops_for(None)
    spec = (jax.ShapeDtypeStruct((4, 128), jnp.float8_e4m3fn),)
    token = jnp.zeros((1,), jnp.float32)
    outs, _ = jax.jit(lambda x: jaxep._call(ops, spec, (x,), None, ("op",), token))(
        jnp.zeros((4, 128), jnp.float8_e4m3fn))
    assert outs[0].dtype == jnp.float8_e4m3fn and outs[0].shape == (4, 128)


def test_current_trace_answers_under_this_jax():
    """Without a trace state the chain silently does nothing; the installed JAX must give one."""
    seen = []
    jax.make_jaxpr(lambda x: seen.append(jaxep._current_trace()) or x)(jnp.ones(2))
    assert seen and seen[0] is not None
