"""Cross-rank agreement through ``Buffer`` (issue #15): one rank passes different (or bad) input,
and every rank raises the same ``DeepEPInvalid`` naming the argument within 5 s; none hangs.

Run with: mpiexec -n 2 (or 3) python -m pytest -q tests/multirank -p no:cacheprovider
(tests/test_mpi_launch.py does, on CPUs: the reference backend). On the GPU machine the same file
runs under mpirun with GPUs: ``Buffer(backend="auto")`` picks the GPU backend, inputs go to the
GPU as CuPy arrays, and ``settings.check_agreement = True`` turns the agreement on for the
low-latency calls too (``"auto"`` leaves those off on the GPU).

Each case is one collective call in which the last rank differs. Every rank checks its exception
(type, message starting with the argument, the odd rank named, time), the ranks compare their
messages (a disagreement gives every rank the same text; a rank whose own checks failed raises its
own message, the others name it), and then a valid round on the same buffer must match the
reference model bit for bit: the ranks stayed in step.
"""

import contextlib
import re
import time
from typing import Callable, NamedTuple

import numpy as np
import pytest

MPI = pytest.importorskip("mpi4py.MPI")

import deepep_cupy as ep  # noqa: E402
from deepep_cupy import reference as ref  # noqa: E402
from testutil import assert_all_ranks, world  # noqa: E402

BF16 = ref.BF16
T, K, M = 12, 2, 16          # tokens, top-k, low-latency max tokens per rank
LIMIT_S = 5.0                # the acceptance bound for every rank's exception


class Env(NamedTuple):
    buf: object
    rank: int
    n: int
    E: int          # experts
    H: int          # hidden
    gpu: bool

    @property
    def odd(self) -> bool:
        """This rank is the one that differs (the last)."""
        return self.rank == self.n - 1


@pytest.fixture(scope="module")
def env():
    comm = world()
    n = comm.Get_size()
    if n < 2:
        pytest.skip("needs at least 2 MPI ranks (run under mpiexec -n 2)")
    settings = ep.settings
    saved = {k: getattr(settings, k) for k in ("timeout_seconds", "check_agreement", "check_values")
             if hasattr(settings, k)}
    settings.timeout_seconds = 20.0     # a regression times out in 20 s instead of 100
    settings.check_agreement = True     # on the GPU "auto" skips the low-latency calls
    gpu = _gpu_available()     # what Buffer(backend="auto") picks
    H, E = (2048 if gpu else 256), 4 * n
    kwargs = {}
    if gpu:
        kwargs = dict(num_nvl_bytes=ep.Buffer.get_intranode_size_hint(T, H + 128, n, K + 1),
                      num_rdma_bytes=ep.Buffer.get_low_latency_rdma_size_hint(M, H, n, E), low_latency_mode=True)
    buf = ep.Buffer(comm, **kwargs)
    assert buf.backend_name == ("gpu" if gpu else "reference")
    yield Env(buf, comm.Get_rank(), n, E, H, gpu)
    buf.destroy()
    for k in ("timeout_seconds", "check_agreement", "check_values"):
        if k in saved:
            setattr(settings, k, saved[k])
        elif hasattr(settings, k):
            delattr(settings, k)


def _gpu_available() -> bool:
    from deepep_cupy import discovery
    return discovery.gpu_count() > 0


# ------------------------------------------------------------------------------------ inputs
def inputs(seed, rank, env, hidden=None, k=K, num_experts=None, tokens=T):
    """Rank ``rank``'s numpy (topk_idx int64 [T, k] with -1 holes, x bf16 [T, hidden], weights)."""
    e = num_experts or env.E
    rng = np.random.default_rng(seed * 100 + rank)
    idx = np.argsort(rng.random((tokens, e)), axis=1)[:, :k].astype(np.int64)
    idx[rng.random(idx.shape) < 0.15] = -1
    x = rng.standard_normal((tokens, hidden or env.H), dtype=np.float32).astype(BF16)
    w = rng.random((tokens, k), dtype=np.float32)
    return idx, x, w


def dev(env, a):
    """numpy -> the backend's arrays (CuPy on the GPU)."""
    if a is None or not env.gpu:
        return a
    import cupy
    return cupy.asarray(a)


def host(env, a):
    if a is None or not env.gpu:
        return a
    import cupy
    return cupy.asnumpy(a)


def layout(env, idx, num_experts=None):
    """The dispatch layout arguments of ``idx``, from the reference model (no collective call)."""
    per_rank, _, per_expert, in_rank = ref.get_dispatch_layout(idx, num_experts or env.E, env.n)
    return dict(num_tokens_per_rank=dev(env, per_rank), num_tokens_per_expert=dev(env, per_expert),
                is_token_in_rank=dev(env, in_rank))


@contextlib.contextmanager
def values_checked(env):
    """GPU: the blocking host check of expert ids (``settings.check_values``), so the bad rank
    raises on the call itself; the reference backend always checks."""
    old = ep.settings.check_values
    ep.settings.check_values = True
    try:
        yield
    finally:
        ep.settings.check_values = old


def good_dispatch(env, seed=3):
    """A valid dispatch of this rank's inputs: (recv_x, recv_topk_weights, handle)."""
    idx, x, w = inputs(seed, env.rank, env)
    recv_x, _, recv_w, _, handle, _ = env.buf.dispatch(dev(env, x), topk_idx=dev(env, idx), topk_weights=dev(env, w),
                                                       **layout(env, idx))
    return recv_x, recv_w, handle


def good_ll_dispatch(env, seed=4):
    idx, x, w = inputs(seed, env.rank, env)
    recv_x, _, handle, _, _ = env.buf.low_latency_dispatch(dev(env, x), dev(env, idx), M, env.E, use_fp8=False)
    return recv_x, idx, w, handle


# ------------------------------------------------------------------------------------ cases
class Case(NamedTuple):
    id: str
    call: Callable          # call(env): the collective call, the last rank's input differs
    arg: str                # the argument every rank's message starts with
    local: bool = False     # the last rank's own checks fail (its message is its own)
    values: bool = False    # needs the value check on the GPU (settings.check_values)
    exc: type = ep.DeepEPInvalid
    gpu_only: bool = False


def _layout_call(env, idx, num_experts=None):
    return env.buf.get_dispatch_layout(dev(env, idx), num_experts or env.E)


def c_layout_bad_id(env):
    idx, _, _ = inputs(1, env.rank, env)
    if env.odd:
        idx[0, 0] = env.E          # out of range
    _layout_call(env, idx)


def c_dispatch_bad_id(env):
    idx, x, w = inputs(1, env.rank, env)
    kw = layout(env, idx)
    if env.odd:
        idx[1, 0] = env.E + 5
    env.buf.dispatch(dev(env, x), topk_idx=dev(env, idx), topk_weights=dev(env, w), **kw)


def c_gpu_reported_bad_id(env):
    """GPU without the value check: the layout kernel finds the bad id and records it; the next call
    raises it on the bad rank among its checks, so every rank raises instead of the others
    waiting in the dispatch kernels."""
    import cupy
    idx, x, w = inputs(1, env.rank, env)
    if env.odd:
        idx[0, 0] = env.E
    per_rank, _, per_expert, in_rank, _ = env.buf.get_dispatch_layout(dev(env, idx), env.E)
    cupy.cuda.Device().synchronize()      # the record is written
    env.buf.dispatch(dev(env, x), topk_idx=dev(env, idx), topk_weights=dev(env, w), num_tokens_per_rank=per_rank,
                     num_tokens_per_expert=per_expert, is_token_in_rank=in_rank)


def c_layout_num_experts(env):
    idx, _, _ = inputs(1, env.rank, env)
    _layout_call(env, idx, 2 * env.E if env.odd else env.E)


def c_dispatch_num_experts(env):
    idx, x, w = inputs(1, env.rank, env)
    e = 2 * env.E if env.odd else env.E      # ids stay below E: valid on every rank alone
    env.buf.dispatch(dev(env, x), topk_idx=dev(env, idx), topk_weights=dev(env, w), **layout(env, idx, e))


def c_dispatch_hidden(env):
    idx, x, w = inputs(1, env.rank, env, hidden=env.H + 128 if env.odd else env.H)
    env.buf.dispatch(dev(env, x), topk_idx=dev(env, idx), topk_weights=dev(env, w), **layout(env, idx))


def c_layout_topk(env):
    idx, _, _ = inputs(1, env.rank, env, k=K + 1 if env.odd else K)
    _layout_call(env, idx)


def c_dispatch_topk(env):
    idx, x, w = inputs(1, env.rank, env, k=K + 1 if env.odd else K)
    env.buf.dispatch(dev(env, x), topk_idx=dev(env, idx), topk_weights=dev(env, w), **layout(env, idx))


def c_dispatch_dtype(env):
    idx, x, w = inputs(1, env.rank, env)
    if env.odd:
        x = x.astype(np.float32)
    env.buf.dispatch(dev(env, x), topk_idx=dev(env, idx), topk_weights=dev(env, w), **layout(env, idx))


def c_dispatch_weights(env):
    idx, x, w = inputs(1, env.rank, env)
    env.buf.dispatch(dev(env, x), topk_idx=dev(env, idx), topk_weights=None if env.odd else dev(env, w),
                     **layout(env, idx))


def c_dispatch_worst(env):
    idx, x, w = inputs(1, env.rank, env)
    env.buf.dispatch(dev(env, x), topk_idx=dev(env, idx), topk_weights=dev(env, w),
                     num_worst_tokens=T * env.n if env.odd else 0, **layout(env, idx))


def c_dispatch_cached_on_one_rank(env):
    recv_x, _, handle = good_dispatch(env)
    idx, x, w = inputs(3, env.rank, env)
    if env.odd:
        env.buf.dispatch(dev(env, x), handle=handle)
    else:
        env.buf.dispatch(dev(env, x), topk_idx=dev(env, idx), topk_weights=dev(env, w), **layout(env, idx))


def c_dispatch_int32_ids(env):
    idx, x, w = inputs(1, env.rank, env)
    kw = layout(env, idx)
    if env.odd:
        idx = idx.astype(np.int32)
    env.buf.dispatch(dev(env, x), topk_idx=dev(env, idx), topk_weights=dev(env, w), **kw)


def c_combine_bias(env):
    recv_x, recv_w, handle = good_dispatch(env)
    bias = dev(env, np.ones((T, env.H), BF16)) if env.odd else None
    env.buf.combine(recv_x, handle, topk_weights=recv_w, bias=bias)


def c_combine_hidden(env):
    recv_x, recv_w, handle = good_dispatch(env)
    if env.odd:
        recv_x = dev(env, np.zeros((recv_x.shape[0], env.H + 128), BF16))
    env.buf.combine(recv_x, handle, topk_weights=recv_w)


def c_combine_dtype(env):
    recv_x, recv_w, handle = good_dispatch(env)
    if env.odd:
        recv_x = dev(env, np.zeros(recv_x.shape, np.float32))
    env.buf.combine(recv_x, handle, topk_weights=recv_w)


def c_combine_weights(env):
    recv_x, recv_w, handle = good_dispatch(env)
    env.buf.combine(recv_x, handle, topk_weights=None if env.odd else recv_w)


def c_ll_max_tokens(env):
    idx, x, _ = inputs(2, env.rank, env)
    env.buf.low_latency_dispatch(dev(env, x), dev(env, idx), 2 * M if env.odd else M, env.E, use_fp8=False)


def c_ll_num_experts(env):
    idx, x, _ = inputs(2, env.rank, env)
    env.buf.low_latency_dispatch(dev(env, x), dev(env, idx), M, 2 * env.E if env.odd else env.E, use_fp8=False)


def c_ll_hidden(env):
    idx, x, _ = inputs(2, env.rank, env, hidden=env.H + 128 if env.odd else env.H)
    env.buf.low_latency_dispatch(dev(env, x), dev(env, idx), M, env.E, use_fp8=False)


def c_ll_topk(env):
    idx, x, _ = inputs(2, env.rank, env, k=K + 1 if env.odd else K)
    env.buf.low_latency_dispatch(dev(env, x), dev(env, idx), M, env.E, use_fp8=False)


def c_ll_fp8(env):
    idx, x, _ = inputs(2, env.rank, env)
    env.buf.low_latency_dispatch(dev(env, x), dev(env, idx), M, env.E, use_fp8=env.odd)


def c_ll_bad_id(env):
    idx, x, _ = inputs(2, env.rank, env)
    if env.odd:
        idx[0, 0] = -2
    env.buf.low_latency_dispatch(dev(env, x), dev(env, idx), M, env.E, use_fp8=False)


def c_ll_combine_hook(env):
    recv_x, idx, w, handle = good_ll_dispatch(env)
    env.buf.low_latency_combine(recv_x, dev(env, idx), dev(env, w), handle, return_recv_hook=env.odd)


def c_ll_combine_bad_weights(env):
    recv_x, idx, w, handle = good_ll_dispatch(env)
    if env.odd:
        w = w[:, :1].copy()      # the wrong shape: this rank's own check fails
    env.buf.low_latency_combine(recv_x, dev(env, idx), dev(env, w), handle)


def c_clean_hidden(env):
    env.buf.clean_low_latency_buffer(M, env.H + 128 if env.odd else env.H, env.E)


def c_different_calls(env):
    idx, x, _ = inputs(2, env.rank, env)
    if env.odd:
        _layout_call(env, idx)
    else:
        env.buf.low_latency_dispatch(dev(env, x), dev(env, idx), M, env.E, use_fp8=False)


CASES = [
    Case("layout-topk_idx-out-of-range", c_layout_bad_id, "topk_idx", local=True, values=True),
    Case("dispatch-topk_idx-out-of-range", c_dispatch_bad_id, "topk_idx", local=True, values=True),
    Case("dispatch-gpu-reported-bad-id", c_gpu_reported_bad_id, "dispatch", local=True, gpu_only=True),
    Case("layout-num_experts", c_layout_num_experts, "num_experts"),
    Case("dispatch-num_experts", c_dispatch_num_experts, "num_tokens_per_expert"),
    Case("dispatch-hidden", c_dispatch_hidden, "x"),
    Case("layout-topk", c_layout_topk, "topk_idx"),
    Case("dispatch-topk", c_dispatch_topk, "topk_idx"),
    Case("dispatch-bf16-vs-float32", c_dispatch_dtype, "x"),
    Case("dispatch-weights-on-one-rank", c_dispatch_weights, "topk_weights"),
    Case("dispatch-num_worst_tokens", c_dispatch_worst, "num_worst_tokens"),
    Case("dispatch-cached-on-one-rank", c_dispatch_cached_on_one_rank, "handle"),
    Case("dispatch-int32-topk_idx", c_dispatch_int32_ids, "topk_idx", local=True, exc=ep.DeepEPTypeError),
    Case("combine-bias-on-one-rank", c_combine_bias, "bias"),
    Case("combine-hidden", c_combine_hidden, "x"),
    Case("combine-bf16-vs-float32", c_combine_dtype, "x"),
    Case("combine-weights-on-one-rank", c_combine_weights, "topk_weights"),
    Case("ll-num_max_dispatch_tokens_per_rank", c_ll_max_tokens, "num_max_dispatch_tokens_per_rank"),
    Case("ll-num_experts", c_ll_num_experts, "num_experts"),
    Case("ll-hidden", c_ll_hidden, "x"),
    Case("ll-topk", c_ll_topk, "topk_idx"),
    Case("ll-use_fp8", c_ll_fp8, "use_fp8"),
    Case("ll-topk_idx-out-of-range", c_ll_bad_id, "topk_idx", local=True, values=True),
    Case("ll-combine-hook-on-one-rank", c_ll_combine_hook, "return_recv_hook"),
    Case("ll-combine-bad-weights", c_ll_combine_bad_weights, "topk_weights", local=True),
    Case("clean-hidden", c_clean_hidden, "hidden"),
    Case("different-calls", c_different_calls, "self"),
]


# ------------------------------------------------------------------------------------ checks
def ht_round_problems(env, seed=11):
    """A valid layout + dispatch + combine against the reference model (bit for bit)."""
    n, me = env.n, env.rank
    all_in = [inputs(seed, r, env) for r in range(n)]
    idx, x, w = all_in[me]
    per_rank, _, per_expert, in_rank, _ = env.buf.get_dispatch_layout(dev(env, idx), env.E)
    recv_x, _, recv_w, counts, handle, _ = env.buf.dispatch(
        dev(env, x), topk_idx=dev(env, idx), topk_weights=dev(env, w), num_tokens_per_rank=per_rank,
        num_tokens_per_expert=per_expert, is_token_in_rank=in_rank)
    combined, combined_w, _ = env.buf.combine(recv_x, handle, topk_weights=recv_w)
    results = ref.dispatch([a[1] for a in all_in], [a[0] for a in all_in], [a[2] for a in all_in], env.E)
    want = results[me]
    want_c, want_cw = ref.combine([r.recv_x for r in results], results,
                                  topk_weights=[r.recv_topk_weights for r in results])[me]
    problems = []
    for name, got, exp in (("recv_x", recv_x, want.recv_x), ("recv_topk_weights", recv_w, want.recv_topk_weights),
                           ("combined_x", combined, want_c), ("combined_topk_weights", combined_w, want_cw)):
        got = host(env, got)
        if got.shape != exp.shape or not np.array_equal(got.view(np.uint8), np.ascontiguousarray(exp).view(np.uint8)):
            problems.append(f"{name} differs from the reference")
    if list(counts) != list(want.num_recv_tokens_per_expert_list):
        problems.append(f"per-expert counts {list(counts)} != {want.num_recv_tokens_per_expert_list}")
    return problems


def ll_round_problems(env, seed=12):
    """A valid low-latency dispatch + combine against the reference model (bit for bit)."""
    n, me = env.n, env.rank
    all_in = [inputs(seed, r, env) for r in range(n)]
    idx, x, w = all_in[me]
    recv_x, recv_count, handle, _, _ = env.buf.low_latency_dispatch(dev(env, x), dev(env, idx), M, env.E,
                                                                    use_fp8=False)
    results = ref.low_latency_dispatch([a[1] for a in all_in], [a[0] for a in all_in], M, env.E, use_fp8=False)
    want = results[me]
    problems = []
    counts = host(env, recv_count)
    if not np.array_equal(counts, want.recv_count):
        return [f"recv_count {counts} != {want.recv_count}"]
    got = host(env, recv_x)
    for l, c in enumerate(counts):
        if not np.array_equal(got[l, :c].view(np.uint16), want.recv_x[l, :c].view(np.uint16)):
            problems.append(f"recv_x of local expert {l} differs from the reference")
    ys = [r.recv_x for r in results]
    combined, _, _ = env.buf.low_latency_combine(dev(env, ys[me]), dev(env, idx), dev(env, w), handle)
    want_c = ref.low_latency_combine(ys, [a[0] for a in all_in], [a[2] for a in all_in], results)[me]
    if not np.array_equal(host(env, combined).view(np.uint16), want_c.view(np.uint16)):
        problems.append("low-latency combined_x differs from the reference")
    return problems


def _starts_with_arg(msg: str, arg: str) -> bool:
    return re.match(re.escape(arg) + r":", msg) is not None


def run_case(env, case, arg=None):
    """Make ``case``'s call on every rank and check every rank's exception; then a valid round."""
    comm = world()
    arg = arg or case.arg
    last = env.n - 1
    ctx = values_checked(env) if case.values else contextlib.nullcontext()
    start = time.monotonic()
    err = None
    with ctx:
        try:
            case.call(env)
        except Exception as e:   # checked below, on every rank
            err = e
    elapsed = time.monotonic() - start
    msg = "" if err is None else str(err)
    problems = []
    if err is None:
        problems.append("no exception")
    elif not isinstance(err, case.exc):
        problems.append(f"expected {case.exc.__name__}, got {type(err).__name__}: {msg}")
    elif arg == "dispatch":     # a record from the GPU: "dispatch: topk_idx: ..." on the bad rank
        if "topk_idx" not in msg:
            problems.append(f"the message does not name topk_idx: {msg!r}")
    elif not _starts_with_arg(msg, arg):
        problems.append(f"the message does not start with {arg!r}: {msg!r}")
    if err is not None and not (case.local and env.odd) and f"rank {last}" not in msg:
        problems.append(f"the message does not name rank {last}: {msg!r}")
    if elapsed > LIMIT_S:
        problems.append(f"raised after {elapsed:.1f} s")
    messages = comm.allgather(msg)
    if not case.local and len(set(messages)) != 1:
        problems.append(f"the ranks' messages differ: {messages}")
    assert_all_ranks(comm, not problems, f"{case.id}: " + "; ".join(problems))
    # the ranks are still in step: a valid round on the same buffer matches the reference
    problems = ht_round_problems(env) + ll_round_problems(env)
    assert_all_ranks(comm, not problems, f"after {case.id}: " + "; ".join(problems))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_every_rank_raises_naming_the_argument(env, case):
    if case.gpu_only and not env.gpu:
        pytest.skip("GPU backend only")
    run_case(env, case)


# the reference backend's own check, without the Buffer's agreement: the signature rides along with
# the first exchange of each operation (case -> the argument named)
BACKEND_CASES = {
    "dispatch-num_experts": "num_experts", "dispatch-hidden": "x", "dispatch-topk": "topk_idx",
    "dispatch-bf16-vs-float32": "x", "dispatch-weights-on-one-rank": "topk_weights",
    "dispatch-num_worst_tokens": "num_worst_tokens", "dispatch-cached-on-one-rank": "self",
    "combine-hidden": "x", "combine-bf16-vs-float32": "x", "combine-weights-on-one-rank": "topk_weights",
    "ll-num_max_dispatch_tokens_per_rank": "num_max_dispatch_tokens_per_rank", "ll-num_experts": "num_experts",
    "ll-hidden": "x", "ll-use_fp8": "use_fp8",
}


@pytest.mark.parametrize("case_id", list(BACKEND_CASES))
def test_reference_backend_agrees_without_the_buffer(env, case_id):
    if env.gpu:
        pytest.skip("reference backend only")
    case = next(c for c in CASES if c.id == case_id)
    ep.settings.check_agreement = False
    try:
        run_case(env, case, BACKEND_CASES[case_id])
    finally:
        ep.settings.check_agreement = True


def test_agreement_off_skips_it(env):
    """``settings.check_agreement = False``: no agreement (valid calls still work, same results)."""
    ep.settings.check_agreement = False
    try:
        problems = ht_round_problems(env, seed=21) + ll_round_problems(env, seed=22)
    finally:
        ep.settings.check_agreement = True
    assert_all_ranks(world(), not problems, "; ".join(problems))


def test_bad_setting_raises_on_every_rank(env):
    ep.settings.check_agreement = "sometimes"
    try:
        with pytest.raises(ep.DeepEPInvalid, match="^settings.check_agreement"):
            env.buf.get_dispatch_layout(dev(env, inputs(1, env.rank, env)[0]), env.E)
    finally:
        ep.settings.check_agreement = True


def test_timeout_names_the_missing_rank(env):
    """A rank that never makes the call: the others raise ``DeepEPTimeout`` naming it (after the
    timeout), then the late rank makes the call and every rank is in step again."""
    comm = world()
    last = env.n - 1
    ep.settings.timeout_seconds = 1.0
    idx = dev(env, inputs(1, env.rank, env)[0])
    err = None
    try:
        if not env.odd:
            try:
                env.buf.get_dispatch_layout(idx, env.E)
            except ep.DeepEPTimeout as e:
                err = e
        comm.Barrier()
        if env.odd:   # the late call meets the others' timed-out records, and passes
            env.buf.get_dispatch_layout(idx, env.E)
    finally:
        ep.settings.timeout_seconds = 20.0
    ok = env.odd or (err is not None and f"rank {last} sent nothing" in str(err)
                     and "get_dispatch_layout agreement timed out" in str(err))
    assert_all_ranks(comm, ok, f"expected a DeepEPTimeout naming rank {last}, got {err!r}")
    problems = ht_round_problems(env, seed=23)
    assert_all_ranks(comm, not problems, "; ".join(problems))
