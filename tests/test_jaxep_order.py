"""The GPU form of jaxep chains its callbacks with an order token (``jaxep._chain_token``), so that
XLA cannot run two collectives of one program in different orders on different ranks. The GPU itself
is not needed to check the chain: these tests stand a recording callback in for the buffer_callback
and look at what each staged call was given, under the JAX installed here (the chain reads JAX's
current-trace state, which a JAX upgrade could move)."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy

from deepep_cupy import jaxep  # noqa: E402


class FakeGpuOps:
    """What ``_call`` reads of a GPU operation set, without a Buffer."""

    backend = "gpu"
    device_id = 0

    def __init__(self):
        self.callbacks = {}
        self.chain = None


@pytest.fixture
def recorded(monkeypatch):
    """A list of (token given, token returned) per staged callback."""
    calls = []

    def make_callback(ops, result_specs, in_dtypes, run, label=""):
        assert np.dtype(in_dtypes[-1]) == np.int32 and tuple(result_specs[-1].shape) == (1,)
        assert all(np.dtype(d).name != "float8_e4m3fn" for d in in_dtypes), "FP8 must cross as uint8"

        def callback(*args):
            outs = tuple(jnp.zeros(s.shape, s.dtype) for s in result_specs[:-1])
            token = args[-1] + 1
            calls.append((args[-1], token))
            return outs + (token,)
        return callback

    monkeypatch.setattr(jaxep, "_make_callback", make_callback)
    return calls


SPEC = (jax.ShapeDtypeStruct((4,), jnp.float32),)


def test_independent_calls_in_one_jit_are_chained(recorded):
    ops = FakeGpuOps()

    @jax.jit
    def f(x, y, z):
        a = jaxep._call(ops, SPEC, (x,), None, ("op",))[0]
        b = jaxep._call(ops, SPEC, (y,), None, ("op",))[0]
        c = jaxep._call(ops, SPEC, (z,), None, ("op",))[0]
        return a, b, c

    jax.make_jaxpr(f)(*(jnp.ones(4) for _ in range(3)))
    assert len(recorded) == 3
    # each call's token input is the previous call's token output: a data dependence, in order
    assert recorded[1][0] is recorded[0][1]
    assert recorded[2][0] is recorded[1][1]


def test_a_new_trace_starts_a_new_chain(recorded):
    ops = FakeGpuOps()
    for _ in range(2):      # a new function each time: JAX caches traces by function
        jax.make_jaxpr(lambda x: jaxep._call(ops, SPEC, (x,), None, ("op",))[0])(jnp.ones(4))
    # the second trace must not pick up the first's (dead) tracer
    assert len(recorded) == 2
    assert recorded[1][0] is not recorded[0][1]


def test_fp8_crosses_as_bytes_and_comes_back_as_fp8(recorded):
    ops = FakeGpuOps()
    spec = (jax.ShapeDtypeStruct((4, 128), jnp.float8_e4m3fn),)
    out = jax.jit(lambda x: jaxep._call(ops, spec, (x,), None, ("op",))[0])(jnp.zeros((4, 128), jnp.float8_e4m3fn))
    assert out.dtype == jnp.float8_e4m3fn and out.shape == (4, 128)
