"""Stream discipline of the GPU backend (DeepEP's): communication runs on the buffer's own stream.

``CommStreamScope`` orders the communication stream after the caller's work (``previous_event`` or
the current stream), optionally makes it current while outputs are allocated
(``allocate_on_comm_stream``), and at the end either returns an ``EventOverlap`` (``async_finish``)
or makes the caller's stream wait, so that ordinary code sees ordinary stream order.
"""

from __future__ import annotations

from typing import Optional

from .errors import DeepEPTypeError
from .event import EventOverlap

__all__ = ["CommStreamScope"]


class CommStreamScope:
    """One call's stream bookkeeping.

    Arguments:
        comm_stream: the buffer's ``cupy.cuda.Stream``.
        previous_event: an ``EventOverlap`` to wait for instead of the current stream, or None.
        async_finish: return an event instead of making the current stream wait.
        allocate_on_comm_stream: allocate outputs while the communication stream is current
            (needs ``previous_event``, as in DeepEP).
    """

    def __init__(self, comm_stream, previous_event: Optional[EventOverlap], async_finish: bool,
                 allocate_on_comm_stream: bool):
        import cupy

        if previous_event is not None and not isinstance(previous_event, EventOverlap):
            raise DeepEPTypeError(f"previous_event: expected an EventOverlap or None, got "
                                  f"{type(previous_event).__name__}")
        if allocate_on_comm_stream and previous_event is None:
            raise DeepEPTypeError("allocate_on_comm_stream: needs previous_event (the caller's work "
                                  "must be captured in an event first)")
        self.comm_stream = comm_stream
        self.compute_stream = cupy.cuda.get_current_stream()
        self.previous_event = previous_event
        self.async_finish = async_finish
        self.allocate_on_comm_stream = allocate_on_comm_stream

    def __enter__(self) -> "CommStreamScope":
        if self.previous_event is not None and self.previous_event.event is not None:
            self.comm_stream.wait_event(self.previous_event.event)
        else:
            self.comm_stream.wait_event(self.compute_stream.record())
        if self.allocate_on_comm_stream:
            self.comm_stream.use()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.allocate_on_comm_stream:
            self.compute_stream.use()

    def finish(self, keep_alive: tuple = ()) -> EventOverlap:
        """Record the end of the communication work; returns the event (async) or waits for it."""
        event = self.comm_stream.record()
        if self.async_finish:
            return EventOverlap(event, tuple(keep_alive))
        self.compute_stream.wait_event(event)
        return EventOverlap(None)
