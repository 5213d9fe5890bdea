"""Cross-rank agreement: every rank learns, before a collective call launches or sends anything,
that every other rank makes the same call with the same shapes, dtypes and options, and that no
rank's own argument checks failed (issue #15).

Without it a rank whose checks fail raises alone while its peers wait in the collective until the
timeout, and ranks that disagree on a shape (a different ``num_experts``, ``hidden`` or top-k, bf16
against float32) get a wrong result or a raw numpy error naming no argument.

Each collective ``Buffer`` call contributes one small record:

* its *signature*: an ordered list of ``(argument, field, value)`` entries that must be equal on
  every rank for this operation (hidden size, dtype, top-k, flags; never per-rank values such as
  token counts), or
* its *local error*: the exception the rank's own checks raised (class, argument, message).

The records travel once from every rank to every other (``Agreement.agree``): one fixed-size
message (``HEADER_BYTES + SLOT_BYTES``) per peer, non-blocking, on a private duplicate of the
communicator, tagged with the call's sequence number, polled until ``settings.timeout_seconds``.
The header (the channel's id and the sequence number) tells a record of this call from a message
left behind on a freed communicator whose context MPI gave to ours (``mpienv.private_comm``): such
a message is dropped and the receive posted again. Then every rank computes
the same verdict (``verdict``):

* a rank reported an error: that rank raises its own exception at once (it does not wait for its
  peers: its message is on the way), every other rank raises the same class with
  ``"<argument>: invalid on rank r in <call>: <message> ..."``;
* the ranks made different calls: ``DeepEPInvalid("self: ...")`` naming each rank's call;
* signatures differ: ``DeepEPInvalid`` naming the first differing entry's argument, the value of
  each rank and the ranks that differ from the rest, e.g. ``"x: hidden differs across ranks in
  dispatch: rank 0 has 7168, rank 1 has 4096 (rank 1 differs from the rest; ...)"``;
* a peer sent nothing in time: ``DeepEPTimeout`` naming it (it died or did not make the call); the
  ranks are out of step after that, as after any timeout.

Errors raised by the agreement carry ``argument`` (str) and ``ranks`` (the ranks at fault) as
attributes. Point-to-point messages rather than one allgather: a timeout can then name the ranks
that never arrived, and a failing rank need not wait for the others. A world of one rank costs
nothing (``Agreement.create`` returns None).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import List, Optional, Sequence, Tuple

from .errors import DeepEPError, DeepEPInvalid, DeepEPTimeout, DeepEPTypeError
from .mpienv import CHANNEL_ID_BYTES, poll_until, private_comm

__all__ = ["Agreement", "SLOT_BYTES", "HEADER_BYTES", "encode", "decode", "verdict", "signature_verdict",
           "split_argument"]

SLOT_BYTES = 1024          # one rank's record, zero-padded
HEADER_BYTES = CHANNEL_ID_BYTES + 8   # before the record: the channel's id, the call's sequence number
_ERROR_CLASSES = {c.__name__: c for c in (DeepEPInvalid, DeepEPTypeError, DeepEPError, DeepEPTimeout)}
_ARG = re.compile(r"^([A-Za-z_][\w.]*(?:\[\d+\])?): (.*)$", re.DOTALL)

Signature = Sequence[Tuple[str, str, object]]


def split_argument(message: str) -> Tuple[str, str]:
    """``"topk_idx: expected ..."`` -> ``("topk_idx", "expected ...")``; ``("", message)`` when the
    message does not start with an argument name (the package's messages do)."""
    m = _ARG.match(message)
    return (m.group(1), m.group(2)) if m else ("", message)


def _ranks(ranks: Sequence[int]) -> str:
    """``"rank 3"`` or ``"ranks 2, 3"``."""
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r) for r in ranks)


def _fit(record: dict, key: str) -> bytes:
    """``record`` as compact JSON of at most SLOT_BYTES, shortening ``record[key][-1]`` (a message)
    as needed."""
    raw = json.dumps(record, separators=(",", ":")).encode()
    while len(raw) > SLOT_BYTES:
        text = record[key][-1]
        record[key][-1] = text[:max(0, len(text) - (len(raw) - SLOT_BYTES) - 8)] + "..."
        raw = json.dumps(record, separators=(",", ":")).encode()
    return raw


def encode(op: str, signature: Optional[Signature] = None, error: Optional[BaseException] = None) -> bytes:
    """One rank's record for operation ``op``: its signature, or (``error`` given) its local error.
    At most ``SLOT_BYTES`` bytes: an error's message is shortened to fit; a signature too long is
    replaced by its digest (then a difference is found, but not named)."""
    if error is not None:
        # the package's bad-input messages start with the argument's name
        arg, text = split_argument(str(error)) if isinstance(error, DeepEPInvalid) else ("", str(error))
        return _fit({"op": op, "err": [type(error).__name__, arg, text]}, "err")
    sig = [[str(a), str(f), v] for a, f, v in (signature or ())]
    raw = json.dumps({"op": op, "sig": sig}, separators=(",", ":"), default=str).encode()
    if len(raw) > SLOT_BYTES:
        digest = hashlib.sha256(raw).hexdigest()[:32]
        raw = json.dumps({"op": op, "digest": digest}, separators=(",", ":")).encode()
    return raw


def decode(raw: bytes) -> dict:
    """The record ``encode`` made (trailing zero bytes ignored); ``{"bad": ...}`` if unreadable."""
    text = bytes(raw).rstrip(b"\0")
    try:
        record = json.loads(text.decode())
        if isinstance(record, dict) and isinstance(record.get("op"), str):
            return record
    except (UnicodeDecodeError, ValueError):
        pass
    return {"op": "?", "bad": text[:64].decode(errors="replace")}


def _tag(exc: BaseException, argument: str, ranks: Sequence[int]) -> BaseException:
    try:
        exc.argument, exc.ranks = argument, list(ranks)
    except AttributeError:   # an exception type with slots: keep it as it is
        pass
    return exc


def _groups(values: Sequence) -> List[Tuple[object, List[int]]]:
    """Ranks grouped by value, in order of first appearance."""
    out: List[Tuple[object, List[int]]] = []
    for rank, v in enumerate(values):
        for value, ranks in out:
            if value == v and type(value) is type(v):
                ranks.append(rank)
                break
        else:
            out.append((v, [rank]))
    return out


def _odd_ones(groups) -> List[int]:
    """The ranks outside the largest group (on a tie, the group holding rank 0)."""
    best = max(range(len(groups)), key=lambda i: (len(groups[i][1]), -i))
    return sorted(r for i, (_, ranks) in enumerate(groups) if i != best for r in ranks)


_MISSING = "(absent)"


def signature_verdict(signatures: Sequence[Signature], what: str = "") -> Optional[DeepEPInvalid]:
    """The error for differing ``signatures`` (one per rank, lists of ``(argument, field, value)``),
    or None when all are equal. Names the first entry (in the order the ranks list them) whose
    value differs, every rank's value and the ranks that differ from the rest. ``what`` is added
    to the message (e.g. the operation)."""
    sigs = [[tuple(e) for e in s] for s in signatures]
    typed = [[(a, f, type(v).__name__, v) for a, f, v in s] for s in sigs]   # True is not 1
    if all(s == typed[0] for s in typed):
        return None
    keys: List[Tuple[str, str]] = []
    for s in sigs:
        for a, f, _ in s:
            if (a, f) not in keys:
                keys.append((a, f))
    for arg, field in keys:
        values = []
        for s in sigs:
            found = [v for a, f, v in s if (a, f) == (arg, field)]
            values.append(found[0] if found else _MISSING)
        groups = _groups(values)
        if len(groups) == 1:
            continue
        odd = _odd_ones(groups)
        if (arg, field) == ("self", "call"):
            return _different_calls(groups)
        shown = ", ".join(f"{_ranks(ranks)} {'has' if len(ranks) == 1 else 'have'} {v}"
                          for v, ranks in groups)
        label = f"{arg}:" if field == arg else f"{arg}: {field}"
        where = f" in {what}" if what else ""
        return _tag(DeepEPInvalid(f"{label} differs across ranks{where}: {shown} ({_ranks(odd)} "
                                  f"{'differs' if len(odd) == 1 else 'differ'} from the rest; every "
                                  "rank must pass the same)"), arg, odd)
    return None   # equal up to the order of entries


def _different_calls(groups) -> DeepEPInvalid:
    shown = ", ".join(f"{_ranks(ranks)} called {op}" for op, ranks in groups)
    return _tag(DeepEPInvalid(f"self: the ranks made different calls: {shown} (every rank must make "
                              "the same collective calls in the same order)"), "self", _odd_ones(groups))


def verdict(records: Sequence[dict], me: int, my_error: Optional[BaseException] = None
            ) -> Optional[BaseException]:
    """What rank ``me`` raises given every rank's decoded record (indexed by rank), or None when
    all agree. The same on every rank except that a rank with a local error (``my_error``) gets
    that error back."""
    if my_error is not None:
        return my_error
    bad = [r for r, rec in enumerate(records) if "bad" in rec]
    if bad:
        return _tag(DeepEPError(f"rank {me}: unreadable agreement record from {_ranks(bad)}: "
                                f"{records[bad[0]]['bad']!r}"), "self", bad)
    ops = [rec["op"] for rec in records]
    if len(set(ops)) > 1:
        return _different_calls(_groups(ops))
    op = ops[0]
    failed = [r for r, rec in enumerate(records) if "err" in rec]
    if failed:
        cls_name, arg, text = records[failed[0]]["err"]
        cls = _ERROR_CLASSES.get(cls_name, DeepEPError)
        also = f"; {_ranks(failed[1:])} failed too" if len(failed) > 1 else ""
        if cls in (DeepEPInvalid, DeepEPTypeError):
            msg = (f"{arg + ': ' if arg else ''}invalid on rank {failed[0]} in {op}: {text}{also} "
                   f"(raised on every rank; this rank's own arguments passed)")
        else:
            detail = text if cls_name in _ERROR_CLASSES else f"{cls_name}: {text}"
            msg = (f"{arg + ': ' if arg else ''}rank {failed[0]} failed before {op}: {detail}{also} "
                   f"(raised on every rank)")
        return _tag(cls(msg), arg or "self", failed)
    digests = [rec.get("digest") for rec in records]
    if any(d is not None for d in digests):
        if len(set(digests)) == 1:
            return None
        return _tag(DeepEPInvalid(f"self: the arguments of {op} differ across ranks (not named: a "
                                  "signature too long to send)"), "self", [])
    return signature_verdict([rec.get("sig", []) for rec in records], op)


class Agreement:
    """One ``Buffer``'s agreement channel: a private duplicate of its communicator and the sequence
    number of its calls. Create with ``Agreement.create(comm)`` (collective; None for one rank).

    The common case is cheap: a rank's record is the same bytes on every rank when the calls agree
    (the encoding is deterministic), so the received slots are compared as bytes and decoded only
    when they differ; encoded signatures are cached; the slots are reused unless a message may
    still arrive into them. The wait spins for ``SPIN_S``, then yields the core (ranks may
    outnumber cores), then sleeps in steps of at most 1 ms until the timeout."""

    SPIN_S = 200e-6          # busy polling before the first yield: peers are usually just behind
    YIELD_S = 5e-3           # then sched_yield until this long, then short sleeps
    _CACHE_SIZE = 256

    def __init__(self, comm):
        self.rank, self.num_ranks = comm.Get_rank(), comm.Get_size()
        # private: our messages never meet the caller's, nor the reference backend's
        self._comm, self._tag_ub, self._channel = private_comm(comm)
        self._seq = 0
        self.dropped = 0           # messages received that were not this channel's (see _receive)
        self._peers = [p for p in range(self.num_ranks) if p != self.rank]
        self._slots = self._new_slots()
        self._encoded: dict = {}   # (op, signature) -> record bytes
        # (request, buffer, is_receive) of agreements this rank left early or gave up on: the
        # peers' messages arrive into them later (kept alive, pruned at each call)
        self._stale: list = []

    def _new_slots(self):
        """(this rank's slot, one receive slot per peer): zeroed bytearrays."""
        size = HEADER_BYTES + SLOT_BYTES
        return bytearray(size), {p: bytearray(size) for p in self._peers}

    @classmethod
    def create(cls, comm) -> Optional["Agreement"]:
        """Collective over ``comm``; None when ``comm`` has one rank (nothing to agree on)."""
        return cls(comm) if comm.Get_size() > 1 else None

    def _encode(self, op: str, signature, local_error) -> bytes:
        if local_error is not None:
            return encode(op, error=local_error)
        key = (op, tuple(tuple(e) for e in (signature or ())))
        try:
            raw = self._encoded.get(key)
        except TypeError:      # an unhashable value: encode every time
            return encode(op, signature)
        if raw is None:
            if len(self._encoded) >= self._CACHE_SIZE:
                self._encoded.clear()
            raw = self._encoded[key] = encode(op, signature)
        return raw

    def agree(self, op: str, signature: Optional[Signature] = None,
              local_error: Optional[BaseException] = None, timeout: float = 100.0) -> None:
        """Collective: send this rank's record for ``op`` (its ``signature``, or its ``local_error``)
        to every other rank, take theirs, and raise the verdict (see the module docstring).

        With ``local_error`` nothing is waited for or raised here: the record is posted (the peers
        take it when they arrive) and the caller raises ``local_error`` itself.

        Raises:
            DeepEPInvalid / DeepEPTypeError / DeepEPError: a peer's error, different calls, or
                different signatures.
            DeepEPTimeout: a peer's record did not come within ``timeout`` seconds (names it).
        """
        from mpi4py import MPI

        comm = self._comm
        if comm is None:
            raise DeepEPInvalid("self: this Buffer was destroyed")
        if self._stale:
            self._prune()
        me = self.rank
        self._seq += 1
        tag = self._seq % self._tag_ub
        raw = self._encode(op, signature, local_error)
        header = self._channel + self._seq.to_bytes(8, "little")
        mine, bufs = self._slots
        mine[:] = header + raw.ljust(SLOT_BYTES, b"\0")
        try:
            recvs = {p: comm.Irecv(bufs[p], source=p, tag=tag) for p in self._peers}
            sends = [comm.Isend(mine, dest=p, tag=tag) for p in self._peers]
        except MPI.Exception as e:
            raise DeepEPTimeout(f"rank {me}: {op} agreement: MPI failed (did a peer die?): {e}") from e
        if local_error is not None:
            # the peers learn of it when they arrive; this rank raises now
            self._retire(recvs, sends)
            return
        try:
            missing = self._receive(recvs, bufs, header, tag, timeout)
        except MPI.Exception as e:
            self._retire(recvs, sends)
            raise DeepEPTimeout(f"rank {me}: {op} agreement: MPI failed (did a peer die?): {e}") from e
        if missing:
            self._retire(recvs, sends)
            raise _tag(DeepEPTimeout(f"rank {me}: {op} agreement timed out: {_ranks(missing)} sent "
                                     f"nothing within {timeout:g} s (died, or did not make the same "
                                     f"call?)"), "self", missing)
        if not MPI.Request.Testall(sends):   # small, eager: done at once, or soon
            self._retire({}, sends)
        if all(bufs[p] == mine for p in self._peers):
            return                            # the same record everywhere: agreed
        records = [None] * self.num_ranks
        records[me] = decode(raw)
        for p in self._peers:
            records[p] = decode(bytes(bufs[p][HEADER_BYTES:]))
        exc = verdict(records, me)
        if exc is not None:
            raise exc

    def _receive(self, recvs: dict, bufs: dict, header: bytes, tag: int, timeout: float) -> List[int]:
        """Poll the receives ``recvs`` (peer -> request into ``bufs[peer]``) until each holds a
        record starting with ``header``; return the peers still missing after ``timeout`` seconds
        (empty: all arrived). A message with another header (left on a freed communicator whose
        context MPI reused for ours) is dropped (counted in ``dropped``) and that receive posted
        again; ``recvs`` is updated in place."""
        comm = self._comm
        pending = list(recvs)

        def step() -> bool:
            for p in list(pending):
                if not recvs[p].Test():
                    continue
                if bufs[p][:HEADER_BYTES] == header:
                    pending.remove(p)
                else:
                    self.dropped += 1
                    recvs[p] = comm.Irecv(bufs[p], source=p, tag=tag)
            return not pending

        poll_until(step, timeout, self.SPIN_S, self.YIELD_S)
        return pending

    def _retire(self, recvs: dict, sends: list) -> None:
        """Keep requests that may still be pending alive with their buffers (a late peer's message
        arrives into them), and take fresh slots for the next call."""
        mine, bufs = self._slots
        self._stale.extend((r, bufs[p], True) for p, r in recvs.items())
        self._stale.extend((r, mine, False) for r in sends)
        self._slots = self._new_slots()

    def _prune(self) -> None:
        from mpi4py import MPI
        try:
            self._stale = [e for e in self._stale if not e[0].Test()]
        except MPI.Exception:
            pass

    def free(self) -> None:
        """Local: free the private communicator (idempotent). Receives still waiting for a peer
        (it died, or never made a call this rank left early) are cancelled first; if any request
        is still pending after that, the communicator is left to it."""
        from mpi4py import MPI

        comm, self._comm = self._comm, None
        if comm is None:
            return
        try:
            self._prune()
            for r, _, is_receive in self._stale:
                if is_receive:          # (cancelling a send is deprecated; ours are eager anyway)
                    r.Cancel()
            self._prune()
        except MPI.Exception:
            return
        if not self._stale:
            comm.Free()
