"""GPU tier of the bad-input sweep (issue #12): the kinds that only exist on a GPU, and the new
checks on the GPU backend. Companion of tests/test_bad_inputs.py (same three assertions per kind):

  (a) the exception is exactly the expected ``DeepEPInvalid`` / ``DeepEPTypeError``;
  (b) the message starts with the name of the offending argument;
  (c) afterwards the same buffer still works: a high-throughput dispatch + combine (+ cached
      dispatch) and a low-latency dispatch + combine match the reference, bit for bit.

Values inside GPU arrays (NaN weights, layout outputs against ``topk_idx``, expert ids) are read
on the host only with ``settings.check_values = True`` (a device reduction and a host wait); those
kinds run with it on (``checked``). Everything here is refused before any launch, on every rank
alike, so it runs at any world size (written for one rank: ``pytest tests/gpu/test_bad_inputs_gpu.py``).
"""

import re
from typing import Callable, NamedTuple

import ml_dtypes
import numpy as np
import pytest

from dispatch_cases import host, run_case, to_gpu
from testutil import assert_all_ranks, gpu_count, gpu_skip_reason, world

pytestmark = pytest.mark.skipif(gpu_skip_reason() is not None, reason=str(gpu_skip_reason()))

BF16 = ml_dtypes.bfloat16
T, H, K, E, M = 64, 2048, 4, 32, 64        # tokens, hidden, top-k, experts, low-latency max tokens


@pytest.fixture(scope="module")
def buf():
    import deepep_cupy as ep
    comm = world()
    r = comm.Get_size()
    b = ep.Buffer(comm, num_nvl_bytes=ep.Buffer.get_intranode_size_hint(T, H, r, K),
                  num_rdma_bytes=ep.Buffer.get_low_latency_rdma_size_hint(M, H, r, E),
                  low_latency_mode=True, backend="gpu")
    assert not ep.settings.check_values, "the default settings are assumed (cases that need the check turn it on)"
    yield b
    b.destroy()


def small_buffer():
    """Another (collective) GPU buffer with room for the sweep's high-throughput shapes."""
    import deepep_cupy as ep
    comm = world()
    return ep.Buffer(comm, num_nvl_bytes=ep.Buffer.get_intranode_size_hint(T, H, comm.Get_size(), K), backend="gpu")


def rank_inputs(seed, rank, num_experts=E):
    """This rank's (topk_idx int64 [T, K] with -1 holes, x bf16 [T, H], weights float32 [T, K])."""
    rng = np.random.default_rng(seed * 100 + rank)
    topk = np.argsort(rng.random((T, num_experts)), axis=1)[:, :K].astype(np.int64)
    topk[rng.random(topk.shape) < 0.1] = -1
    x = rng.standard_normal((T, H), dtype=np.float32).astype(BF16)
    w = rng.random((T, K), dtype=np.float32)
    return topk, x, w


class Env(NamedTuple):
    """Good inputs of this rank, on the GPU."""
    idx: object
    x: object
    w: object


@pytest.fixture(scope="module")
def env(buf):
    topk, x, w = rank_inputs(1, buf.rank)
    return Env(to_gpu(topk), to_gpu(x), to_gpu(w))


def layout(b, idx, num_experts=E):
    per_rank, _, per_expert, in_rank, _ = b.get_dispatch_layout(idx, num_experts)
    return dict(num_tokens_per_rank=per_rank, num_tokens_per_expert=per_expert, is_token_in_rank=in_rank)


def dispatch(b, v, **over):
    """A good dispatch of this rank's inputs, with some arguments replaced."""
    kw = dict(x=v.x, topk_idx=v.idx, topk_weights=v.w, **layout(b, v.idx))
    kw.update(over)
    return b.dispatch(**kw)


def ht_handle(b, v):
    """(recv_x, recv_topk_weights, handle) of a good dispatch."""
    recv_x, _, recv_w, _, handle, _ = dispatch(b, v)
    return recv_x, recv_w, handle


def ll_dispatch(b, v):
    """(recv_x, handle) of a good BF16 low-latency dispatch (the buffer's laid-out shapes)."""
    recv_x, _, handle, _, _ = b.low_latency_dispatch(v.x, v.idx, M, E, use_fp8=False)
    return recv_x, handle


def misaligned(a, offset_bytes):
    """A C-contiguous CuPy array with the values of numpy ``a`` whose data pointer is ``offset_bytes``
    past a 256-byte aligned allocation. Written through uint8 (never through the misaligned view)."""
    import cupy as cp
    a = np.ascontiguousarray(a)
    raw = cp.zeros(a.nbytes + 256, cp.uint8)
    raw[offset_bytes:offset_bytes + a.nbytes] = cp.asarray(a.view(np.uint8).reshape(-1))
    return cp.ndarray(a.shape, cp.dtype(a.dtype), raw.data + offset_bytes)


def with_nan(g, where=(2, 0)):
    a = host(g).copy()
    a[where] = np.nan
    return to_gpu(a)


def checked(call):
    """``call`` with ``settings.check_values`` on (values are read on the host before the launch)."""
    def run(b, v):
        from deepep_cupy import settings
        old = settings.check_values
        settings.check_values = True
        try:
            return call(b, v)
        finally:
            settings.check_values = old
    return run


def on_other_gpu(a):
    """numpy ``a`` as a CuPy array on a GPU other than the current one."""
    import cupy as cp
    other = (cp.cuda.Device().id + 1) % gpu_count()
    with cp.cuda.Device(other):
        return cp.asarray(a)


def combine_with_other_buffers_handle(b, v, destroyed):
    """``b.combine`` given the handle of a second buffer's dispatch (that buffer destroyed first, or
    not); the second buffer is destroyed in the end either way (collective, on every rank)."""
    other = small_buffer()
    try:
        handle = ht_handle(other, v)[2]
        if destroyed:
            other.destroy()
        b.combine(ht_handle(b, v)[0], handle)
    finally:
        other.destroy()     # idempotent


def after_destroy(b, v):
    """Every method of a destroyed GPU buffer raises naming ``self``; the last one propagates."""
    import deepep_cupy as ep
    d = small_buffer()
    lay = layout(d, v.idx)
    d.destroy()
    for call in (lambda: d.dispatch(v.x, topk_idx=v.idx, **lay),
                 lambda: d.low_latency_dispatch(v.x, v.idx, M, E, use_fp8=False)):
        with pytest.raises(ep.DeepEPInvalid, match="^self: this Buffer was destroyed"):
            call()
    d.get_dispatch_layout(v.idx, E)


class Case(NamedTuple):
    id: str
    arg: str                # the message must start with this argument's name
    exc: str                # "DeepEPInvalid" or "DeepEPTypeError" (exactly)
    fragment: str           # and contain this
    call: Callable          # call(buf, env) must raise
    min_gpus: int = 1


CASES = [
    # ---- where the array lives ----
    Case("host-array-to-gpu-backend", "topk_idx", "DeepEPInvalid", "expected an array on cuda",
         lambda b, v: b.get_dispatch_layout(host(v.idx), E)),
    Case("array-on-another-gpu", "x", "DeepEPInvalid", "got one on cuda:",
         lambda b, v: dispatch(b, v, x=on_other_gpu(host(v.x))), min_gpus=2),
    Case("topk_idx-on-another-gpu", "topk_idx", "DeepEPInvalid", "got one on cuda:",
         lambda b, v: b.get_dispatch_layout(on_other_gpu(host(v.idx)), E), min_gpus=2),
    # ---- misaligned device pointers (a fault would take the CUDA context down) ----
    Case("x-misaligned-2-bytes", "x", "DeepEPInvalid", "not 16-byte aligned",
         lambda b, v: dispatch(b, v, x=misaligned(host(v.x), 2))),
    Case("x-misaligned-8-bytes", "x", "DeepEPInvalid", "not 16-byte aligned",
         lambda b, v: dispatch(b, v, x=misaligned(host(v.x), 8))),
    Case("topk_idx-misaligned-4-bytes", "topk_idx", "DeepEPInvalid", "not 8-byte aligned",
         lambda b, v: b.get_dispatch_layout(misaligned(host(v.idx), 4), E)),
    Case("topk_weights-misaligned-2-bytes", "topk_weights", "DeepEPInvalid", "not 4-byte aligned",
         lambda b, v: dispatch(b, v, topk_weights=misaligned(host(v.w), 2))),
    Case("combine-bias-misaligned", "bias", "DeepEPInvalid", "not 16-byte aligned",
         lambda b, v: (lambda r: b.combine(r[0], r[2], bias=misaligned(np.zeros((T, H), BF16), 4)))(ht_handle(b, v))),
    Case("ll-x-misaligned", "x", "DeepEPInvalid", "not 16-byte aligned",
         lambda b, v: b.low_latency_dispatch(misaligned(host(v.x), 2), v.idx, M, E, use_fp8=False)),
    Case("ll-combine-out-misaligned", "out", "DeepEPInvalid", "not 16-byte aligned",
         lambda b, v: (lambda r: b.low_latency_combine(r[0], v.idx, v.w, r[1],
                                                       out=misaligned(np.zeros((T, H), BF16), 6)))(ll_dispatch(b, v))),
    # ---- strides ----
    Case("topk_idx-non-contiguous-view", "topk_idx", "DeepEPInvalid", "C-contiguous",
         lambda b, v: b.get_dispatch_layout(to_gpu(np.repeat(host(v.idx), 2, axis=1))[:, ::2], E)),
    Case("topk_idx-negative-stride-view", "topk_idx", "DeepEPInvalid", "C-contiguous",
         lambda b, v: b.get_dispatch_layout(v.idx[::-1], E)),
    Case("x-negative-stride-view", "x", "DeepEPInvalid", "C-contiguous",
         lambda b, v: dispatch(b, v, x=v.x[::-1])),
    Case("x-row-not-16-bytes", "x", "DeepEPInvalid", "multiple of 16 bytes",
         lambda b, v: dispatch(b, v, x=to_gpu(np.zeros((T, 6), np.float32)))),
    # ---- values (settings.check_values) ----
    Case("topk_idx-expert-id-too-large-checked", "topk_idx", "DeepEPInvalid", f"found {E + 5}",
         checked(lambda b, v: b.get_dispatch_layout(to_gpu(np.where(host(v.idx) == 3, E + 5, host(v.idx))), E))),
    Case("topk_weights-NaN-checked", "topk_weights", "DeepEPInvalid", "found nan",
         checked(lambda b, v: dispatch(b, v, topk_weights=with_nan(v.w, (int(np.argmax(host(v.idx)[:, 0] >= 0)), 0))))),
    Case("ll-combine-topk_weights-NaN-checked", "topk_weights", "DeepEPInvalid", "found nan",
         checked(lambda b, v: (lambda r: b.low_latency_combine(
             r[0], v.idx, with_nan(v.w, (int(np.argmax(host(v.idx)[:, 1] >= 0)), 1)), r[1]))(ll_dispatch(b, v)))),
    Case("stale-num_tokens_per_expert-checked", "num_tokens_per_expert", "DeepEPInvalid", "does not match topk_idx",
         checked(lambda b, v: dispatch(b, v, num_tokens_per_expert=layout(
             b, to_gpu(rank_inputs(9, b.rank)[0]))["num_tokens_per_expert"]))),
    # ---- handles ----
    Case("handle-from-another-buffer", "handle", "DeepEPInvalid", "made by another buffer",
         lambda b, v: combine_with_other_buffers_handle(b, v, destroyed=False)),
    Case("handle-from-a-destroyed-buffer", "handle", "DeepEPInvalid", "destroyed since",
         lambda b, v: combine_with_other_buffers_handle(b, v, destroyed=True)),
    Case("cached-dispatch-num_experts-changed", "num_tokens_per_expert", "DeepEPInvalid", f"expected shape ({E})",
         lambda b, v: b.dispatch(v.x, handle=ht_handle(b, v)[2],
                                 num_tokens_per_expert=layout(b, v.idx, 2 * E)["num_tokens_per_expert"])),
    Case("ll-combine-zero_copy-not-the-combine-buffer", "x", "DeepEPInvalid", "zero_copy=True",
         lambda b, v: (lambda r: b.low_latency_combine(r[0], v.idx, v.w, r[1], zero_copy=True))(ll_dispatch(b, v))),
    Case("call-after-destroy", "self", "DeepEPInvalid", "this Buffer was destroyed", after_destroy),
    # ---- low-latency limits, stream arguments ----
    Case("ll-hidden-not-supported", "x", "DeepEPInvalid", "multiples of 128",
         lambda b, v: b.low_latency_dispatch(to_gpu(np.zeros((T, 200), BF16)), v.idx, M, E)),
    Case("ll-tokens-exceed-num_max_dispatch_tokens_per_rank", "x", "DeepEPInvalid",
         "exceed num_max_dispatch_tokens_per_rank=8", lambda b, v: b.low_latency_dispatch(v.x, v.idx, 8, E)),
    Case("allocate_on_comm_stream-without-previous_event", "allocate_on_comm_stream", "DeepEPTypeError",
         "needs previous_event", lambda b, v: dispatch(b, v, allocate_on_comm_stream=True)),
]


def round_trip_problems(b, seed):
    """A good high-throughput round trip (dispatch, combine, cached dispatch) and a good low-latency
    one (BF16 dispatch, combine) on ``b``, against the reference over every rank's inputs."""
    from deepep_cupy import reference
    R, me = b.num_ranks, b.rank
    problems = run_case(b, seed, T, H, K, E, "holes", fp8=False, with_weights=True, use_cached=True)
    ins = [rank_inputs(seed, r) for r in range(R)]
    idxs, xs, ws = ([i[n] for i in ins] for n in range(3))
    ref = reference.low_latency_dispatch(xs, idxs, M, E, use_fp8=False)
    recv, count, handle, _, _ = b.low_latency_dispatch(to_gpu(xs[me]), to_gpu(idxs[me]), M, E, use_fp8=False)
    counts, data = host(count), host(recv)
    mine = ref[me]
    if not np.array_equal(counts, mine.recv_count):
        problems.append(f"low-latency recv_count {counts} != {mine.recv_count}")
    elif any(not np.array_equal(data[l, :n].view(np.uint16), mine.recv_x[l, :n].view(np.uint16))
             for l, n in enumerate(counts)):
        problems.append("low-latency dispatch data differs")
    ys = [r.recv_x for r in ref]
    want = reference.low_latency_combine(ys, idxs, ws, ref)[me]
    out, _, _ = b.low_latency_combine(to_gpu(ys[me]), to_gpu(idxs[me]), to_gpu(ws[me]), handle)
    if not np.array_equal(host(out).view(np.uint16), want.view(np.uint16)):
        problems.append("low-latency combine differs")
    return problems


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_names_the_argument_and_buffer_stays_usable(buf, env, case):
    import cupy as cp
    import deepep_cupy as ep
    if gpu_count() < case.min_gpus:
        pytest.skip(f"needs {case.min_gpus} visible GPUs, found {gpu_count()}")
    problems = []
    try:
        case.call(buf, env)
        problems.append("no exception")
    except ep.DeepEPInvalid as err:
        msg = str(err)
        if type(err).__name__ != case.exc:
            problems.append(f"{type(err).__name__} instead of {case.exc}: {msg}")
        if not re.match(re.escape(case.arg) + r"(?![\w\[])", msg):
            problems.append(f"message {msg!r} does not start with {case.arg!r}")
        if case.fragment not in msg:
            problems.append(f"message {msg!r} lacks {case.fragment!r}")
    except Exception as err:      # anything else: report it on every rank, then go on
        problems.append(f"{type(err).__name__} (not a DeepEPInvalid): {err}")
    cp.cuda.Device().synchronize()
    problems += round_trip_problems(buf, 2 + CASES.index(case))
    assert_all_ranks(world(), not problems, f"{case.id}: " + "; ".join(problems[:6]))


def test_sweep_ids_are_distinct():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
