"""deepep_cupy.jaxep across MPI ranks: the JAX operations under jit against the reference model and
their gradients against jax.grad of a dense single-process model.

Run with: mpiexec -n 2 (or 3) python -m pytest -q tests/multirank -p no:cacheprovider
(tests/test_mpi_launch.py does this on CPUs). Every rank builds ALL ranks' inputs from a shared seed,
runs the operations collectively on its own slice and compares its own part with
deepep_cupy.reference (forward: bit for bit) or with the dense model (gradients: float32 rounding).
All collectives of a test run before its assertions, and failures are collective
(``assert_all_ranks``), so one rank's failure cannot leave the others waiting in a collective.

Backends: "reference" everywhere; "gpu" where CuPy sees a GPU and JAX has a GPU backend (the GPU
machine: ``mpirun -n 2 python3 -m pytest tests/multirank``), skipped with the reason elsewhere.
"""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # leave GPU memory to NVSHMEM

import numpy as np  # noqa: E402
import pytest  # noqa: E402

MPI = pytest.importorskip("mpi4py.MPI")
jax = pytest.importorskip("jax", reason="deepep_cupy.jaxep needs JAX (pip install jax)")

import jax.numpy as jnp  # noqa: E402

import deepep_cupy as ep  # noqa: E402
import deepep_cupy.jaxep as epj  # noqa: E402
from deepep_cupy import reference as ref  # noqa: E402

BF16 = ref.BF16
FP8 = ref.FP8


def assert_all_ranks(comm, ok, message=""):
    """Collective assert: every rank fails when any does, naming the failing ranks."""
    msgs = comm.allgather(None if ok else message)
    bad = [(r, m) for r, m in enumerate(msgs) if m is not None]
    assert not bad, "; ".join(f"rank {r}: {m}" for r, m in bad)


def collect(comm, checks):
    """Run every (name, thunk) check locally, then fail collectively with the first error of each rank."""
    errors = []
    for name, check in checks:
        try:
            check()
        except AssertionError as e:
            errors.append(f"{name}: {str(e)[:600]}")
    assert_all_ranks(comm, not errors, "; ".join(errors))


def bits(a):
    a = np.ascontiguousarray(np.asarray(a))
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def close_to_dense(got, want):
    """Equal to the dense model's value within float32 rounding (relative to the largest entry)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * max(1.0, float(np.abs(want).max(initial=0))))


def same(got, want):
    got = np.asarray(got)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    np.testing.assert_array_equal(bits(got), bits(want))


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------

MAX_TOKENS = 12          # tokens per rank, at most
HIDDEN = 128
LL_M = 8                 # num_max_dispatch_tokens_per_rank of the low-latency tests
EXPERTS_PER_RANK = 3


@pytest.fixture(scope="module")
def comm():
    c = MPI.COMM_WORLD
    if c.Get_size() < 2:
        pytest.skip("needs at least 2 MPI ranks (run under mpiexec -n 2)")
    return c


def _gpu_skip_reason():
    from deepep_cupy import discovery
    if discovery.gpu_count() == 0:
        return "the gpu backend needs a CUDA GPU"
    try:
        if jax.default_backend() != "gpu":
            return f"JAX has no GPU backend here ({jax.default_backend()}); pip install jax[cuda13]"
    except RuntimeError as e:
        return f"JAX GPU backend unavailable: {e}"
    return None


class Env:
    """A Buffer and the JAX device whose arrays its backend takes."""

    def __init__(self, buf, device):
        self.buf, self.device = buf, device

    def put(self, a):
        return jax.device_put(a, self.device)


@pytest.fixture(scope="module", params=["reference", "gpu"])
def env(request, comm):
    if request.param == "gpu":
        reason = _gpu_skip_reason()
        if reason:
            pytest.skip(reason)
        n = comm.Get_size()
        nvl = ep.Buffer.get_intranode_size_hint(4 * MAX_TOKENS, 2 * HIDDEN, n, 4)
        rdma = ep.Buffer.get_low_latency_rdma_size_hint(LL_M, HIDDEN, n, n * EXPERTS_PER_RANK)
        buf = ep.Buffer(comm, num_nvl_bytes=nvl, num_rdma_bytes=rdma, low_latency_mode=True, backend="gpu")
        device = next(d for d in jax.devices("gpu") if d.id == buf.device_id)
    else:
        buf = ep.Buffer(comm, backend="reference")
        device = jax.devices("cpu")[0]
    yield Env(buf, device)
    buf.destroy()


def make_inputs(num_ranks, seed, dtype=BF16, hidden=HIDDEN, k=3, zero_rank=1, max_tokens=MAX_TOKENS):
    """All ranks' inputs, identical on every rank: x, topk_idx (int64), weights, num_experts.
    Rank ``zero_rank`` has no tokens; some slots are -1; one token lists an expert twice; one goes nowhere."""
    rng = np.random.default_rng(seed)
    num_experts = num_ranks * EXPERTS_PER_RANK
    xs, idx, ws = [], [], []
    for s in range(num_ranks):
        t = 0 if s == zero_rank else int(rng.integers(3, max_tokens + 1))
        xs.append(rng.standard_normal((t, hidden)).astype(dtype))
        i = np.stack([rng.permutation(num_experts)[:k] for _ in range(t)]) if t else np.zeros((0, k), np.int64)
        i = np.where(rng.random((t, k)) < 0.2, -1, i).astype(np.int64)
        if t >= 3:
            i[1, -1] = i[1, 0]    # a duplicate expert
            i[2, :] = -1          # a token going nowhere
        idx.append(i)
        ws.append(rng.random((t, k)).astype(np.float32))
    return xs, idx, ws, num_experts


def aligned_counts(results_w0, rank, alignment):
    """The per-expert counts DeepEP's list would hold (the reference gives [] with num_worst_tokens)."""
    return np.asarray(results_w0[rank].num_recv_tokens_per_expert_list, dtype=np.int32)


# ------------------------------------------------------------------------------------------------
# forward, bit for bit against the reference model
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [BF16, np.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("weights", [True, False], ids=["weights", "noweights"])
@pytest.mark.parametrize("alignment", [1, 4])
def test_dispatch_cached_combine_exact(comm, env, dtype, weights, alignment):
    r, n = comm.Get_rank(), comm.Get_size()
    xs, idx, ws, e = make_inputs(n, 10 + alignment, dtype)
    w_all = ws if weights else None
    worst = sum(x.shape[0] for x in xs) + 3                     # some padding rows on every rank
    want = ref.dispatch(xs, idx, w_all, e, expert_alignment=alignment, num_worst_tokens=worst)
    want_lists = ref.dispatch(xs, idx, w_all, e, expert_alignment=alignment)
    rng = np.random.default_rng(99)
    x2s = [rng.standard_normal(x.shape).astype(dtype) for x in xs]
    want_cached = ref.dispatch(x2s, idx, None, e, num_worst_tokens=worst)
    ys = [rng.standard_normal((worst, HIDDEN)).astype(dtype) for _ in range(n)]
    cws = [rng.random((worst, 3)).astype(np.float32) for _ in range(n)]
    want_comb = ref.combine(ys, want, topk_weights=cws)

    buf = env.buf

    @jax.jit
    def fwd(x, i, w, x2):
        recv_x, recv_idx, recv_w, counts, handle = epj.dispatch(
            buf, x, i, w, num_experts=e, num_worst_tokens=worst, expert_alignment=alignment)
        return recv_x, recv_idx, recv_w, counts, handle, epj.cached_dispatch(buf, x2, handle)

    recv_x, recv_idx, recv_w, counts, handle, recv_x2 = fwd(
        env.put(xs[r]), env.put(idx[r].astype(np.int32)), None if not weights else env.put(ws[r]), env.put(x2s[r]))

    # the handle crosses a jit boundary as a pytree of arrays
    combined, combined_w = jax.jit(lambda y, h, cw: epj.combine(buf, y, h, topk_weights=cw))(
        env.put(ys[r]), handle, env.put(cws[r]))
    jax.block_until_ready((combined, combined_w))

    exp = want[r]
    collect(comm, [
        ("recv_x", lambda: same(recv_x, exp.recv_x)),
        ("recv_topk_idx", lambda: same(np.asarray(recv_idx).astype(np.int64), exp.recv_topk_idx)),
        ("recv_topk_weights", lambda: (same(recv_w, exp.recv_topk_weights) if weights else None)),
        ("counts", lambda: same(counts, aligned_counts(want_lists, r, alignment))),
        ("recv_src_idx", lambda: same(handle.recv_src_idx, exp.recv_src_idx)),
        ("cached recv_x", lambda: same(recv_x2, want_cached[r].recv_x)),
        ("combined_x", lambda: same(combined, want_comb[r][0])),
        ("combined_w", lambda: same(combined_w, want_comb[r][1])),
    ])


def test_dispatch_fp8_exact(comm, env):
    r, n = comm.Get_rank(), comm.Get_size()
    xs, idx, ws, e = make_inputs(n, 21)
    q = [ref.per_token_cast_to_fp8(x) for x in xs]
    worst = sum(x.shape[0] for x in xs)
    want = ref.dispatch([a for a, _ in q], idx, ws, e, num_worst_tokens=worst, x_scales=[s for _, s in q])
    buf = env.buf
    f = jax.jit(lambda x, s, i, w: epj.dispatch(buf, (x, s), i, w, num_experts=e, num_worst_tokens=worst))
    (rx, rs), ri, rw, _, handle = f(env.put(q[r][0]), env.put(q[r][1]), env.put(idx[r].astype(np.int32)),
                                    env.put(ws[r]))
    cached = jax.jit(lambda x, s, h: epj.cached_dispatch(buf, (x, s), h))(env.put(q[r][0]), env.put(q[r][1]), handle)
    jax.block_until_ready(cached)
    collect(comm, [
        ("recv_x", lambda: same(rx, want[r].recv_x)),
        ("recv_scales", lambda: same(rs, want[r].recv_x_scales)),
        ("recv_topk_weights", lambda: same(rw, want[r].recv_topk_weights)),
        ("cached", lambda: (same(cached[0], want[r].recv_x), same(cached[1], want[r].recv_x_scales))),
    ])


@pytest.mark.parametrize("use_fp8,round_scale,use_ue8m0", [(False, False, False), (True, False, False),
                                                            (True, True, True)], ids=["bf16", "fp8", "ue8m0"])
def test_low_latency_exact(comm, env, use_fp8, round_scale, use_ue8m0):
    r, n = comm.Get_rank(), comm.Get_size()
    xs, idx, ws, e = make_inputs(n, 30, max_tokens=LL_M)
    want = ref.low_latency_dispatch(xs, idx, LL_M, e, use_fp8=use_fp8, round_scale=round_scale,
                                    use_ue8m0=use_ue8m0)
    rng = np.random.default_rng(31)
    ys = [rng.standard_normal((e // n, n * LL_M, HIDDEN)).astype(BF16) for _ in range(n)]
    want_out = ref.low_latency_combine(ys, idx, ws, want)
    buf = env.buf

    @jax.jit
    def fwd(x, i):
        return epj.low_latency_dispatch(buf, x, i, LL_M, e, use_fp8=use_fp8, round_scale=round_scale,
                                        use_ue8m0=use_ue8m0)

    i32 = env.put(idx[r].astype(np.int32))
    recv_x, recv_count, handle = fwd(env.put(xs[r]), i32)
    out = jax.jit(lambda y, i, w, h: epj.low_latency_combine(buf, y, i, w, h))(env.put(ys[r]), i32,
                                                                                env.put(ws[r]), handle)
    jax.block_until_ready(out)
    exp = want[r]
    checks = [("recv_count", lambda: same(recv_count, exp.recv_count)),
              ("recv_src_info", lambda: same(handle.recv_src_info, exp.recv_src_info)),
              ("recv_src_k", lambda: same(handle.recv_src_k, exp.recv_src_k)),
              ("layout_begin", lambda: same(handle.layout_begin, exp.layout_begin)),
              ("layout_count", lambda: same(handle.layout_count, exp.layout_count)),
              ("combined", lambda: same(out, want_out[r]))]
    if use_fp8:
        checks += [("recv_x", lambda: same(recv_x[0], exp.recv_x)), ("scales", lambda: same(recv_x[1], exp.recv_x_scales))]
    else:
        checks += [("recv_x", lambda: same(recv_x, exp.recv_x))]
    collect(comm, checks)


# ------------------------------------------------------------------------------------------------
# gradients against jax.grad of the dense single-process model
# ------------------------------------------------------------------------------------------------

def distributed_pipeline(buf, x, i, w, coef, worst, num_experts):
    """dispatch -> per-row expert scaling + a cached dispatch -> combine (with weights)."""
    n = buf.num_ranks
    num_local = num_experts // n
    local_coef = coef[buf.rank * num_local:(buf.rank + 1) * num_local]
    recv_x, recv_idx, recv_w, _, handle = epj.dispatch(buf, x, i, w, num_experts=num_experts,
                                                       num_worst_tokens=worst)
    scale = jnp.sum(jnp.where(recv_idx >= 0, recv_w * local_coef[jnp.maximum(recv_idx, 0)], 0.0), axis=1)
    z = epj.cached_dispatch(buf, x * 0.5, handle)
    y = recv_x * scale[:, None] + jnp.sin(z)
    out, out_w = epj.combine(buf, y, handle, topk_weights=recv_w * 3.0)
    return out, out_w


def dense_pipeline(x, i, w, coef, num_ranks, num_experts):
    """The same map for one source rank's tokens, without communication: a token's copy on rank r
    carries the weights of its experts there; the copies are summed in ascending rank order."""
    num_local = num_experts // num_ranks
    owner = jnp.where(i >= 0, i // num_local, -1)
    out = jnp.zeros_like(x)
    out_w = jnp.zeros_like(w)
    for r in range(num_ranks):
        local = owner == r
        goes = jnp.any(local, axis=1)
        recv_w = jnp.where(local, w, 0.0)
        scale = jnp.sum(jnp.where(local, recv_w * coef[jnp.maximum(i, 0)], 0.0), axis=1)
        y = x * scale[:, None] + jnp.sin(x * 0.5)
        out = out + jnp.where(goes[:, None], y, 0.0)
        out_w = out_w + jnp.where(goes[:, None], recv_w * 3.0, 0.0)
    return out, out_w


def source_loss(out, out_w, c, d):
    return jnp.sum(out * c) + 0.1 * jnp.sum(out ** 2) + jnp.sum(out_w * d)


def test_gradients_match_dense(comm, env):
    r, n = comm.Get_rank(), comm.Get_size()
    xs, idx, ws, e = make_inputs(n, 40, np.float32, hidden=64)
    rng = np.random.default_rng(41)
    coef = rng.standard_normal(e).astype(np.float32)
    cs = [rng.standard_normal(x.shape).astype(np.float32) for x in xs]
    ds = [rng.standard_normal(w.shape).astype(np.float32) for w in ws]
    worst = sum(x.shape[0] for x in xs)
    buf = env.buf

    def local_loss(x, w, i, c, d, cf):
        return source_loss(*distributed_pipeline(buf, x, i, w, cf, worst, e), c, d)

    i32 = [a.astype(np.int32) for a in idx]
    loss, (gx, gw) = jax.jit(jax.value_and_grad(local_loss, argnums=(0, 1)))(
        env.put(xs[r]), env.put(ws[r]), env.put(i32[r]), env.put(cs[r]), env.put(ds[r]), env.put(coef))
    jax.block_until_ready((gx, gw))

    def dense_total(xs_, ws_):
        return sum(source_loss(*dense_pipeline(x, jnp.asarray(i), w, jnp.asarray(coef), n, e), c, d)
                   for x, w, i, c, d in zip(xs_, ws_, i32, cs, ds))

    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        want_gx, want_gw = jax.jit(jax.grad(dense_total, argnums=(0, 1)))(
            [jnp.asarray(x) for x in xs], [jnp.asarray(w) for w in ws])
        want_loss = source_loss(*dense_pipeline(jnp.asarray(xs[r]), jnp.asarray(i32[r]), jnp.asarray(ws[r]),
                                                jnp.asarray(coef), n, e), cs[r], ds[r])

    collect(comm, [("loss", lambda: close_to_dense(loss, want_loss)), ("grad x", lambda: close_to_dense(gx, want_gx[r])),
                   ("grad topk_weights", lambda: close_to_dense(gw, want_gw[r]))])


def test_bf16_gradients_are_combines(comm, env):
    """bf16: the gradient of dispatch is exactly the combine of the received cotangents (and that of
    combine exactly a cached dispatch), checked against the reference model's combine."""
    r, n = comm.Get_rank(), comm.Get_size()
    xs, idx, ws, e = make_inputs(n, 50)
    worst = sum(x.shape[0] for x in xs) + 1
    rng = np.random.default_rng(51)
    gs = [rng.standard_normal((worst, HIDDEN)).astype(BF16) for _ in range(n)]
    res = ref.dispatch(xs, idx, ws, e, num_worst_tokens=worst)
    want_gx = ref.combine(gs, res)[r][0]
    buf = env.buf
    i32 = env.put(idx[r].astype(np.int32))

    def f(x):
        recv_x = epj.dispatch(buf, x, i32, num_experts=e, num_worst_tokens=worst)[0]
        return jnp.sum(recv_x.astype(jnp.float32) * jnp.asarray(gs[r], jnp.float32))
    gx = jax.jit(jax.grad(f))(env.put(xs[r]))
    jax.block_until_ready(gx)
    collect(comm, [("grad x", lambda: same(gx, want_gx))])


# ------------------------------------------------------------------------------------------------
# errors and ordering
# ------------------------------------------------------------------------------------------------

def test_too_small_num_worst_tokens_raises_on_every_rank(comm, env):
    if env.buf.backend_name != "reference":
        pytest.skip("the GPU kernels report an overflow at the next call instead (kernel error phase 15)")
    r, n = comm.Get_rank(), comm.Get_size()
    xs, idx, ws, e = make_inputs(n, 60, zero_rank=-1)
    buf = env.buf
    f = jax.jit(lambda x, i: epj.dispatch(buf, x, i, num_experts=e, num_worst_tokens=1)[0])
    raised = ""
    try:
        jax.block_until_ready(f(env.put(xs[r]), env.put(idx[r].astype(np.int32))))
    except Exception as ex:     # JAX wraps the callback's DeepEPInvalid in its runtime error
        raised = str(ex)
    assert_all_ranks(comm, "num_worst_tokens=1 is too small" in raised, f"got {raised[:300]!r}")
    # the ranks are still in step: the next collective works
    out = jax.jit(lambda x, i: epj.dispatch(buf, x, i, num_experts=e, num_worst_tokens=64)[0])(
        env.put(xs[r]), env.put(idx[r].astype(np.int32)))
    assert_all_ranks(comm, out.shape == (64, HIDDEN), f"shape {out.shape}")


@pytest.mark.parametrize("zero_rank", [1, -1], ids=["rank1-empty", "all-send"])
def test_many_operations_in_one_program_keep_their_order(comm, env, zero_rank):
    """Independent collectives in one jitted program (no data dependence between them) run in the
    same order on every rank; each result matches its own reference. With a rank that sends nothing
    (its programs' shapes differ most) and with every rank sending. On the GPU each rank prints the
    order its callbacks ran in (pytest shows it for a failure)."""
    r, n = comm.Get_rank(), comm.Get_size()
    xs, idx, ws, e = make_inputs(n, 70, zero_rank=zero_rank)
    x2s = [(x.astype(np.float32) * 3).astype(BF16) for x in xs]
    worst = sum(x.shape[0] for x in xs)
    want = ref.dispatch(xs, idx, None, e, num_worst_tokens=worst)
    want2 = ref.dispatch(x2s, idx, None, e, num_worst_tokens=worst)
    buf = env.buf

    @jax.jit
    def f(x, x2, i):
        a = epj.dispatch(buf, x, i, num_experts=e, num_worst_tokens=worst)[0]
        b = epj.dispatch(buf, x2, i, num_experts=e, num_worst_tokens=worst)[0]
        c = epj.dispatch(buf, x2[::-1], i[::-1], num_experts=e, num_worst_tokens=worst)[0]
        return a, b, c
    x_in, x2_in = env.put(xs[r]), env.put(x2s[r])
    executed = getattr(epj._OPS.get(buf), "executed", None)    # GPU only: the order callbacks ran in
    if executed is not None:
        executed.clear()
    a, b, _ = f(x_in, x2_in, env.put(idx[r].astype(np.int32)))
    jax.block_until_ready(a)
    if executed is not None and xs[r].shape[0]:
        names = {x_in.unsafe_buffer_pointer(): "x", x2_in.unsafe_buffer_pointer(): "x2"}
        print(f"rank {r} ran: {[(op, names.get(ptr, 'other')) for op, ptr in executed]}")
    collect(comm, [("first", lambda: same(a, want[r].recv_x)), ("second", lambda: same(b, want2[r].recv_x))])


def test_jitted_step_called_100_times_stays_exact(comm, env):
    """One jitted step (dispatch, an expert, combine, low-latency dispatch + combine) called 100
    times (10 on the reference backend, whose every call is an MPI exchange), alternating two inputs
    so that a stale buffer cannot pass; every result bit-equal to the reference."""
    r, n = comm.Get_rank(), comm.Get_size()
    xs, idx, ws, e = make_inputs(n, 90, zero_rank=-1, max_tokens=LL_M)
    worst = sum(x.shape[0] for x in xs)
    x2s = [(x.astype(np.float32) * -2).astype(BF16) for x in xs]
    wants = []
    for inputs in (xs, x2s):
        d = ref.dispatch(inputs, idx, None, e, num_worst_tokens=worst)
        ys = [(np.asarray(o.recv_x, np.float32) * 0.5).astype(BF16) for o in d]
        ll = ref.low_latency_dispatch(inputs, idx, LL_M, e, use_fp8=False)
        ll_out = ref.low_latency_combine([o.recv_x for o in ll], idx, ws, ll)
        wants.append((d[r].recv_x, ref.combine(ys, d)[r][0], ll_out[r]))
    buf = env.buf

    @jax.jit
    def step(x, i, w):
        recv_x, _, _, _, h = epj.dispatch(buf, x, i, num_experts=e, num_worst_tokens=worst)
        y = (recv_x.astype(jnp.float32) * 0.5).astype(recv_x.dtype)
        out = epj.combine(buf, y, h)[0]
        lx, _, lh = epj.low_latency_dispatch(buf, x, i, LL_M, e, use_fp8=False)
        return recv_x, out, epj.low_latency_combine(buf, lx, i, w, lh)

    i_in, w_in = env.put(idx[r].astype(np.int32)), env.put(ws[r])
    x_in = [env.put(xs[r]), env.put(x2s[r])]
    calls = 100 if env.buf.backend_name == "gpu" else 10
    results = [step(x_in[j % 2], i_in, w_in) for j in range(calls)]     # issued back to back
    jax.block_until_ready(results)
    bad = []
    for j, got in enumerate(results):
        for name, g, want in zip(("recv_x", "combined", "low-latency combined"), got, wants[j % 2]):
            if not np.array_equal(bits(g), bits(want)):
                bad.append(f"call {j}: {name}")
    assert_all_ranks(comm, not bad, ", ".join(bad[:6]) + (f" (+{len(bad) - 6})" if len(bad) > 6 else ""))


def test_two_micro_batches_gradients_match_dense(comm, env):
    """Two micro-batches whose forward and backward collectives have no data dependence between
    them (the case the order token exists for): with one rank sending nothing, the gradients of each
    equal the dense model's."""
    r, n = comm.Get_rank(), comm.Get_size()
    xa, idx_a, wa, e = make_inputs(n, 50, np.float32, hidden=64, zero_rank=n - 1)
    xb, idx_b, wb, _ = make_inputs(n, 51, np.float32, hidden=64, zero_rank=-1)
    rng = np.random.default_rng(52)
    coef = rng.standard_normal(e).astype(np.float32)
    worst = max(sum(x.shape[0] for x in xa), sum(x.shape[0] for x in xb))
    buf = env.buf

    def mb_loss(x, w, i):
        out, out_w = distributed_pipeline(buf, x, i, w, env.put(coef), worst, e)
        return jnp.sum(out ** 2) + jnp.sum(out_w)

    def local(x1, w1, i1, x2, w2, i2):
        return mb_loss(x1, w1, i1) + 2.0 * mb_loss(x2, w2, i2)

    i32a, i32b = [a.astype(np.int32) for a in idx_a], [a.astype(np.int32) for a in idx_b]
    grads = jax.jit(jax.grad(local, argnums=(0, 1, 3, 4)))(
        env.put(xa[r]), env.put(wa[r]), env.put(i32a[r]), env.put(xb[r]), env.put(wb[r]), env.put(i32b[r]))
    jax.block_until_ready(grads)

    def dense_mb(xs_, ws_, i32):
        total = 0.0
        for x, w, i in zip(xs_, ws_, i32):
            out, out_w = dense_pipeline(x, jnp.asarray(i), w, jnp.asarray(coef), n, e)
            total = total + jnp.sum(out ** 2) + jnp.sum(out_w)
        return total

    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        as_j = lambda arrs: [jnp.asarray(a) for a in arrs]  # noqa: E731
        ga_x, ga_w = jax.grad(lambda x, w: dense_mb(x, w, i32a), argnums=(0, 1))(as_j(xa), as_j(wa))
        gb_x, gb_w = jax.grad(lambda x, w: 2.0 * dense_mb(x, w, i32b), argnums=(0, 1))(as_j(xb), as_j(wb))

    collect(comm, [(name, (lambda g=g, w=w: close_to_dense(g, w))) for name, g, w in
                   zip(("a: x", "a: weights", "b: x", "b: weights"), grads, (ga_x[r], ga_w[r], gb_x[r], gb_w[r]))])


def test_layers_under_lax_scan(comm, env):
    """A stack of dispatch/expert/combine layers under jax.lax.scan (handles as scan-local pytrees,
    collectives inside the loop body) gives the unrolled loop's values and gradients."""
    r, n = comm.Get_rank(), comm.Get_size()
    xs, idx, _, e = make_inputs(n, 80, np.float32, hidden=64, zero_rank=-1)
    worst = sum(x.shape[0] for x in xs)        # the same on every rank (token counts differ)
    buf = env.buf
    i32 = env.put(idx[r].astype(np.int32))

    def layer(h, w):
        recv_x, _, _, _, handle = epj.dispatch(buf, h, i32, num_experts=e, num_worst_tokens=worst)
        out, _ = epj.combine(buf, jnp.tanh(recv_x * w), handle)
        return out, None

    ws = env.put(np.linspace(0.5, 1.0, 3, dtype=np.float32))
    x = env.put(xs[r])

    def scanned(ws):
        return jnp.sum(jax.lax.scan(layer, x, ws)[0] ** 2)

    def unrolled(ws):
        h = x
        for j in range(3):
            h = layer(h, ws[j])[0]
        return jnp.sum(h ** 2)

    got = jax.jit(jax.value_and_grad(scanned))(ws)
    want = jax.jit(jax.value_and_grad(unrolled))(ws)
    jax.block_until_ready((got, want))
    collect(comm, [("value", lambda: np.testing.assert_allclose(got[0], want[0], rtol=1e-6)),
                   ("grad", lambda: np.testing.assert_allclose(got[1], want[1], rtol=1e-5))])
