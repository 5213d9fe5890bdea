"""EventOverlap: the handle of work queued on the buffer's communication stream (DeepEP's name)."""

from __future__ import annotations

from typing import Any, Optional

__all__ = ["EventOverlap"]


class EventOverlap:
    """A CUDA event recorded on the communication stream, plus the arrays that must stay alive until
    the work behind it has finished.

    ``event.current_stream_wait()`` makes the caller's current stream wait for it. Used as a context
    manager (``with event: ...``) the body runs first, overlapping the communication, and the current
    stream waits on exit. With the reference backend (CPU) everything is already done, and both are
    no-ops.

    Arguments:
        event: a ``cupy.cuda.Event`` or None (nothing to wait for).
        extra_arrays: arrays kept alive with the event (inputs still read by the queued kernels).
    """

    def __init__(self, event=None, extra_arrays: Optional[tuple] = None):
        self.event = event
        self.extra_arrays = extra_arrays

    def current_stream_wait(self) -> None:
        """Make the current CuPy stream wait for the event (no host blocking)."""
        if self.event is not None:
            import cupy
            cupy.cuda.get_current_stream().wait_event(self.event)

    def synchronize(self) -> None:
        """Block the host until the event has completed."""
        if self.event is not None:
            self.event.synchronize()

    @property
    def done(self) -> bool:
        """True once the work behind the event has finished."""
        return self.event is None or bool(self.event.done)

    def __enter__(self) -> "EventOverlap":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.current_stream_wait()

    def __repr__(self) -> str:
        return f"EventOverlap(done={self.done})"
