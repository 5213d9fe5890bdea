"""Exception types of deepep_cupy.

Two families, as in nvshmem4py: bad input (raised before anything is launched or sent, the
buffer stays usable) and runtime failure (CUDA, NVSHMEM, a peer that never arrived).
"""

__all__ = ["DeepEPInvalid", "DeepEPTypeError", "DeepEPError", "DeepEPTimeout", "DeepEPCompileError"]


class DeepEPInvalid(ValueError):
    """A bad argument: wrong shape, value, size or configuration. Nothing was launched."""


class DeepEPTypeError(DeepEPInvalid, TypeError):
    """A bad argument type or dtype. Also a ``TypeError``, so ``except TypeError`` catches it."""


class DeepEPError(RuntimeError):
    """A runtime failure: CUDA, NVSHMEM or MPI reported an error."""


class DeepEPTimeout(DeepEPError):
    """A wait gave up: a peer never arrived (a GPU wait loop, or the reference backend's exchange).
    The message names the rank, the phase and, where known, the peer."""


class DeepEPCompileError(DeepEPError):
    """A kernel failed to compile; the message holds the compiler log with file:line."""
