"""deepep_cupy.jaxep on the CPU reference backend, in one process, and the examples under mpiexec.

The multi-rank checks (forward bit for bit against the reference model, gradients against a dense
model, at 2 and 3 ranks) are in tests/multirank/test_jax_multirank.py. Here: one rank
(``MPI.COMM_SELF``), the padding and handle contract, eager against jit, gradients, the errors, and
the examples as their docstrings run them (one rank in this process; 2 and 3 ranks in the shared
``mpiexec -n N`` sessions, tests/session_runs.py, where every rank runs the script), including the
acceptance check that the JAX training example's loss decreases over 20 steps identically (to
float32 rounding) at every rank count.
"""

import json
import os

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="deepep_cupy.jaxep needs JAX (pip install jax)")
MPI = pytest.importorskip("mpi4py.MPI")

import jax.numpy as jnp  # noqa: E402

import deepep_cupy as ep  # noqa: E402
import deepep_cupy.jaxep as epj  # noqa: E402
from deepep_cupy import reference as ref  # noqa: E402
from deepep_cupy.errors import DeepEPInvalid, DeepEPTypeError  # noqa: E402
from testutil import SESSION_RUNS, launch_script, run_script, scripts_in_process  # noqa: E402

BF16 = ref.BF16
CPU = jax.devices("cpu")[0]


@pytest.fixture(scope="module")
def buf():
    with jax.default_device(CPU):
        b = ep.Buffer(MPI.COMM_SELF, backend="reference")
        yield b
        b.destroy()


def bits(a):
    a = np.ascontiguousarray(np.asarray(a))
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def same(got, want):
    got = np.asarray(got)
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
    np.testing.assert_array_equal(bits(got), bits(want))


def inputs(seed=0, t=6, hidden=32, e=4, k=2, dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, hidden)).astype(dtype)
    idx = np.stack([rng.permutation(e)[:k] for _ in range(t)]).astype(np.int32)
    idx[0, 1] = -1
    idx[1, :] = -1                       # a token that goes nowhere
    w = rng.random((t, k)).astype(np.float32)
    return x, idx, w


# ------------------------------------------------------------------------------------------------
# contract on one rank
# ------------------------------------------------------------------------------------------------

def test_dispatch_pads_and_marks_rows(buf):
    x, idx, w = inputs()
    worst = 9
    recv_x, recv_idx, recv_w, counts, handle = jax.jit(
        lambda x, i, w: epj.dispatch(buf, x, i, w, num_experts=4, num_worst_tokens=worst, expert_alignment=2))(x, idx, w)
    want = ref.dispatch([x], [idx.astype(np.int64)], [w], 4, num_worst_tokens=worst)[0]
    same(recv_x, want.recv_x)
    same(np.asarray(recv_idx).astype(np.int64), want.recv_topk_idx)
    same(recv_w, want.recv_topk_weights)
    real = int(want.num_recv_tokens)
    assert real == 5 and recv_x.shape == (worst, 32)
    assert np.all(np.asarray(recv_x)[real:] == 0) and np.all(np.asarray(recv_idx)[real:] == -1)
    assert np.all(np.asarray(recv_w)[real:] == 0)
    assert recv_idx.dtype == jnp.int32                       # the dtype of topk_idx
    np.testing.assert_array_equal(np.asarray(handle.recv_src_idx), [0, 2, 3, 4, 5, -1, -1, -1, -1])
    np.testing.assert_array_equal(np.asarray(handle.valid), np.arange(worst) < real)
    raw = ref.dispatch([x], [idx.astype(np.int64)], [w], 4, expert_alignment=2)[0]
    np.testing.assert_array_equal(np.asarray(counts), raw.num_recv_tokens_per_expert_list)
    # the handle is a pytree of arrays with static metadata
    leaves, tree = jax.tree_util.tree_flatten(handle)
    assert len(leaves) == len(handle.meta.names) and all(isinstance(a, jax.Array) for a in leaves)
    assert jax.tree_util.tree_unflatten(tree, leaves).meta == handle.meta
    assert "num_worst_tokens=9" in repr(handle)


def test_default_num_worst_tokens_is_ranks_times_tokens(buf):
    x, idx, w = inputs(t=5)
    recv_x, _, _, _, handle = epj.dispatch(buf, x, idx, w, num_experts=4)
    assert recv_x.shape == (5, 32) and handle.num_worst_tokens == 5 and handle.num_tokens == 5


def test_eager_equals_jit(buf):
    x, idx, w = inputs(1, dtype=BF16)

    def f(x, i, w):
        recv_x, _, recv_w, _, h = epj.dispatch(buf, x, i, w, num_experts=4, num_worst_tokens=8)
        twice = epj.cached_dispatch(buf, x, h)
        return epj.combine(buf, recv_x + twice, h, topk_weights=recv_w)
    eager = f(x, idx, w)
    jitted = jax.jit(f)(x, idx, w)
    for a, b in zip(eager, jitted):
        same(a, np.asarray(b))
    # one rank: every token's copies are itself, so combine(2x) = 2x (bf16 exact), weights come back
    xs = np.asarray(x).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(eager[0]).astype(np.float32)[idx.max(1) >= 0],
                                  (2 * xs)[idx.max(1) >= 0])
    np.testing.assert_array_equal(np.asarray(eager[1]), np.where(idx >= 0, w, 0))


def test_gradients_one_rank(buf):
    x, idx, w = inputs(2)
    c = np.random.default_rng(3).standard_normal(x.shape).astype(np.float32)

    def dist(x, w):
        recv_x, recv_idx, recv_w, _, h = epj.dispatch(buf, x, idx, w, num_experts=4, num_worst_tokens=8)
        y = recv_x * jnp.sum(recv_w, axis=1, keepdims=True) + epj.cached_dispatch(buf, x ** 2, h)
        out, out_w = epj.combine(buf, y, h, topk_weights=recv_w)
        return jnp.sum(out * c) + jnp.sum(out_w ** 2)

    def dense(x, w):
        goes = np.any(idx >= 0, axis=1)[:, None]
        wl = jnp.where(idx >= 0, w, 0.0)
        y = x * jnp.sum(wl, axis=1, keepdims=True) + x ** 2
        return jnp.sum(jnp.where(goes, y, 0.0) * c) + jnp.sum(wl ** 2)

    got = jax.jit(jax.value_and_grad(dist, argnums=(0, 1)))(x, w)
    want = jax.value_and_grad(dense, argnums=(0, 1))(x, w)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for g, h in zip(got[1], want[1]):
        np.testing.assert_allclose(g, h, rtol=1e-6, atol=1e-6)


def test_num_recv_tokens_per_expert():
    ids = jnp.array([[0, 2], [-1, 2], [1, -1], [-1, -1]], jnp.int32)
    np.testing.assert_array_equal(epj.num_recv_tokens_per_expert(ids, 4), [1, 1, 2, 0])
    np.testing.assert_array_equal(epj.num_recv_tokens_per_expert(ids, 4, 4), [4, 4, 4, 0])


def test_fp8_dispatch_forward_and_no_gradient(buf):
    x, idx, w = inputs(4, hidden=256, dtype=BF16)
    q, s = ref.per_token_cast_to_fp8(x)
    (rx, rs), _, _, _, h = jax.jit(lambda q, s: epj.dispatch(buf, (q, s), idx, w, num_experts=4,
                                                             num_worst_tokens=6))(q, s)
    want = ref.dispatch([q], [idx.astype(np.int64)], [w], 4, num_worst_tokens=6, x_scales=[s])[0]
    same(rx, want.recv_x)
    same(rs, want.recv_x_scales)
    assert rx.dtype == jnp.float8_e4m3fn

    def loss(sc):
        (r_x, r_s), *_ = epj.dispatch(buf, (q, sc), idx, w, num_experts=4, num_worst_tokens=6)
        return jnp.sum(r_s)
    with pytest.raises(TypeError, match="FP8 input is not differentiable"):
        jax.grad(loss)(jnp.asarray(s))


@pytest.mark.parametrize("use_fp8", [False, True])
def test_low_latency_one_rank(buf, use_fp8):
    x, idx, w = inputs(5, t=4, hidden=128, e=4, k=2, dtype=BF16)
    m = 6
    want = ref.low_latency_dispatch([x], [idx.astype(np.int64)], m, 4, use_fp8=use_fp8)[0]
    recv_x, recv_count, h = jax.jit(lambda x, i: epj.low_latency_dispatch(buf, x, i, m, 4, use_fp8=use_fp8))(x, idx)
    same(recv_count, want.recv_count)
    same(recv_x[0] if use_fp8 else recv_x, want.recv_x)
    y = np.random.default_rng(6).standard_normal((4, m, 128)).astype(BF16)
    out = jax.jit(lambda y, i, w, h: epj.low_latency_combine(buf, y, i, w, h))(y, idx, w, h)
    same(out, ref.low_latency_combine([y], [idx.astype(np.int64)], [w], [want])[0])
    with pytest.raises(Exception, match="(?i)jvp|differentiat"):
        jax.grad(lambda x: jnp.sum(epj.low_latency_dispatch(buf, x, idx, m, 4, use_fp8=False)[0]
                                   .astype(jnp.float32)))(jnp.asarray(x))


# ------------------------------------------------------------------------------------------------
# errors: raised at trace time, naming the argument
# ------------------------------------------------------------------------------------------------

def test_bad_arguments(buf):
    x, idx, w = inputs()
    with pytest.raises(DeepEPTypeError, match="x: expected a bfloat16 or float32"):
        epj.dispatch(buf, x.astype(np.float16), idx, w, num_experts=4)
    with pytest.raises(DeepEPTypeError, match="topk_idx: expected an integer"):
        epj.dispatch(buf, x, idx.astype(np.float32), w, num_experts=4)
    with pytest.raises(DeepEPInvalid, match="topk_idx: expected shape"):
        epj.dispatch(buf, x, idx[:3], w, num_experts=4)
    with pytest.raises(DeepEPInvalid, match="topk_weights: expected float32"):
        epj.dispatch(buf, x, idx, w[:, :1], num_experts=4)
    with pytest.raises(DeepEPTypeError, match="num_experts: expected a Python int"):
        jax.jit(lambda e: epj.dispatch(buf, x, idx, w, num_experts=e))(4)
    with pytest.raises(DeepEPInvalid, match="num_worst_tokens: expected >= 1"):
        epj.dispatch(buf, x, idx, w, num_experts=4, num_worst_tokens=0)
    _, _, _, _, h = epj.dispatch(buf, x, idx, w, num_experts=4, num_worst_tokens=8)
    with pytest.raises(DeepEPInvalid, match="x: expected 8 rows"):
        epj.combine(buf, x, h)
    with pytest.raises(DeepEPInvalid, match="x: the handle was made for 6 tokens"):
        epj.cached_dispatch(buf, x[:2], h)
    with pytest.raises(DeepEPTypeError, match="handle: expected the DispatchHandle"):
        epj.combine(buf, np.zeros((8, 32), np.float32), object())
    with pytest.raises(DeepEPTypeError, match="x: expected a bfloat16"):
        epj.low_latency_dispatch(buf, x, idx, 8, 4)
    with pytest.raises(DeepEPInvalid, match="exceed num_max_dispatch_tokens_per_rank"):
        epj.low_latency_dispatch(buf, np.zeros((6, 128), BF16), idx, 4, 4)


def test_run_time_error_names_the_cause(buf):
    x, idx, w = inputs()
    with pytest.raises(Exception, match="num_worst_tokens=2 is too small"):
        jax.block_until_ready(jax.jit(lambda x: epj.dispatch(buf, x, idx, num_experts=4, num_worst_tokens=2)[0])(x))
    # the buffer is still usable
    assert epj.dispatch(buf, x, idx, num_experts=4, num_worst_tokens=8)[0].shape == (8, 32)


def test_destroyed_buffer_is_refused_at_trace_time():
    b = ep.Buffer(MPI.COMM_SELF, backend="reference")
    x, idx, w = inputs()
    epj.dispatch(b, x, idx, w, num_experts=4)
    b.destroy()
    with pytest.raises(DeepEPInvalid, match="destroyed"):
        epj.dispatch(b, x, idx, w, num_experts=4)


# ------------------------------------------------------------------------------------------------
# the examples, as their docstrings run them
# ------------------------------------------------------------------------------------------------

def _run(script, num_ranks, args, mpi_sessions, name):
    """The output of ``script args`` at ``num_ranks`` ranks, after asserting every rank exited 0.

    Without GPUs (the reference backend), one rank runs in this process (``python3
    examples/<script>`` as its docstring runs it, without a new interpreter), and 2 and 3 ranks are
    the record of run ``name`` in the shared ``mpiexec -n N`` session (testutil.SESSION_RUNS,
    tests/session_runs.py), where every rank ran the script. With GPUs, each run is its own launch."""
    what = f"{'python3' if num_ranks == 1 else f'mpiexec -n {num_ranks} python3'} examples/{script} {' '.join(args)}"
    if not scripts_in_process():
        rc, out = launch_script(os.path.join("examples", script), args, num_ranks)
        assert rc == 0, f"{what} exited {rc}:\n{out[-6000:]}"
        return out
    if num_ranks == 1:
        rc, out = run_script(os.path.join("examples", script), args)
        assert rc == 0, f"{what} exited {rc}:\n{out[-6000:]}"
        return out
    path, session_args = SESSION_RUNS[num_ranks][name]
    assert (path, tuple(session_args)) == (f"examples/{script}", tuple(args)), (path, session_args)
    rec = mpi_sessions.result(num_ranks).record(name)
    assert rec["returncodes"] == [0] * num_ranks, (
        f"{what}: exit status per rank {rec['returncodes']}:\n{rec['output'][-6000:]}")
    return rec["output"]


@pytest.mark.mpi
@pytest.mark.mpi_session(2, 3)
def test_jax_training_example_same_losses_at_1_2_3_ranks(mpi_sessions):
    curves = {}
    for n in (1, 2, 3):
        out = _run("jax_moe_train.py", n, ("--steps", "20"), mpi_sessions, "jax_moe_train")
        assert "dense check ok" in out and "loss decreases every step" in out, out[-3000:]
        curves[n] = np.array(json.loads(next(line for line in out.splitlines() if line.startswith("LOSSES "))[7:]))
    assert len(curves[1]) == 20 and curves[1][-1] < curves[1][0] / 10
    for n in (2, 3):   # the same global problem: the same curve, to float32 rounding
        assert len(curves[n]) == 20
        np.testing.assert_allclose(curves[n], curves[1], rtol=1e-5)


@pytest.mark.mpi
@pytest.mark.parametrize("num_ranks,args,name", [
    (1, (), None),
    pytest.param(2, (), "cupy_moe_inference", marks=pytest.mark.mpi_session(2)),
    pytest.param(3, (), "cupy_moe_inference", marks=pytest.mark.mpi_session(3)),
    pytest.param(3, ("--fp8",), "cupy_moe_inference_fp8", marks=pytest.mark.mpi_session(3))])
def test_cupy_inference_example(num_ranks, args, name, mpi_sessions):
    out = _run("cupy_moe_inference.py", num_ranks, args, mpi_sessions, name)
    assert f"{num_ranks} rank(s): ok" in out, out[-3000:]
