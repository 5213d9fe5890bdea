"""Tests of the numpy reference model (deepep_cupy.reference): hand-computed cases and
properties over random routings. CPU only, no MPI."""

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from deepep_cupy import reference as ref
from deepep_cupy.errors import DeepEPInvalid, DeepEPTypeError

BF16 = ref.BF16
FP8 = ref.FP8
PROPS = settings(max_examples=25, deadline=None, derandomize=True)


def bits(a):
    """Raw bits of an array, so that comparisons are bit-exact (also for bf16/fp8)."""
    a = np.ascontiguousarray(a)
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def assert_bits_equal(a, b):
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert a.shape == b.shape, (a.shape, b.shape)
    np.testing.assert_array_equal(bits(a), bits(b))


# ------------------------------------------------------------------------------------------
# A hand-computed case: 3 ranks, 6 experts (2 per rank), top-2, rank 1 has no tokens.
#   rank 0 tokens: t0 -> [0, 3]  (ranks 0, 1)
#                  t1 -> [-1, 5] (rank 2)
#                  t2 -> [2, 2]  (rank 1, duplicate expert)
#                  t3 -> [-1,-1] (nowhere)
#   rank 2 tokens: t0 -> [4, 1]  (ranks 2, 0)
#                  t1 -> [1, 0]  (rank 0 twice -> once)
#                  t2 -> [5, -1] (rank 2)
# ------------------------------------------------------------------------------------------
R, E, H, K = 3, 6, 4, 2
IDX = [np.array([[0, 3], [-1, 5], [2, 2], [-1, -1]], np.int64),
       np.zeros((0, 2), np.int64),
       np.array([[4, 1], [1, 0], [5, -1]], np.int64)]
W = [np.array([[0.5, 0.25], [0.75, 0.125], [0.375, 0.625], [1.0, 2.0]], np.float32),
     np.zeros((0, 2), np.float32),
     np.array([[1.5, 0.5], [0.25, 0.75], [0.0625, 3.0]], np.float32)]


def hand_x(s, t):
    return 10 * s + t + 0.25 * np.arange(H)


XS = [np.array([hand_x(s, t) for t in range(idx.shape[0])], np.float32).reshape(-1, H).astype(BF16)
      for s, idx in enumerate(IDX)]


def test_layout_hand_case():
    per_rank, per_rdma, per_expert, in_rank = ref.get_dispatch_layout(IDX[0], E, R)
    assert per_rank.dtype == np.int32 and per_expert.dtype == np.int32
    np.testing.assert_array_equal(per_rank, [1, 2, 1])
    assert per_rdma is None
    np.testing.assert_array_equal(per_expert, [1, 0, 2, 1, 0, 1])
    np.testing.assert_array_equal(in_rank, [[1, 1, 0], [0, 0, 1], [0, 1, 0], [0, 0, 0]])
    per_rank, _, per_expert, in_rank = ref.get_dispatch_layout(IDX[2], E, R)
    np.testing.assert_array_equal(per_rank, [2, 0, 2])
    np.testing.assert_array_equal(per_expert, [1, 2, 0, 0, 1, 1])
    per_rank, per_rdma, per_expert, in_rank = ref.get_dispatch_layout(IDX[1], E, R)
    assert per_rank.tolist() == [0, 0, 0] and per_expert.tolist() == [0] * 6
    assert in_rank.shape == (0, 3)
    # one rank per node: the RDMA counts are the rank counts
    _, per_rdma, _, _ = ref.get_dispatch_layout(IDX[0], E, R, ranks_per_node=1)
    np.testing.assert_array_equal(per_rdma, [1, 2, 1])


def test_layout_rdma_hand_case():
    idx = np.array([[0, 2], [4, 7], [1, 6], [-1, -1], [3, 3]], np.int64)  # 4 ranks, 2 per node
    per_rank, per_rdma, per_expert, _ = ref.get_dispatch_layout(idx, 8, 4, ranks_per_node=2)
    np.testing.assert_array_equal(per_rank, [2, 2, 1, 2])
    np.testing.assert_array_equal(per_rdma, [3, 2])
    assert per_rdma.dtype == np.int32
    np.testing.assert_array_equal(per_expert, [1, 1, 1, 2, 1, 0, 1, 1])
    assert ref.get_dispatch_layout(idx, 8, 4, ranks_per_node=4)[1] is None
    assert ref.get_dispatch_layout(idx, 8, 4, ranks_per_node=8)[1] is None
    with pytest.raises(DeepEPInvalid, match="ranks_per_node"):
        ref.get_dispatch_layout(idx, 8, 4, ranks_per_node=3)


def test_dispatch_hand_case():
    res = ref.dispatch(XS, IDX, W, E)
    prefix = [[1, 2, 1], [1, 2, 1], [3, 2, 3]]
    for r in range(R):
        np.testing.assert_array_equal(res[r].rank_prefix_matrix, prefix)
        assert res[r].rank_prefix_matrix.dtype == np.int32
        assert res[r].src_num_tokens == (4, 0, 3)
    r0, r1, r2 = res
    # rank 0 receives rank0/t0, rank2/t0, rank2/t1
    np.testing.assert_array_equal(r0.recv_src_rank, [0, 2, 2])
    np.testing.assert_array_equal(r0.recv_src_idx, [0, 0, 1])
    assert_bits_equal(r0.recv_x, np.stack([XS[0][0], XS[2][0], XS[2][1]]))
    np.testing.assert_array_equal(r0.recv_topk_idx, [[0, -1], [-1, 1], [1, 0]])
    np.testing.assert_array_equal(r0.recv_topk_weights, [[0.5, 0], [0, 0.5], [0.25, 0.75]])
    assert r0.num_recv_tokens_per_expert_list == [2, 2]
    # rank 1 receives rank0/t0 and rank0/t2 (duplicate expert 2 -> counted twice)
    np.testing.assert_array_equal(r1.recv_src_rank, [0, 0])
    np.testing.assert_array_equal(r1.recv_src_idx, [0, 2])
    np.testing.assert_array_equal(r1.recv_topk_idx, [[-1, 1], [0, 0]])
    np.testing.assert_array_equal(r1.recv_topk_weights, [[0, 0.25], [0.375, 0.625]])
    assert r1.num_recv_tokens_per_expert_list == [2, 1]
    # rank 2 receives rank0/t1, rank2/t0, rank2/t2
    np.testing.assert_array_equal(r2.recv_src_rank, [0, 2, 2])
    np.testing.assert_array_equal(r2.recv_src_idx, [1, 0, 2])
    np.testing.assert_array_equal(r2.recv_topk_idx, [[-1, 1], [0, -1], [1, -1]])
    np.testing.assert_array_equal(r2.recv_topk_weights, [[0, 0.125], [1.5, 0], [0.0625, 0]])
    assert r2.num_recv_tokens_per_expert_list == [1, 2]
    for d in res:
        assert d.recv_x.dtype == BF16 and d.recv_topk_idx.dtype == np.int64
        assert d.recv_src_rank.dtype == np.int32 and d.recv_src_idx.dtype == np.int32
        assert d.recv_x_scales is None
        np.testing.assert_array_equal(d.num_recv_tokens_per_expert, d.num_recv_tokens_per_expert_list)


def test_dispatch_hand_case_alignment_and_no_weights():
    res = ref.dispatch(XS, IDX, None, E, expert_alignment=4)
    assert [d.num_recv_tokens_per_expert_list for d in res] == [[4, 4], [4, 4], [4, 4]]
    assert all(d.recv_topk_weights is None for d in res)
    res = ref.dispatch(XS, IDX, None, E, expert_alignment=3)
    assert [d.num_recv_tokens_per_expert_list for d in res] == [[3, 3], [3, 3], [3, 3]]
    res = ref.dispatch(XS, IDX, None, E, expert_alignment=2)
    assert [d.num_recv_tokens_per_expert_list for d in res] == [[2, 2], [2, 2], [2, 2]]


def test_combine_hand_case():
    res = ref.dispatch(XS, IDX, W, E)
    out = ref.combine([d.recv_x for d in res], res, [d.recv_topk_weights for d in res])
    assert len(out) == 3
    x0, w0 = out[0]
    f = XS[0].astype(np.float32)
    np.testing.assert_array_equal(x0.astype(np.float32), np.stack([2 * f[0], f[1], f[2], 0 * f[3]]))
    np.testing.assert_array_equal(w0, [[0.5, 0.25], [0, 0.125], [0.375, 0.625], [0, 0]])
    x1, w1 = out[1]
    assert x1.shape == (0, H) and w1.shape == (0, 2) and x1.dtype == BF16
    x2, w2 = out[2]
    f = XS[2].astype(np.float32)
    np.testing.assert_array_equal(x2.astype(np.float32), np.stack([2 * f[0], f[1], f[2]]))
    np.testing.assert_array_equal(w2, [[1.5, 0.5], [0.25, 0.75], [0.0625, 0]])


def test_combine_bias_pair_order_and_cast():
    res = ref.dispatch(XS, IDX, None, E)
    rng = np.random.default_rng(3)
    ys = [rng.standard_normal(d.recv_x.shape).astype(BF16) for d in res]
    biases = [(rng.standard_normal((x.shape[0], H)).astype(BF16),
               rng.standard_normal((x.shape[0], H)).astype(np.float32)) for x in XS]
    out = ref.combine(ys, res, bias=biases)
    for s in range(R):
        b0, b1 = biases[s]
        expect = np.zeros((XS[s].shape[0], H), np.float32)
        for t in range(XS[s].shape[0]):
            acc = np.zeros(H, np.float32)
            acc = acc + b0[t].astype(np.float32)
            acc = acc + b1[t]
            for r in range(R):  # ascending receiving rank
                d = res[r]
                rows = np.nonzero((d.recv_src_rank == s) & (d.recv_src_idx == t))[0]
                assert rows.size <= 1
                if rows.size:
                    acc = acc + ys[r][rows[0]].astype(np.float32)
            expect[t] = acc
        assert out[s][1] is None
        assert_bits_equal(out[s][0], expect.astype(BF16))
    # token 3 of rank 0 went nowhere: only the bias
    assert_bits_equal(out[0][0][3], (biases[0][0][3].astype(np.float32) + biases[0][1][3]).astype(BF16))
    # a single bias array, and a pair with a None entry
    single = ref.combine(ys, res, bias=[b[1] for b in biases])
    pair = ref.combine(ys, res, bias=[(None, b[1]) for b in biases])
    for s in range(R):
        assert_bits_equal(single[s][0], pair[s][0])


def test_combine_minus_zero_bias_gives_plus_zero():
    res = ref.dispatch(XS, IDX, None, E)
    ys = [np.zeros(d.recv_x.shape, BF16) for d in res]
    bias = [np.full((x.shape[0], H), -0.0, np.float32) for x in XS]
    out = ref.combine(ys, res, bias=bias)
    assert not np.signbit(out[0][0].astype(np.float32)).any()


def test_dispatch_num_worst_tokens_hand_case():
    base = ref.dispatch(XS, IDX, W, E)
    res = ref.dispatch(XS, IDX, W, E, num_worst_tokens=5)
    for b, d in zip(base, res):
        n = b.num_recv_tokens
        assert d.num_recv_tokens == n and d.num_worst_tokens == 5
        assert d.recv_x.shape == (5, H)
        assert d.num_recv_tokens_per_expert_list == []
        np.testing.assert_array_equal(d.num_recv_tokens_per_expert, b.num_recv_tokens_per_expert_list)
        assert_bits_equal(d.recv_x[:n], b.recv_x)
        assert (d.recv_x[n:].astype(np.float32) == 0).all()
        np.testing.assert_array_equal(d.recv_topk_idx[n:], -1)
        np.testing.assert_array_equal(d.recv_topk_weights[n:], 0)
        np.testing.assert_array_equal(d.recv_src_idx[n:], -1)
        np.testing.assert_array_equal(d.recv_src_rank[n:], -1)
        np.testing.assert_array_equal(d.recv_topk_idx[:n], b.recv_topk_idx)
    # padding rows of the combine input are ignored
    ys = [d.recv_x.copy() for d in res]
    for d, y in zip(res, ys):
        y[d.num_recv_tokens:] = 1000
    padded = ref.combine(ys, res)
    plain = ref.combine([d.recv_x for d in base], base)
    for a, b in zip(padded, plain):
        assert_bits_equal(a[0], b[0])
    # exactly the worst case fits, one less does not
    ref.dispatch(XS, IDX, W, E, num_worst_tokens=3)
    with pytest.raises(DeepEPInvalid, match="num_worst_tokens"):
        ref.dispatch(XS, IDX, W, E, num_worst_tokens=2)


def test_dispatch_fp8_pair_passes_scales():
    rng = np.random.default_rng(5)
    hidden = 256
    xs = [rng.standard_normal((x.shape[0], hidden)).astype(BF16) for x in XS]
    pairs = [ref.per_token_cast_to_fp8(x) for x in xs]
    res = ref.dispatch([p[0] for p in pairs], IDX, W, E, x_scales=[p[1] for p in pairs])
    for d in res:
        assert d.recv_x.dtype == FP8 and d.recv_x_scales.dtype == np.float32
        assert d.recv_x_scales.shape == (d.num_recv_tokens, 2)
        for row, (s, t) in enumerate(zip(d.recv_src_rank, d.recv_src_idx)):
            assert_bits_equal(d.recv_x[row], pairs[s][0][t])
            assert_bits_equal(d.recv_x_scales[row], pairs[s][1][t])
    res = ref.dispatch([p[0] for p in pairs], IDX, W, E, num_worst_tokens=4,
                       x_scales=[p[1] for p in pairs])
    for d in res:
        assert d.recv_x_scales.shape == (4, 2)
        np.testing.assert_array_equal(d.recv_x_scales[d.num_recv_tokens:], 0)


# ------------------------------------------------------------------------------------------
# random routings
# ------------------------------------------------------------------------------------------

def random_case(seed, num_ranks=None, num_experts=None, hidden=None, dtype=BF16, zero_rank=True):
    rng = np.random.default_rng(seed)
    num_ranks = num_ranks or int(rng.integers(1, 6))
    num_experts = num_experts or num_ranks * int(rng.integers(1, 4))
    hidden = hidden or int(rng.choice([8, 128, 256]))
    k = int(rng.integers(1, min(4, num_experts) + 1))
    xs, idx, ws = [], [], []
    empty = int(rng.integers(num_ranks)) if zero_rank else -1
    for s in range(num_ranks):
        t = 0 if s == empty else int(rng.integers(0, 9))
        xs.append(rng.standard_normal((t, hidden)).astype(dtype))
        i = np.stack([rng.permutation(num_experts)[:k] for _ in range(t)]) if t else \
            np.zeros((0, k), np.int64)
        i = np.where(rng.random((t, k)) < 0.25, -1, i).astype(np.int64)
        if t and rng.random() < 0.5 and k >= 2:  # duplicate expert in one token
            i[0, 1] = i[0, 0]
        idx.append(i)
        ws.append(rng.random((t, k)).astype(np.float32))
    return xs, idx, ws, num_experts


@PROPS
@given(st.integers(0, 2**31 - 1))
def test_random_layout_matches_bruteforce(seed):
    xs, idx, _, num_experts = random_case(seed)
    num_ranks = len(xs)
    per = num_experts // num_ranks
    for rpn in [None] + [d for d in range(1, num_ranks + 1) if num_ranks % d == 0]:
        for i in idx:
            per_rank, per_rdma, per_expert, in_rank = ref.get_dispatch_layout(i, num_experts,
                                                                              num_ranks, rpn)
            exp_rank = np.zeros(num_ranks, int)
            exp_expert = np.zeros(num_experts, int)
            nodes = None if rpn is None or rpn >= num_ranks else num_ranks // rpn
            exp_rdma = np.zeros(nodes or 0, int)
            for t in range(i.shape[0]):
                valid = [int(e) for e in i[t] if e >= 0]
                for e in valid:
                    exp_expert[e] += 1
                ranks = {e // per for e in valid}
                for r in ranks:
                    exp_rank[r] += 1
                    assert in_rank[t, r]
                assert in_rank[t].sum() == len(ranks)
                if nodes:
                    for n in {r // rpn for r in ranks}:
                        exp_rdma[n] += 1
            np.testing.assert_array_equal(per_rank, exp_rank)
            np.testing.assert_array_equal(per_expert, exp_expert)
            if nodes:
                np.testing.assert_array_equal(per_rdma, exp_rdma)
            else:
                assert per_rdma is None


@PROPS
@given(st.integers(0, 2**31 - 1), st.integers(1, 5))
def test_random_dispatch_combine_roundtrip(seed, alignment):
    xs, idx, ws, num_experts = random_case(seed)
    num_ranks = len(xs)
    per = num_experts // num_ranks
    res = ref.dispatch(xs, idx, ws, num_experts, expert_alignment=alignment)
    for r, d in enumerate(res):
        # order: by source rank, then token index; each token once
        keys = list(zip(d.recv_src_rank.tolist(), d.recv_src_idx.tolist()))
        assert keys == sorted(set(keys))
        expect_keys = [(s, t) for s in range(num_ranks) for t in range(xs[s].shape[0])
                       if any(e >= 0 and e // per == r for e in idx[s][t])]
        assert keys == expect_keys
        raw = np.zeros(per, int)
        for row, (s, t) in enumerate(keys):
            assert_bits_equal(d.recv_x[row], xs[s][t])
            for k in range(idx[s].shape[1]):
                e = idx[s][t, k]
                local = e - r * per if e >= 0 and e // per == r else -1
                assert d.recv_topk_idx[row, k] == local
                assert d.recv_topk_weights[row, k] == (ws[s][t, k] if local >= 0 else 0)
                if local >= 0:
                    raw[local] += 1
        assert d.num_recv_tokens_per_expert_list == [int(-(-c // alignment) * alignment) for c in raw]
        # rank_prefix_matrix meaning
        for i in range(num_ranks):
            assert d.rank_prefix_matrix[i, r] == sum(1 for s, _ in keys if s <= i)
    out = ref.combine([d.recv_x for d in res], res, [d.recv_topk_weights for d in res])
    for s in range(num_ranks):
        copies = np.array([len({e // per for e in row if e >= 0}) for row in idx[s]], np.float32)
        # + 0.0: tokens sent nowhere are +0.0 (accumulator starts at +0.0)
        expect = (xs[s].astype(np.float32) * copies[:, None] + np.float32(0)).astype(BF16)
        assert_bits_equal(out[s][0], expect)
        valid = idx[s] >= 0
        np.testing.assert_array_equal(out[s][1][valid], ws[s][valid])
        np.testing.assert_array_equal(out[s][1][~valid], 0)


@PROPS
@given(st.integers(0, 2**31 - 1))
def test_random_worst_tokens_padding(seed):
    xs, idx, ws, num_experts = random_case(seed)
    base = ref.dispatch(xs, idx, ws, num_experts)
    worst = max(d.num_recv_tokens for d in base)
    res = ref.dispatch(xs, idx, ws, num_experts, num_worst_tokens=worst + 2)
    for b, d in zip(base, res):
        assert d.recv_x.shape[0] == worst + 2 and d.num_recv_tokens_per_expert_list == []
        assert_bits_equal(d.recv_x[:b.num_recv_tokens], b.recv_x)
        np.testing.assert_array_equal(d.recv_src_idx[b.num_recv_tokens:], -1)
    if worst >= 2:
        with pytest.raises(DeepEPInvalid, match="num_worst_tokens"):
            ref.dispatch(xs, idx, ws, num_experts, num_worst_tokens=worst - 1)


# ------------------------------------------------------------------------------------------
# FP8
# ------------------------------------------------------------------------------------------

def e4m3_half_ulp(v):
    """Half the spacing of e4m3 numbers around |v| (subnormal spacing 2**-9)."""
    a = np.abs(v.astype(np.float64))
    e = np.floor(np.log2(np.maximum(a, 2.0 ** -6)))
    return 2.0 ** (e - 3) / 2


def fp8_oracle(x, round_scale):
    """Independent float64-based formulation of the cast (division rounded once to float32)."""
    t, h = x.shape
    xb = x.astype(np.float32).reshape(t, h // 128, 128)
    amax = np.maximum(np.abs(xb).max(axis=2) if t else np.zeros((0, h // 128), np.float32),
                      np.float32(1e-4))
    if round_scale:
        v = (amax.astype(np.float64) / 448.0).astype(np.float32)
        p = np.vectorize(lambda z: math.ceil(math.log2(float(z))))(v).astype(np.int64) if v.size \
            else np.zeros(v.shape, np.int64)
        scale = (2.0 ** -p).astype(np.float32)
        scale_inv = (2.0 ** p).astype(np.float32)
    else:
        scale = (448.0 / amax.astype(np.float64)).astype(np.float32)
        scale_inv = (amax.astype(np.float64) / 448.0).astype(np.float32)
    y = (xb.astype(np.float64) * scale[..., None]).astype(np.float32)
    q = np.clip(y, -448, 448).astype(FP8).reshape(t, h)
    return q, scale_inv


fp8_inputs = st.tuples(st.integers(0, 2**31 - 1), st.integers(0, 6), st.integers(1, 4),
                       st.sampled_from([1e-6, 1e-3, 1.0, 300.0, 1e5]),
                       st.sampled_from(["bf16", "f32"]))


def make_fp8_input(seed, tokens, groups, magnitude, kind):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, groups, 128)) * magnitude
    x *= rng.choice([1.0, 1e-3, 10.0], size=(tokens, groups, 1))  # blocks of different size
    x = x.reshape(tokens, groups * 128)
    return x.astype(BF16 if kind == "bf16" else np.float32)


@PROPS
@given(fp8_inputs)
def test_fp8_cast_properties_non_round(args):
    x = make_fp8_input(*args)
    q, s = ref.per_token_cast_to_fp8(x)
    t, h = x.shape
    assert q.dtype == FP8 and q.shape == (t, h) and s.dtype == np.float32 and s.shape == (t, h // 128)
    oq, os_ = fp8_oracle(x, False)
    assert_bits_equal(q, oq)
    assert_bits_equal(s, os_)
    xb = x.astype(np.float32).reshape(t, h // 128, 128)
    qb = q.astype(np.float32).reshape(t, h // 128, 128)
    amax = np.abs(xb).max(axis=2) if t else np.zeros((0, h // 128), np.float32)
    for i in range(t):
        for g in range(h // 128):
            j = int(np.argmax(np.abs(xb[i, g])))
            if amax[i, g] >= 1e-4:  # the amax element maps to +-448 exactly
                assert qb[i, g, j] == np.sign(xb[i, g, j]) * 448
    assert np.abs(qb).max(initial=0) <= 448
    # dequantization error: at most half an e4m3 ulp of the scaled value (+ float32 rounding)
    deq = ref.fp8_to_float(q, s).reshape(t, h // 128, 128).astype(np.float64)
    scale32 = np.float32(448) / np.maximum(amax, np.float32(1e-4))
    scaled = xb * scale32[..., None]  # float32, the value that is rounded to e4m3
    bound = e4m3_half_ulp(scaled) * s.astype(np.float64)[..., None] * (1 + 1e-5) \
        + np.abs(xb) * 1e-6
    assert (np.abs(deq - xb) <= bound).all()
    assert (np.abs(deq - xb) <= np.maximum(amax, 1e-4)[..., None] / 16 * (1 + 1e-5)).all()


@PROPS
@given(fp8_inputs)
def test_fp8_cast_properties_round_scale_and_ue8m0(args):
    x = make_fp8_input(*args)
    q, s = ref.per_token_cast_to_fp8(x, round_scale=True)
    t, h = x.shape
    oq, os_ = fp8_oracle(x, True)
    assert_bits_equal(q, oq)
    assert_bits_equal(s, os_)
    mant, _ = np.frexp(s)
    assert (mant == 0.5).all()  # powers of two
    xb = x.astype(np.float32).reshape(t, h // 128, 128)
    amax = np.maximum(np.abs(xb).max(axis=2) if t else np.zeros((0, h // 128), np.float32), 1e-4)
    assert (s.astype(np.float64) * 448 >= amax.astype(np.float64) * (1 - 2 ** -23)).all()
    assert (s.astype(np.float64) * 224 < amax.astype(np.float64)).all()  # smallest such power
    deq = ref.fp8_to_float(q, s).reshape(t, h // 128, 128).astype(np.float64)
    scaled = xb.astype(np.float64) / s.astype(np.float64)[..., None]
    bound = e4m3_half_ulp(scaled) * s.astype(np.float64)[..., None]
    assert (np.abs(deq - xb) <= bound).all()
    # packed UE8M0: same data, scales decode back to the same powers of two
    q8, packed = ref.per_token_cast_to_fp8(x, round_scale=True, use_ue8m0=True)
    groups = h // 128
    assert packed.dtype == np.int32 and packed.shape == (t, (groups + 3) // 4)
    assert_bits_equal(q8, q)
    assert_bits_equal(ref.unpack_ue8m0(packed, groups), s)
    raw = packed.view(np.uint32)
    for i in range(t):
        for g in range(4 * packed.shape[1]):
            byte = (int(raw[i, g // 4]) >> (8 * (g % 4))) & 0xFF
            if g < groups:
                assert byte == int(np.frexp(s[i, g])[1]) - 1 + 127
            else:
                assert byte == 0
    assert_bits_equal(ref.fp8_to_float(q8, packed, use_ue8m0=True), ref.fp8_to_float(q, s))


def test_fp8_cast_exact_values():
    x = np.zeros((3, 256), np.float32)
    x[0, 0], x[0, 5] = 448.0, -224.0      # scale 1: exact
    x[0, 128] = 1.0                         # scale 1/448
    x[1, 0], x[1, 1] = 449.0, 102.0         # round: 2**1
    x[1, 128:] = 0.0                        # clamped amax 1e-4
    x[2, 0] = -3e-5
    q, s = ref.per_token_cast_to_fp8(x)
    assert s[0, 0] == 1.0 and q[0, 0].astype(np.float32) == 448 and q[0, 5].astype(np.float32) == -224
    assert s[0, 1] == np.float32(1.0) / np.float32(448) and q[0, 128].astype(np.float32) == 448
    assert s[1, 1] == np.float32(1e-4) / np.float32(448)
    q, s = ref.per_token_cast_to_fp8(x, round_scale=True)
    assert s[0, 0] == 1.0 and s[1, 0] == 2.0
    assert q[1, 0].astype(np.float32) == 224 and q[1, 1].astype(np.float32) == 52  # 51 -> 52
    assert s[1, 1] == 2.0 ** -22 and s[0, 1] == 2.0 ** -8
    q, packed = ref.per_token_cast_to_fp8(x, round_scale=True, use_ue8m0=True)
    assert packed.shape == (3, 1)
    assert int(packed.view(np.uint32)[1, 0]) == 128 | ((127 - 22) << 8)
    empty_q, empty_s = ref.per_token_cast_to_fp8(np.zeros((0, 128), BF16))
    assert empty_q.shape == (0, 128) and empty_s.shape == (0, 1)


def test_fp8_cast_errors():
    with pytest.raises(DeepEPInvalid, match="128"):
        ref.per_token_cast_to_fp8(np.zeros((2, 100), np.float32))
    with pytest.raises(DeepEPInvalid, match="round_scale"):
        ref.per_token_cast_to_fp8(np.zeros((2, 128), np.float32), use_ue8m0=True)
    with pytest.raises(DeepEPTypeError, match="x"):
        ref.per_token_cast_to_fp8(np.zeros((2, 128), np.float64))


# ------------------------------------------------------------------------------------------
# low latency
# ------------------------------------------------------------------------------------------

def test_low_latency_hand_case_layout_and_combine():
    m = 4
    res = ref.low_latency_dispatch(XS, IDX, m, E, use_fp8=False)
    r0, r1, r2 = res
    for d in res:
        assert d.recv_x.shape == (2, R * m, H) and d.recv_x.dtype == BF16
        assert d.recv_x_scales is None and d.recv_count.dtype == np.int32
    np.testing.assert_array_equal(r0.recv_count, [2, 2])
    np.testing.assert_array_equal(r0.recv_src_info[:, :3], [[0, 1, -1], [0, 1, -1]])
    np.testing.assert_array_equal(r0.recv_src_k[:, :3], [[0, 1, -1], [1, 0, -1]])
    np.testing.assert_array_equal(r0.layout_begin, [[0, 1, 1], [0, 0, 0]])
    np.testing.assert_array_equal(r0.layout_count, [[1, 0, 1], [0, 0, 2]])
    assert r0.layout_range[0, 2] == (1 << 32) | 1
    assert_bits_equal(r0.recv_x[0, 0], XS[0][0])
    assert_bits_equal(r0.recv_x[0, 1], XS[2][1])
    assert_bits_equal(r0.recv_x[1, 0], XS[2][0])
    assert_bits_equal(r0.recv_x[1, 1], XS[2][1])
    assert (r0.recv_x[:, 2:].astype(np.float32) == 0).all()
    np.testing.assert_array_equal(r1.recv_count, [2, 1])
    np.testing.assert_array_equal(r1.recv_src_info[:, :2], [[2, 2], [0, -1]])
    np.testing.assert_array_equal(r1.recv_src_k[:, :2], [[0, 1], [1, -1]])
    np.testing.assert_array_equal(r2.recv_count, [1, 2])
    np.testing.assert_array_equal(r2.recv_src_info[:, :2], [[0, -1], [1, 2]])
    np.testing.assert_array_equal(r2.layout_begin[1], [0, 1, 1])
    np.testing.assert_array_equal(r2.layout_count[1], [1, 0, 1])
    for d in res:
        assert (d.recv_src_info[:, :].min() >= -1)
        for l in range(2):
            assert (d.recv_src_info[l, d.recv_count[l]:] == -1).all()

    # ys[r][l, slot, :] = 100 r + 10 l + slot (exact in bf16)
    ys = [np.broadcast_to((100 * r + 10 * np.arange(2)[:, None] + np.arange(R * m)[None, :])
                          [..., None], (2, R * m, H)).astype(np.float32).astype(BF16)
          for r in range(R)]
    out = ref.low_latency_combine(ys, IDX, W, res)
    assert [o.shape for o in out] == [(4, H), (0, H), (3, H)]
    np.testing.assert_array_equal(out[0][:, 0].astype(np.float32), [27.5, 26.25, 100.5, 0])
    np.testing.assert_array_equal(out[2][:, 0].astype(np.float32), [304, 3.5, 13.1875])
    assert out[0].dtype == BF16


def test_low_latency_fp8_hand_case():
    rng = np.random.default_rng(11)
    xs = [rng.standard_normal((i.shape[0], 256)).astype(BF16) for i in IDX]
    for round_scale, ue8m0 in [(False, False), (True, False), (True, True)]:
        res = ref.low_latency_dispatch(xs, IDX, 4, E, use_fp8=True, round_scale=round_scale,
                                       use_ue8m0=ue8m0)
        casts = [ref.per_token_cast_to_fp8(x, round_scale, ue8m0) for x in xs]
        for r, d in enumerate(res):
            assert d.recv_x.dtype == FP8
            cols = 1 if ue8m0 else 2
            assert d.recv_x_scales.shape == (2, 12, cols)
            assert d.recv_x_scales.dtype == (np.int32 if ue8m0 else np.float32)
            for l in range(2):
                src = np.full(d.recv_count[l], -1)
                for s in range(R):
                    b, n = d.layout_begin[l, s], d.layout_count[l, s]
                    src[b:b + n] = s
                assert (src >= 0).all()
                for slot, s in enumerate(src):
                    t = d.recv_src_info[l, slot]
                    assert_bits_equal(d.recv_x[l, slot], casts[s][0][t])
                    assert_bits_equal(d.recv_x_scales[l, slot], casts[s][1][t])
                assert (d.recv_x_scales[l, d.recv_count[l]:] == 0).all()


@PROPS
@given(st.integers(0, 2**31 - 1))
def test_random_low_latency_roundtrip(seed):
    xs, idx, ws, num_experts = random_case(seed)
    num_ranks = len(xs)
    per = num_experts // num_ranks
    m = 10  # >= 8 tokens + 1 duplicate entry
    res = ref.low_latency_dispatch(xs, idx, m, num_experts, use_fp8=False)
    for r, d in enumerate(res):
        for l in range(per):
            e = r * per + l
            expect = [(s, t, k) for s in range(num_ranks) for t in range(xs[s].shape[0])
                      for k in range(idx[s].shape[1]) if idx[s][t, k] == e]
            n = len(expect)
            assert d.recv_count[l] == n
            assert d.recv_src_info[l, :n].tolist() == [t for _, t, _ in expect]
            assert d.recv_src_k[l, :n].tolist() == [k for _, _, k in expect]
            assert (d.recv_src_info[l, n:] == -1).all()
            for slot, (s, t, _) in enumerate(expect):
                assert_bits_equal(d.recv_x[l, slot], xs[s][t])
                assert d.layout_begin[l, s] <= slot < d.layout_begin[l, s] + d.layout_count[l, s]
            assert d.layout_count[l].sum() == n
    ones = [np.ones(i.shape, np.float32) for i in idx]
    out = ref.low_latency_combine([d.recv_x for d in res], idx, ones, res)
    for s in range(num_ranks):
        nvalid = (idx[s] >= 0).sum(axis=1).astype(np.float32)
        expect = xs[s].astype(np.float32) * nvalid[:, None] + np.float32(0)
        assert_bits_equal(out[s], expect.astype(BF16))
    # weighted: explicit float32 loop over k
    out = ref.low_latency_combine([d.recv_x for d in res], idx, ws, res)
    for s in range(num_ranks):
        acc = np.zeros((xs[s].shape[0], xs[s].shape[1]), np.float32)
        for k in range(idx[s].shape[1]):
            valid = idx[s][:, k] >= 0
            acc[valid] = acc[valid] + ws[s][valid, k][:, None] * xs[s][valid].astype(np.float32)
        assert_bits_equal(out[s], acc.astype(BF16))


# ------------------------------------------------------------------------------------------
# bad inputs
# ------------------------------------------------------------------------------------------

def test_bad_inputs_raise_naming_the_argument():
    with pytest.raises(DeepEPInvalid, match="num_experts"):
        ref.get_dispatch_layout(IDX[0], 7, 3)
    with pytest.raises(DeepEPInvalid, match="num_experts"):
        ref.dispatch(XS, IDX, W, 7)
    bad = [i.copy() for i in IDX]
    bad[0][0, 0] = 6
    with pytest.raises(DeepEPInvalid, match=r"topk_idx\[0\].*num_experts"):
        ref.dispatch(XS, bad, W, E)
    with pytest.raises(DeepEPInvalid, match="topk_idx"):
        ref.get_dispatch_layout(bad[0], E, R)
    bad[0][0, 0] = -2
    with pytest.raises(DeepEPInvalid, match=r"topk_idx\[0\]"):
        ref.dispatch(XS, bad, W, E)
    with pytest.raises(DeepEPInvalid, match="topk_idx"):
        ref.low_latency_dispatch(XS, bad, 4, E, use_fp8=False)
    with pytest.raises(DeepEPInvalid, match="topk_idx"):
        ref.dispatch(XS, IDX[:2], W, E)
    with pytest.raises(DeepEPInvalid, match=r"topk_idx\[2\]"):
        ref.dispatch(XS, IDX[:2] + [IDX[2][:2]], W, E)
    with pytest.raises(DeepEPInvalid, match=r"topk_weights\[0\]"):
        ref.dispatch(XS, IDX, [W[0][:1]] + W[1:], E)
    with pytest.raises(DeepEPTypeError, match=r"topk_weights\[0\]"):
        ref.dispatch(XS, IDX, [W[0].astype(np.float64)] + W[1:], E)
    with pytest.raises(DeepEPInvalid, match=r"xs\[1\]"):
        ref.dispatch([XS[0], np.zeros((0, 5), BF16), XS[2]], IDX, W, E)
    with pytest.raises(DeepEPTypeError, match=r"xs\[1\]"):
        ref.dispatch([XS[0], np.zeros((0, H), np.float32), XS[2]], IDX, W, E)
    with pytest.raises(DeepEPTypeError, match="topk_idx"):
        ref.dispatch(XS, [i.astype(np.float32) for i in IDX], W, E)
    with pytest.raises(DeepEPInvalid, match="expert_alignment"):
        ref.dispatch(XS, IDX, W, E, expert_alignment=0)
    with pytest.raises(DeepEPInvalid, match="num_worst_tokens"):
        ref.dispatch(XS, IDX, W, E, num_worst_tokens=-1)
    with pytest.raises(DeepEPTypeError, match="x_scales"):
        ref.dispatch(XS, IDX, W, E, x_scales=[np.zeros((x.shape[0], 1), np.float32) for x in XS])
    fp8 = [np.zeros((x.shape[0], 128), FP8) for x in XS]
    with pytest.raises(DeepEPInvalid, match=r"x_scales\[0\]"):
        ref.dispatch(fp8, IDX, W, E, x_scales=[np.zeros((1, 1), np.float32)] * 3)
    # combine
    res = ref.dispatch(XS, IDX, W, E)
    ys = [d.recv_x for d in res]
    with pytest.raises(DeepEPInvalid, match=r"ys\[1\]"):
        ref.combine([ys[0], ys[1][:1], ys[2]], res)
    with pytest.raises(DeepEPInvalid, match="ys"):
        ref.combine(ys[:2], res)
    with pytest.raises(DeepEPInvalid, match="bias"):
        ref.combine(ys, res, bias=[np.zeros((1, H), np.float32)] * 3)
    with pytest.raises(DeepEPInvalid, match=r"topk_weights\[0\]"):
        ref.combine(ys, res, topk_weights=[np.zeros((9, 2), np.float32)] * 3)
    # low latency
    with pytest.raises(DeepEPInvalid, match="num_max_dispatch_tokens_per_rank"):
        ref.low_latency_dispatch(XS, IDX, 3, E, use_fp8=False)
    with pytest.raises(DeepEPInvalid, match="128"):
        ref.low_latency_dispatch(XS, IDX, 4, E, use_fp8=True)
    with pytest.raises(DeepEPInvalid, match="num_experts"):
        ref.low_latency_dispatch(XS, IDX, 4, 5, use_fp8=False)
    with pytest.raises(DeepEPTypeError, match="bfloat16"):
        ref.low_latency_dispatch([x.astype(np.float32) for x in XS], IDX, 4, E, use_fp8=False)
    with pytest.raises(DeepEPInvalid, match="round_scale"):
        ref.low_latency_dispatch([np.zeros((x.shape[0], 128), BF16) for x in XS], IDX, 4, E,
                                 use_fp8=True, use_ue8m0=True)
    dup = [np.array([[2, 2]] * 2, np.int64), np.zeros((0, 2), np.int64), np.zeros((0, 2), np.int64)]
    xs2 = [np.zeros((i.shape[0], H), BF16) for i in dup]
    with pytest.raises(DeepEPInvalid, match=r"topk_idx\[0\].*num_max_dispatch_tokens_per_rank"):
        ref.low_latency_dispatch(xs2, dup, 3, E, use_fp8=False)  # 4 entries for expert 2 > 3
    ll = ref.low_latency_dispatch(XS, IDX, 4, E, use_fp8=False)
    with pytest.raises(DeepEPInvalid, match=r"ys\[0\]"):
        ref.low_latency_combine([np.zeros((2, 5, H), BF16)] + [d.recv_x for d in ll[1:]], IDX, W, ll)
    with pytest.raises(DeepEPInvalid, match=r"topk_weights\[2\]"):
        ref.low_latency_combine([d.recv_x for d in ll], IDX, W[:2] + [W[2][:1]], ll)
