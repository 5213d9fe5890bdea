"""Messages left on a freed communicator never pass for a later channel's own (mpiexec -n 2 or 3).

A rank that makes a call its peers never make (a timeout, a lagging or dying peer) leaves its
message unreceived at the peers. When the peers then free their private communicator, MPI keeps
that message and delivers it to a later ``Dup`` that reuses the freed context, to the first receive
with the same source and tag (MPICH does, 2026-12-06). Without the channel id in each message, the
next Buffer's agreement (or reference backend exchange) with that sequence number took the old
message as the peer's: a wrong verdict on one rank only, and the ranks out of step.

Each test: rank 0 makes one call alone and times out; every rank frees the channel; a new channel
on the same ranks then runs several calls, which must all agree and (for the Buffer) be exact.
"""

import numpy as np
import pytest

MPI = pytest.importorskip("mpi4py.MPI")

import deepep_cupy as ep  # noqa: E402
from deepep_cupy import reference as ref  # noqa: E402
from deepep_cupy.agreement import Agreement  # noqa: E402
from testutil import assert_all_ranks, world  # noqa: E402

T, H, K = 10, 128, 2


@pytest.fixture(scope="module")
def comm():
    c = world()
    if c.Get_size() < 2:
        pytest.skip("needs at least 2 MPI ranks (run under mpiexec -n 2)")
    return c


def _alone_then_free(comm, make, call, destroy):
    """Rank 0 runs ``call(channel)`` alone (it must time out); every rank then destroys the channel."""
    channel = make()
    timed_out = None
    if comm.Get_rank() == 0:
        try:
            call(channel)
            timed_out = False
        except ep.DeepEPTimeout:
            timed_out = True
    comm.Barrier()
    destroy(channel)
    return timed_out


def test_agreement_drops_a_record_left_on_a_freed_communicator(comm):
    signature = [("x", "hidden", 7168)]
    timed_out = _alone_then_free(comm, lambda: Agreement.create(comm),
                                 lambda a: a.agree("combine", [("x", "hidden", 1)], timeout=0.5),
                                 lambda a: a.free())
    fresh = Agreement.create(comm)
    errors = []
    for op in ("get_dispatch_layout", "dispatch", "combine"):
        try:
            fresh.agree(op, signature, timeout=10.0)
        except ep.DeepEPError as e:
            errors.append(f"{op}: {e}")
    dropped = comm.allreduce(getattr(fresh, "dropped", 0))
    fresh.free()
    ok = not errors and timed_out in (None, True)
    assert_all_ranks(comm, ok, f"rank 0 timed out: {timed_out}; the new channel's calls raised {errors} "
                               f"({dropped} stale messages dropped in all)")


def _rank_inputs(rank, num_experts):
    rng = np.random.default_rng(40 + rank)
    idx = np.argsort(rng.random((T, num_experts)), axis=1)[:, :K].astype(np.int64)
    x = rng.standard_normal((T, H), dtype=np.float32).astype(ref.BF16)
    w = rng.random((T, K), dtype=np.float32)
    return idx, x, w


def _twice(call, *args):
    """``call(*args)`` twice; the last DeepEPTimeout is raised after both (none: returns)."""
    error = None
    for _ in range(2):
        try:
            call(*args)
        except ep.DeepEPTimeout as e:
            error = e
    if error is not None:
        raise error


def test_buffer_after_a_buffer_whose_peer_never_came(comm):
    """Rank 0's two layout calls on the first Buffer time out (the others never make them; the
    first of rank 0's records is taken by the peers' agreement of ``destroy``, the second is left
    over); both Buffers' channels (agreement and reference exchange) are freed; a second Buffer
    is exact."""
    n, me = comm.Get_size(), comm.Get_rank()
    E = 4 * n
    all_in = [_rank_inputs(r, E) for r in range(n)]
    idx, x, w = all_in[me]
    old = ep.settings.timeout_seconds
    ep.settings.timeout_seconds = 0.5
    try:
        timed_out = _alone_then_free(comm, lambda: ep.Buffer(comm, backend="reference"),
                                     lambda b: _twice(b.get_dispatch_layout, idx, E), lambda b: b.destroy())
    finally:
        ep.settings.timeout_seconds = old
    buf = ep.Buffer(comm, backend="reference")
    problems = []
    try:
        for _ in range(3):
            per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
            recv_x, _, recv_w, _, handle, _ = buf.dispatch(
                x, topk_idx=idx, topk_weights=w, num_tokens_per_rank=per_rank,
                num_tokens_per_expert=per_expert, is_token_in_rank=in_rank)
            combined, _, _ = buf.combine(recv_x, handle, topk_weights=recv_w)
        want = ref.dispatch([a[1] for a in all_in], [a[0] for a in all_in], [a[2] for a in all_in], E)
        want_c, _ = ref.combine([r.recv_x for r in want], want,
                                topk_weights=[r.recv_topk_weights for r in want])[me]
        if not np.array_equal(recv_x.view(np.uint16), want[me].recv_x.view(np.uint16)):
            problems.append("recv_x differs from the reference")
        if not np.array_equal(combined.view(np.uint16), want_c.view(np.uint16)):
            problems.append("combined_x differs from the reference")
    except ep.DeepEPError as e:
        problems.append(f"raised {type(e).__name__}: {e}")
    finally:
        buf.destroy()
    ok = not problems and timed_out in (None, True)
    assert_all_ranks(comm, ok, f"rank 0 timed out: {timed_out}; {'; '.join(problems)}")
