"""Cross-rank agreement (issue #15), single process: the record encoding, the verdict every rank
computes from all records, and how ``Buffer`` drives it (with a recording stand-in for the
channel). The collective behaviour at 2 and 3 ranks is in tests/multirank/test_agreement_multirank.py."""

import json

import pytest

import deepep_cupy as ep
from deepep_cupy import agreement
from deepep_cupy.agreement import SLOT_BYTES, decode, encode, signature_verdict, split_argument, verdict

SIG = [("x", "hidden", 7168), ("x", "dtype", "bfloat16"), ("topk_idx", "top-k", 8),
       ("topk_weights", "topk_weights", "an array")]


def records(*items):
    """Decoded records of ranks 0, 1, ...: a signature (list), an exception, or (op, sig/exc)."""
    out = []
    for it in items:
        op, body = it if isinstance(it, tuple) else ("dispatch", it)
        out.append(decode(encode(op, error=body) if isinstance(body, BaseException) else encode(op, body)))
    return out


def with_value(sig, arg, field, value):
    return [(a, f, value if (a, f) == (arg, field) else v) for a, f, v in sig]


# ------------------------------------------------------------------------------------ encoding
def test_signature_round_trip():
    rec = decode(encode("dispatch", SIG))
    assert rec == {"op": "dispatch", "sig": [list(e) for e in SIG]}


def test_record_fits_the_slot_and_zero_padding_is_ignored():
    raw = encode("dispatch", SIG)
    assert len(raw) <= SLOT_BYTES
    assert decode(raw + b"\0" * (SLOT_BYTES - len(raw)))["sig"][0] == ["x", "hidden", 7168]


def test_error_record_names_class_argument_and_message():
    rec = decode(encode("combine", error=ep.DeepEPTypeError("bias: expected dtype bfloat16 like x, got float32")))
    assert rec == {"op": "combine", "err": ["DeepEPTypeError", "bias", "expected dtype bfloat16 like x, got float32"]}


def test_long_error_message_is_shortened_to_fit():
    raw = encode("dispatch", error=ep.DeepEPInvalid("topk_idx: " + "\u00e9\"" * 5000))
    assert len(raw) <= SLOT_BYTES
    rec = decode(raw)
    assert rec["err"][1] == "topk_idx" and rec["err"][2].endswith("...")


def test_long_signature_falls_back_to_a_digest():
    long_sig = [("x", f"f{i}", "v" * 40) for i in range(40)]
    raw = encode("dispatch", long_sig)
    assert len(raw) <= SLOT_BYTES and "digest" in json.loads(raw)
    same = records(long_sig, long_sig)
    assert verdict(same, 0) is None
    other = records(long_sig, long_sig[:-1] + [("x", "f39", "w" * 40)])
    err = verdict(other, 0)
    assert isinstance(err, ep.DeepEPInvalid) and str(err).startswith("self:")


def test_unreadable_record():
    assert "bad" in decode(b"\xff\xfe not json")
    err = verdict([decode(encode("dispatch", SIG)), decode(b"garbage")], 0)
    assert isinstance(err, ep.DeepEPError) and "rank 1" in str(err)


def test_split_argument():
    assert split_argument("topk_idx: expected x") == ("topk_idx", "expected x")
    assert split_argument("bias[1]: bad") == ("bias[1]", "bad")
    assert split_argument("config.num_sms: bad") == ("config.num_sms", "bad")
    assert split_argument("rank 1: dispatch timed out") == ("", "rank 1: dispatch timed out")
    assert split_argument("no argument here") == ("", "no argument here")


# ------------------------------------------------------------------------------------- verdict
def test_equal_signatures_agree():
    assert verdict(records(SIG, SIG, SIG), 1) is None


@pytest.mark.parametrize("arg,field,value,start", [
    ("x", "hidden", 4096, "x: hidden differs across ranks in dispatch: ranks 0, 1 have 7168, rank 2 has 4096"),
    ("x", "dtype", "float32", "x: dtype differs across ranks in dispatch: ranks 0, 1 have bfloat16, rank 2 has float32"),
    ("topk_idx", "top-k", 6, "topk_idx: top-k differs"),
    ("topk_weights", "topk_weights", None, "topk_weights: differs across ranks in dispatch: ranks 0, 1 have an "
                                           "array, rank 2 has None"),
])
def test_differing_signature_names_the_argument_and_the_odd_rank(arg, field, value, start):
    recs = records(SIG, SIG, with_value(SIG, arg, field, value))
    errs = [verdict(recs, me) for me in range(3)]
    assert all(type(e) is ep.DeepEPInvalid for e in errs)
    assert len({str(e) for e in errs}) == 1, "every rank raises the same message"
    assert str(errs[0]).startswith(start), str(errs[0])
    assert "(rank 2 differs from the rest" in str(errs[0])
    assert errs[0].argument == arg and errs[0].ranks == [2]


def test_first_differing_entry_is_named():
    odd = with_value(with_value(SIG, "x", "dtype", "float32"), "topk_idx", "top-k", 2)
    assert str(verdict(records(SIG, odd), 0)).startswith("x: dtype")


def test_two_ranks_tie_names_the_rank_outside_rank_0s_group():
    err = verdict(records(SIG, with_value(SIG, "x", "hidden", 1)), 0)
    assert err.ranks == [1]


def test_minority_group_is_named_even_when_it_holds_rank_0():
    odd = with_value(SIG, "x", "hidden", 1)
    err = verdict(records(odd, SIG, SIG), 1)
    assert err.ranks == [0] and "rank 0 differs" in str(err)


def test_missing_entry_counts_as_a_difference():
    err = verdict(records(SIG, SIG[:-1]), 0)
    assert str(err).startswith("topk_weights: differs") and "(absent)" in str(err)


def test_bool_and_int_values_are_told_apart():
    a = [("use_fp8", "use_fp8", True)]
    b = [("use_fp8", "use_fp8", 1)]
    assert signature_verdict([a, a]) is None
    assert signature_verdict([a, b]) is not None


def test_different_calls():
    recs = records(("dispatch", SIG), ("combine", SIG), ("dispatch", SIG))
    err = verdict(recs, 0)
    assert str(err).startswith("self: the ranks made different calls: ranks 0, 2 called dispatch, rank 1 "
                               "called combine")
    assert err.ranks == [1]


def test_a_peer_error_is_raised_everywhere_with_its_class_and_argument():
    bad = ep.DeepEPInvalid("topk_idx: expected values in [-1, 16), found 16")
    recs = records(SIG, SIG, bad)
    for me in (0, 1):
        err = verdict(recs, me)
        assert type(err) is ep.DeepEPInvalid
        assert str(err).startswith("topk_idx: invalid on rank 2 in dispatch: expected values in [-1, 16), found 16")
        assert err.argument == "topk_idx" and err.ranks == [2]
    assert verdict(recs, 2, my_error=bad) is bad, "the failing rank raises its own exception"


def test_a_peer_type_error_stays_a_type_error():
    recs = records(ep.DeepEPTypeError("topk_idx: expected dtype int64, got int32"), SIG)
    err = verdict(recs, 1)
    assert type(err) is ep.DeepEPTypeError and isinstance(err, TypeError)
    assert str(err).startswith("topk_idx: invalid on rank 0")


def test_several_failing_ranks():
    recs = records(SIG, ep.DeepEPInvalid("x: bad"), ep.DeepEPInvalid("x: worse"))
    err = verdict(recs, 0)
    assert str(err).startswith("x: invalid on rank 1 in dispatch: bad; rank 2 failed too")
    assert err.ranks == [1, 2]


def test_a_peer_runtime_error():
    recs = records(SIG, ep.DeepEPTimeout("rank 1: dispatch timed out waiting on rank 0"))
    err = verdict(recs, 0)
    assert type(err) is ep.DeepEPTimeout
    assert "rank 1 failed before dispatch: rank 1: dispatch timed out" in str(err)


def test_a_foreign_exception_on_a_peer():
    recs = records(KeyError("oops"), SIG)
    err = verdict(recs, 1)
    assert type(err) is ep.DeepEPError and "KeyError" in str(err) and "rank 0" in str(err)


def test_errors_win_over_differing_signatures_but_not_over_different_calls():
    recs = records(SIG, with_value(SIG, "x", "hidden", 1), ep.DeepEPInvalid("x: bad"))
    assert str(verdict(recs, 0)).startswith("x: invalid on rank 2")
    recs = records(("combine", SIG), ("dispatch", ep.DeepEPInvalid("x: bad")))
    assert str(verdict(recs, 0)).startswith("self: the ranks made different calls")


# ------------------------------------------------------------------------------ the channel
def test_one_rank_has_no_channel_and_buffer_skips_agreement():
    from mpi4py import MPI
    assert agreement.Agreement.create(MPI.COMM_SELF) is None
    with ep.Buffer(MPI.COMM_SELF, backend="reference") as buf:
        assert buf._agreement is None and not buf._agreeing(False)


def test_channel_over_one_rank_and_free():
    from mpi4py import MPI
    ch = agreement.Agreement(MPI.COMM_SELF)   # (create() returns None here; the class still works)
    ch.agree("dispatch", SIG, timeout=1.0)
    ch.agree("dispatch", local_error=ep.DeepEPInvalid("x: bad"), timeout=1.0)   # posts, returns
    ch.free()
    ch.free()
    with pytest.raises(ep.DeepEPInvalid, match="^self: this Buffer was destroyed"):
        ch.agree("dispatch", SIG)


# ------------------------------------------------------------------------- Buffer, driven alone
class Recorder:
    """Stands in for the agreement channel: records the calls, raises what it is told to."""

    def __init__(self, raise_on_signature=None):
        self.calls = []
        self.raise_on_signature = raise_on_signature

    def agree(self, op, signature=None, local_error=None, timeout=None):
        self.calls.append((op, None if signature is None else list(signature), local_error))
        if signature is not None and self.raise_on_signature is not None:
            raise self.raise_on_signature

    def free(self):
        pass


@pytest.fixture
def recorded(monkeypatch):
    """A one-rank reference Buffer whose calls agree through a ``Recorder``."""
    from mpi4py import MPI
    import numpy as np
    buf = ep.Buffer(MPI.COMM_SELF, backend="reference")
    rec = Recorder()
    buf._agreement = rec
    monkeypatch.setattr(ep.settings, "check_agreement", "auto", raising=False)
    idx = np.array([[0, 1], [1, -1], [-1, -1]], np.int64)
    yield buf, rec, idx
    buf._agreement = None
    buf.destroy()


def test_buffer_agrees_on_the_signature_before_the_backend(recorded):
    buf, rec, idx = recorded
    buf.get_dispatch_layout(idx, 4)
    assert rec.calls == [("get_dispatch_layout", [("num_experts", "num_experts", 4), ("topk_idx", "top-k", 2)],
                          None)]


def test_buffer_posts_a_local_error_and_raises_its_own(recorded):
    buf, rec, idx = recorded
    bad = idx.copy()
    bad[0, 0] = 9
    with pytest.raises(ep.DeepEPInvalid, match=r"^topk_idx: expected values in \[-1, 4\)") as info:
        buf.get_dispatch_layout(bad, 4)
    (op, sig, err), = rec.calls
    assert op == "get_dispatch_layout" and sig is None and err is info.value


def test_buffer_raises_the_verdict_and_nothing_runs(recorded, monkeypatch):
    buf, rec, idx = recorded
    rec.raise_on_signature = ep.DeepEPInvalid("x: hidden differs across ranks")
    ran = []
    monkeypatch.setattr(buf._backend, "get_dispatch_layout", lambda *a: ran.append(a))
    with pytest.raises(ep.DeepEPInvalid, match="^x: hidden differs"):
        buf.get_dispatch_layout(idx, 4)
    assert not ran and len(rec.calls) == 1


def test_every_collective_call_agrees_once(recorded):
    import numpy as np
    buf, rec, idx = recorded
    from deepep_cupy import reference
    x = np.ones((3, 128), reference.BF16)
    w = np.ones((3, 2), np.float32)
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, 4)
    recv_x, _, recv_w, _, handle, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w, num_tokens_per_rank=per_rank,
                                                   num_tokens_per_expert=per_expert, is_token_in_rank=in_rank)
    buf.dispatch(x, handle=handle)
    buf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank)
    buf.combine(recv_x, handle, topk_weights=recv_w)
    recv, _, ll_handle, _, _ = buf.low_latency_dispatch(x, idx, 4, 4, use_fp8=False)
    buf.low_latency_combine(recv, idx, w, ll_handle)
    buf.clean_low_latency_buffer(4, 128, 4)
    ops = [c[0] for c in rec.calls]
    assert ops == ["get_dispatch_layout", "dispatch", "dispatch", "dispatch", "combine", "low_latency_dispatch",
                   "low_latency_combine", "clean_low_latency_buffer"]
    assert all(c[1] is not None and c[2] is None for c in rec.calls)


def test_agreement_off(recorded, monkeypatch):
    buf, rec, idx = recorded
    monkeypatch.setattr(ep.settings, "check_agreement", False, raising=False)
    buf.get_dispatch_layout(idx, 4)
    assert rec.calls == []


def test_bad_setting(recorded, monkeypatch):
    buf, rec, idx = recorded
    monkeypatch.setattr(ep.settings, "check_agreement", "yes", raising=False)
    with pytest.raises(ep.DeepEPInvalid, match="^settings.check_agreement"):
        buf.get_dispatch_layout(idx, 4)


@pytest.mark.parametrize("mode,low_latency,capturing,want", [
    ("auto", False, False, False), ("auto", True, False, False), (True, True, False, True),
    (True, False, False, True), (True, False, True, False), (False, False, False, False),
])
def test_gpu_policy(recorded, monkeypatch, mode, low_latency, capturing, want):
    """On the GPU: "auto" agrees on nothing (not measured there yet), True on every call outside
    graph capture. The reference buffer takes the GPU backend's policy (and a stream that is, or is
    not, capturing)."""
    from deepep_cupy.gpu_backend import GpuBackend
    buf, rec, idx = recorded
    monkeypatch.setattr(ep.settings, "check_agreement", mode, raising=False)
    monkeypatch.setattr(buf._backend, "agrees_by_default", GpuBackend.agrees_by_default)
    monkeypatch.setattr(buf._backend, "capturing", lambda: capturing)
    assert buf._agreeing(low_latency) is want


def test_reference_policy_ignores_low_latency(recorded):
    buf, rec, idx = recorded
    assert buf._agreeing(True) and buf._agreeing(False)


def test_a_path_that_skips_the_agreement_is_a_bug(recorded, monkeypatch):
    buf, rec, idx = recorded
    monkeypatch.setattr(buf, "_agreed", lambda signature: None)
    with pytest.raises(AssertionError, match="without agreeing"):
        buf.get_dispatch_layout(idx, 4)
