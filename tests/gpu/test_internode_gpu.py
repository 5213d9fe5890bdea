"""GPU tier: the hierarchical (internode) dispatch and combine against the numpy reference.

One host plays several nodes: ``ranks_per_node`` = half the ranks (2 ranks: two nodes of one;
4 ranks: two nodes of two), or DEEPEP_TEST_RANKS_PER_NODE. The RDMA stage then really runs through
NVSHMEM puts and the NVLink stage through NVLink stores.

Dispatch must be bit-exact against the reference (same order: source rank, then token). Combine
rounds each token's sum once per node and once at the end (as DeepEP's internode combine does), so
its oracle is the reference combine taken node by node, then summed over nodes in float32 after the
biases: bit-exact too.
"""

import os

import numpy as np
import pytest

from dispatch_cases import (BF16, async_problems, graph_replay_problems, make_inputs, rank_mask_problems, run_case,
                            stress_mismatches, to_gpu)
from testutil import assert_all_ranks, gpu_skip_reason, world

pytestmark = pytest.mark.skipif(gpu_skip_reason() is not None, reason=str(gpu_skip_reason()))

MAX_TOKENS, MAX_HIDDEN, MAX_TOPK = 1024, 7168, 9


def ranks_per_node(num_ranks):
    """The simulated node size of this run (None: this rank count cannot form two nodes)."""
    if "DEEPEP_TEST_RANKS_PER_NODE" in os.environ:
        return int(os.environ["DEEPEP_TEST_RANKS_PER_NODE"])
    return num_ranks // 2 if num_ranks >= 2 and num_ranks % 2 == 0 else None


@pytest.fixture(scope="module")
def buf():
    import deepep_cupy as ep
    comm = world()
    per_node = ranks_per_node(comm.Get_size())
    if per_node is None:
        pytest.skip(f"{comm.Get_size()} rank(s) cannot be split into two nodes")
    nvl, rdma = ep.Buffer.get_internode_size_hint(MAX_TOKENS, MAX_HIDDEN, comm.Get_size(), per_node, MAX_TOPK)
    b = ep.Buffer(comm, num_nvl_bytes=nvl, num_rdma_bytes=rdma, ranks_per_node=per_node, backend="gpu")
    assert b.num_nodes >= 2
    yield b
    b.destroy()


def two_level_combine(results, ys, me, ranks_per_node, bias=None, weights=None):
    """The combine our hierarchical kernels compute, from the reference: each node's copies summed
    (float32, rank order) and rounded to bf16, then bias0 + bias1 + the node sums in node order
    (float32), rounded once more. Weights sum exactly, so the reference's are the oracle."""
    from deepep_cupy import reference
    num_ranks = len(results)
    num_nodes = num_ranks // ranks_per_node
    acc = None
    for n in range(num_nodes):
        masked = [y if r // ranks_per_node == n else np.zeros_like(y) for r, y in enumerate(ys)]
        part = reference.combine(masked, results)[me][0].astype(np.float32)
        if acc is None:
            acc = np.zeros_like(part)
            for b in (bias or ()):
                if b is not None:
                    acc = acc + b.astype(np.float32)
        acc = acc + part
    want_w = None
    if weights is not None:
        want_w = reference.combine(ys, results, topk_weights=weights)[me][1]
    return acc.astype(BF16), want_w


def oracle_for(buf):
    """``two_level_combine`` in the oracle signature of dispatch_cases."""
    def oracle(ys, results, weights, bias, me):
        return two_level_combine(results, ys, me, buf.ranks_per_node,
                                 bias=None if bias is None else bias[me], weights=weights)
    return oracle


def case(buf, seed, tokens, hidden, num_topk, num_experts, kind, fp8=False, with_weights=True, **kwargs):
    """``dispatch_cases.run_case`` with the internode combine oracle."""
    return run_case(buf, seed, tokens, hidden, num_topk, num_experts, kind, fp8, with_weights,
                    combine_oracle=oracle_for(buf), **kwargs)


CASES = [dict(tokens=t, hidden=h, kind=k) for t, h, k in [
    (0, 2048, "random"), (1, 4096, "holes"), (129, 7168, "hot"), (129, 2048, "rank0_only"),
    (1024, 7168, "random"), (1024, 5120, "holes"), (777, 2560, "all_minus_one"), (300, 6144, "hot")]]


@pytest.mark.parametrize("spec", CASES, ids=[f"T{c['tokens']}-H{c['hidden']}-{c['kind']}" for c in CASES])
def test_dispatch_combine_bf16_matches_reference(buf, spec):
    problems = []
    for j, (topk, experts) in enumerate([(8, 256), (9, 288)]):
        problems += case(buf, 11 + j + 7 * CASES.index(spec), spec["tokens"], spec["hidden"], topk, experts,
                         spec["kind"], with_bias=(j == 1), alignment=1 if j == 0 else 128, use_cached=(j == 0))
    assert_all_ranks(world(), not problems, "\n".join(problems[:6]))


@pytest.mark.parametrize("kind", ["random", "holes", "hot", "rank0_only"])
def test_dispatch_fp8_matches_reference(buf, kind):
    problems = []
    for tokens, hidden in [(129, 2048), (1024, 7168), (1, 5120)]:
        problems += case(buf, 500 + tokens + hidden, tokens, hidden, 8, 256, kind, fp8=True)
    assert_all_ranks(world(), not problems, "\n".join(problems[:6]))


def test_worst_tokens_without_weights(buf):
    problems = []
    for kind in ("random", "rank0_only"):
        problems += case(buf, 900, 700, 4096, 8, 64, kind, with_weights=False, worst=700 * buf.num_ranks + 64)
    assert_all_ranks(world(), not problems, "\n".join(problems[:6]))


def test_dispatch_without_topk_routes_by_rank_mask(buf):
    """No topk_idx: is_token_in_rank alone routes (one synthetic expert per rank inside)."""
    problems = rank_mask_problems(buf, oracle_for(buf))
    assert_all_ranks(world(), not problems, "; ".join(problems))


def test_cuda_graph_replay(buf):
    """dispatch (num_worst_tokens: no host wait) + combine captured once, replayed 50 times."""
    problems = graph_replay_problems(buf, 50, oracle_for(buf))
    assert_all_ranks(world(), not problems, "\n".join(problems))


def test_stress_300_iterations_bit_identical(buf):
    mismatches = stress_mismatches(buf, 300, every=25)
    assert_all_ranks(world(), mismatches == 0, f"{mismatches} snapshots differ from the first")


@pytest.mark.parametrize("allocate_on_comm_stream", [True, False])
def test_async_events_and_previous_event(buf, allocate_on_comm_stream):
    problems = async_problems(buf, allocate_on_comm_stream, oracle_for(buf))
    assert_all_ranks(world(), not problems, "; ".join(problems))


def test_one_buffer_serves_internode_or_low_latency(buf):
    """The RDMA region holds either the internode or the low-latency kernels: asking for the other
    raises before anything is launched."""
    import deepep_cupy as ep
    x = to_gpu(np.zeros((4, 2048), BF16))
    idx = to_gpu(np.zeros((4, 2), np.int64))
    with pytest.raises(ep.DeepEPInvalid, match="internode"):
        buf.low_latency_dispatch(x, idx, 128, 8 * buf.num_ranks)


def test_zz_missing_peer_times_out_naming_rank_and_stage(buf):
    """Rank 1 skips a dispatch (with two nodes of one it is rank 0's RDMA peer, with larger nodes
    its NVLink peer): rank 0 gives up after settings.timeout_seconds and its next call raises
    DeepEPTimeout naming rank 0, rank 1 and the stage. Runs last (its own buffer)."""
    import time
    import cupy as cp
    import deepep_cupy as ep
    comm = world()
    old = ep.settings.timeout_seconds
    ep.settings.timeout_seconds = 3.0
    nvl, rdma = ep.Buffer.get_internode_size_hint(256, 2048, comm.Get_size(), buf.ranks_per_node, 4)
    b = ep.Buffer(comm, num_nvl_bytes=nvl, num_rdma_bytes=rdma, ranks_per_node=buf.ranks_per_node, backend="gpu")
    try:
        xs, _, idxs, _ = make_inputs(99, b.num_ranks, 256, 2048, 4, 32, "random", False, False)
        idx_g = to_gpu(idxs[b.rank])
        per_expert = b.get_dispatch_layout(idx_g, 32)[2]
        b.dispatch(to_gpu(xs[b.rank]), topk_idx=idx_g, num_tokens_per_expert=per_expert,
                   num_worst_tokens=256 * b.num_ranks)    # warm-up: every rank
        cp.cuda.Device().synchronize()
        comm.Barrier()
        message, ok = "", True
        if b.rank != 1:   # rank 1 never joins this one
            t0 = time.monotonic()
            b.dispatch(to_gpu(xs[b.rank]), topk_idx=idx_g, num_tokens_per_expert=per_expert,
                       num_worst_tokens=256 * b.num_ranks)
            cp.cuda.Device().synchronize()
            waited = time.monotonic() - t0
            try:
                b.dispatch(to_gpu(xs[b.rank]), topk_idx=idx_g, num_tokens_per_expert=per_expert,
                           num_worst_tokens=256 * b.num_ranks)
            except ep.DeepEPTimeout as e:
                message = str(e)
            if b.rank == 0:
                ok = ("rank 0" in message and "rank 1" in message and "stage" in message and "dispatch" in message
                      and waited < 30)
        assert_all_ranks(comm, ok, f"expected a DeepEPTimeout naming rank 0, rank 1 and the stage; got {message!r}")
    finally:
        ep.settings.timeout_seconds = old
        cp.cuda.Device().synchronize()
        comm.Barrier()
        b.destroy()
