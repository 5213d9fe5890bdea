"""The high-throughput dispatch tests' cases (intranode and internode): routings, including
adversarial ones, every rank's tokens built from a shared seed (so each rank can compute the
reference result of all of them), and ``run_case``, one dispatch + combine + cached dispatch
checked against the reference."""

import ml_dtypes
import numpy as np

BF16, FP8 = ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn


def routing(kind, num_tokens, num_topk, num_experts, num_ranks, rng):
    """topk_idx [T, K] of one rank: random, with -1 holes, a hot expert 0, only rank 0's experts
    (every other rank receives nothing), or no expert at all."""
    per_rank = num_experts // num_ranks
    if num_tokens == 0:
        return np.zeros((0, num_topk), np.int64)
    if kind in ("random", "holes"):
        idx = np.argsort(rng.random((num_tokens, num_experts)), axis=1)[:, :num_topk].astype(np.int64)
        if kind == "holes":
            idx[rng.random(idx.shape) < 0.3] = -1
        return idx
    if kind == "hot":
        idx = np.argsort(rng.random((num_tokens, num_experts)), axis=1)[:, :num_topk].astype(np.int64)
        idx[:, 0] = 0
        idx[:, 1:][idx[:, 1:] == 0] = num_experts - 1
        return idx
    if kind == "rank0_only":   # every other rank receives nothing
        return np.stack([rng.permutation(per_rank)[:num_topk] for _ in range(num_tokens)]).astype(np.int64)
    if kind == "all_minus_one":
        return np.full((num_tokens, num_topk), -1, np.int64)
    raise ValueError(kind)


def make_inputs(case_seed, num_ranks, tokens, hidden, num_topk, num_experts, kind, fp8, with_weights):
    """Inputs of every rank (numpy), identical on every rank."""
    xs, scales, idxs, ws = [], [], [], []
    from deepep_cupy import reference
    for r in range(num_ranks):
        rng = np.random.default_rng(case_seed * 1000 + r)
        t = tokens if r % 2 == 0 else max(0, tokens - 3 * (r % 3))   # uneven token counts
        x = (rng.standard_normal((t, hidden), dtype=np.float32) * (1 + r)).astype(BF16)
        if fp8:
            q, s = reference.per_token_cast_to_fp8(x)
            xs.append(q)
            scales.append(s)
        else:
            xs.append(x)
        idxs.append(routing(kind, t, num_topk, num_experts, num_ranks, rng))
        ws.append(rng.random((t, num_topk), dtype=np.float32) if with_weights else None)
    return xs, (scales if fp8 else None), idxs, (ws if with_weights else None)


def to_gpu(a):
    """numpy -> CuPy (FP8 as its uint8 storage)."""
    import cupy as cp
    if a is None:
        return None
    if a.dtype == FP8:
        return cp.asarray(a.view(np.uint8))
    return cp.asarray(a)


def host(a):
    """CuPy -> numpy (None stays None)."""
    import cupy as cp
    return None if a is None else cp.asnumpy(a)


def rank_order_combine(ys, results, weights, bias, me):
    """The reference combine: every token's copies summed in float32 in rank order after the biases,
    rounded once (what the intranode kernels compute)."""
    from deepep_cupy import reference
    return reference.combine(ys, results, topk_weights=weights, bias=bias)[me]


def run_case(buf, case_seed, tokens, hidden, num_topk, num_experts, kind, fp8, with_weights,
             alignment=1, worst=0, with_bias=False, use_cached=False, combine_oracle=rank_order_combine, config=None):
    """Dispatch (+ combine, + a cached dispatch) on the GPU against the reference; returns a list of
    problems. Dispatch is compared bit for bit; combine against ``combine_oracle(ys, results,
    weights, bias, me)``, bit for bit too. ``config``: the ep.Config of every call (None: the default)."""
    from deepep_cupy import reference
    R, me = buf.num_ranks, buf.rank
    xs, scales, idxs, ws = make_inputs(case_seed, R, tokens, hidden, num_topk, num_experts, kind, fp8, with_weights)
    problems = []
    tag = f"seed={case_seed} T={tokens} H={hidden} K={num_topk} E={num_experts} {kind} fp8={fp8} w={with_weights} align={alignment} worst={worst}"
    results = reference.dispatch(xs, idxs, ws, num_experts, expert_alignment=alignment,
                                 num_worst_tokens=worst, x_scales=scales)
    ref = results[me]
    x_in = (to_gpu(xs[me]), to_gpu(scales[me])) if fp8 else to_gpu(xs[me])
    idx_g, w_g = to_gpu(idxs[me]), to_gpu(ws[me]) if ws else None
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(idx_g, num_experts)
    recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
        x_in, topk_idx=idx_g, topk_weights=w_g, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma,
        is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, expert_alignment=alignment,
        num_worst_tokens=worst, config=config)
    rows = worst or ref.num_recv_tokens
    n = ref.num_recv_tokens
    got_x = host(recv_x[0] if fp8 else recv_x)
    if got_x.shape != (rows, hidden):
        return [f"{tag}: recv_x shape {got_x.shape} != {(rows, hidden)}"]
    want_x = ref.recv_x.view(np.uint8) if fp8 else ref.recv_x
    if not np.array_equal(got_x[:n].view(np.uint8), want_x[:n].view(np.uint8)):
        problems.append(f"{tag}: recv_x differs in {int((got_x[:n].view(np.uint8) != want_x[:n].view(np.uint8)).any(axis=1).sum())} rows")
    if fp8 and not np.array_equal(host(recv_x[1])[:n], ref.recv_x_scales[:n]):
        problems.append(f"{tag}: recv scales differ")
    if not np.array_equal(host(recv_idx), ref.recv_topk_idx):
        problems.append(f"{tag}: recv_topk_idx differs")
    if with_weights and not np.array_equal(host(recv_w), ref.recv_topk_weights):
        problems.append(f"{tag}: recv_topk_weights differ")
    if counts != ref.num_recv_tokens_per_expert_list:
        problems.append(f"{tag}: per-expert counts {counts[:4]}... != {ref.num_recv_tokens_per_expert_list[:4]}...")
    if not np.array_equal(host(handle.recv_src_idx)[:n], ref.recv_src_idx[:n]):
        problems.append(f"{tag}: recv_src_idx differs")
    if worst and not (host(recv_idx)[n:] == -1).all():
        problems.append(f"{tag}: padding rows of recv_topk_idx are not -1")
    if fp8:
        return problems

    # combine the received rows (as if each expert returned its input), optionally with a bias pair
    ys = [r.recv_x for r in results]
    bias = None
    if with_bias:
        bias = [(np.full((len(xs[r]), hidden), 0.5, BF16), (np.arange(len(xs[r]) * hidden, dtype=np.float32)
                 .reshape(len(xs[r]), hidden) % 7).astype(BF16)) for r in range(R)]
    ref_w = [r.recv_topk_weights for r in results] if with_weights else None
    want, want_w = combine_oracle(ys, results, ref_w, bias, me)
    b = None if bias is None else (to_gpu(bias[me][0]), to_gpu(bias[me][1]))
    got, got_w, _ = buf.combine(recv_x, handle, topk_weights=recv_w if with_weights else None, bias=b,
                                config=config)
    if not np.array_equal(host(got).view(np.uint16), want.view(np.uint16)):
        diff = np.abs(host(got).astype(np.float32) - want.astype(np.float32)).max() if want.size else 0
        problems.append(f"{tag}: combine differs (max abs {diff})")
    if with_weights and not np.array_equal(host(got_w), want_w):
        problems.append(f"{tag}: combined weights differ")

    if use_cached:   # same routing, new data, no layout work
        xs2 = [(x.astype(np.float32) * 2 - 1).astype(BF16) for x in xs]
        want2 = reference.dispatch(xs2, idxs, None, num_experts, num_worst_tokens=worst)[me]
        recv2, idx2, w2, counts2, _, _ = buf.dispatch(to_gpu(xs2[me]), handle=handle, config=config)
        if idx2 is not None or w2 is not None or counts2 is not None:
            problems.append(f"{tag}: cached dispatch returned top-k outputs")
        if not np.array_equal(host(recv2)[:n].view(np.uint16), want2.recv_x[:n].view(np.uint16)):
            problems.append(f"{tag}: cached dispatch differs")
    return problems


def rank_mask_problems(buf, combine_oracle=rank_order_combine):
    """Dispatch routed by ``is_token_in_rank`` alone (no ``topk_idx``) and its combine, against the
    reference; returns a list of problems."""
    from deepep_cupy import reference
    R, me, T, H, E, K = buf.num_ranks, buf.rank, 333, 4096, 64, 6
    xs, _, idxs, _ = make_inputs(123, R, T, H, K, E, "holes", False, False)
    idx_g = to_gpu(idxs[me])
    per_rank, _, _, in_rank, _ = buf.get_dispatch_layout(idx_g, E)
    recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(to_gpu(xs[me]), num_tokens_per_rank=per_rank,
                                                                is_token_in_rank=in_rank)
    res = reference.dispatch(xs, idxs, None, E)
    problems = []
    if recv_idx is not None or recv_w is not None or counts != []:
        problems.append("top-k outputs returned without topk_idx")
    if not np.array_equal(host(recv_x).view(np.uint16), res[me].recv_x.view(np.uint16)):
        problems.append("dispatch differs")
    got, _, _ = buf.combine(recv_x, handle)
    want, _ = combine_oracle([r.recv_x for r in res], res, None, None, me)
    if not np.array_equal(host(got).view(np.uint16), want.view(np.uint16)):
        problems.append("combine differs")
    return problems


def graph_replay_problems(buf, replays, combine_oracle=rank_order_combine):
    """dispatch (num_worst_tokens: no host wait) + combine captured once in a CUDA graph, replayed
    ``replays`` times on new data, each checked against the reference; returns a list of problems."""
    import cupy as cp
    from mpi4py import MPI
    from deepep_cupy import reference
    R, me, T, H, E, K = buf.num_ranks, buf.rank, 512, 2048, 64, 6
    idxs = [routing("holes", T, K, E, R, np.random.default_rng(r)) for r in range(R)]
    idx_g = to_gpu(idxs[me])
    worst = R * T
    x_g = cp.zeros((T, H), dtype=cp.dtype(BF16))
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(idx_g, E)
    kwargs = dict(topk_idx=idx_g, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma,
                  is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, num_worst_tokens=worst)
    buf.dispatch(x_g, **kwargs)   # JIT and first-use work outside the capture
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        recv_x, _, _, _, handle, _ = buf.dispatch(x_g, **kwargs)
        combined, _, _ = buf.combine(recv_x, handle)
        graph = stream.end_capture()
    problems = []
    for it in range(replays):
        xs = [np.random.default_rng(1000 * it + r).standard_normal((T, H), dtype=np.float32).astype(BF16)
              for r in range(R)]
        with stream:
            x_g[...] = to_gpu(xs[me])
        MPI.COMM_WORLD.Barrier()
        graph.launch(stream)
        stream.synchronize()
        res = reference.dispatch(xs, idxs, None, E, num_worst_tokens=worst)
        n = res[me].num_recv_tokens
        if not np.array_equal(host(recv_x)[:n].view(np.uint16), res[me].recv_x[:n].view(np.uint16)):
            problems.append(f"replay {it}: dispatch differs")
        want, _ = combine_oracle([r.recv_x for r in res], res, None, None, me)
        if not np.array_equal(host(combined).view(np.uint16), want.view(np.uint16)):
            problems.append(f"replay {it}: combine differs")
        if problems:
            break
    return problems


def stress_mismatches(buf, iterations, every=50):
    """``iterations`` dispatch + combine rounds on the same inputs; returns how many snapshots (one
    every ``every`` rounds, and the last) differ in any bit from the first."""
    import cupy as cp
    R, me, T, H, E, K = buf.num_ranks, buf.rank, 256, 4096, 64, 8
    idx = to_gpu(routing("holes", T, K, E, R, np.random.default_rng(me)))
    x = cp.asarray(np.random.default_rng(7 + me).standard_normal((T, H), dtype=np.float32).astype(BF16))
    first, mismatches = None, 0
    for it in range(iterations):
        recv_x, _, _, _, handle, _ = buf.dispatch(x, topk_idx=idx,
                                                  num_tokens_per_expert=buf.get_dispatch_layout(idx, E)[2])
        out, _, _ = buf.combine(recv_x, handle)
        if it % every == 0 or it == iterations - 1:
            snap = (host(recv_x).view(np.uint16).copy(), host(out).view(np.uint16).copy())
            if first is None:
                first = snap
            elif not (np.array_equal(first[0], snap[0]) and np.array_equal(first[1], snap[1])):
                mismatches += 1
    return mismatches


def async_problems(buf, allocate_on_comm_stream, combine_oracle=rank_order_combine):
    """dispatch and combine with ``async_finish`` (the caller's stream does not wait; the events do)
    after a ``previous_event``, against the reference; returns a list of problems. Between the calls
    the caller's stream allocates and frees scratch, which must not land on memory the
    communication stream still uses."""
    import cupy as cp
    from deepep_cupy import EventOverlap, reference
    R, me, T, H, E, K = buf.num_ranks, buf.rank, 300, 2048, 32, 4
    xs, _, idxs, ws = make_inputs(77, R, T, H, K, E, "random", False, True)
    idx_g = to_gpu(idxs[me])
    prev = EventOverlap(cp.cuda.get_current_stream().record())
    recv_x, recv_idx, recv_w, counts, handle, event = buf.dispatch(
        to_gpu(xs[me]), topk_idx=idx_g, topk_weights=to_gpu(ws[me]),
        num_tokens_per_expert=buf.get_dispatch_layout(idx_g, E)[2], previous_event=prev,
        async_finish=True, allocate_on_comm_stream=allocate_on_comm_stream)
    problems = []
    # the event holds the handle's arrays too: a caller that drops the handle before the event
    # completes must not hand send_pos & co. back to the memory pool while kernels read them
    kept = lambda ev: {id(a) for a in (ev.extra_arrays or ())}   # noqa: E731
    if not {id(a) for a in handle.device_arrays()} <= kept(event):
        problems.append("the async dispatch's event does not keep the handle's arrays alive")
    for _ in range(4):   # caller-stream work racing the communication
        cp.full((T * 4, H), 7, dtype=cp.float32).sum()
    event.current_stream_wait()
    res = reference.dispatch(xs, idxs, ws, E)
    if not np.array_equal(host(recv_x).view(np.uint16), res[me].recv_x.view(np.uint16)):
        problems.append("async dispatch differs")
    out, out_w, event = buf.combine(recv_x, handle, topk_weights=recv_w, async_finish=True)
    if not {id(a) for a in handle.device_arrays()} <= kept(event):
        problems.append("the async combine's event does not keep the handle's arrays alive")
    for _ in range(4):
        cp.full((T * 4, H), 7, dtype=cp.float32).sum()
    with event:
        pass
    want, want_w = combine_oracle([r.recv_x for r in res], res, [r.recv_topk_weights for r in res], None, me)
    if not (np.array_equal(host(out).view(np.uint16), want.view(np.uint16)) and np.array_equal(host(out_w), want_w)):
        problems.append("async combine differs")
    return problems
