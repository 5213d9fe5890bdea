"""deepep_cupy: expert-parallel dispatch and combine for CuPy, JAX and PyTorch users.

The public surface is DeepEP's: ``Buffer``, ``Config``, ``EventOverlap``; plus ``settings``
(process-wide knobs), ``JitOptions`` (how kernels compile), the exception types and the numpy
reference model (``deepep_cupy.reference``). See docs/architecture.md.
"""

from .buffer import Buffer
from .config import Config, Settings, settings
from .errors import DeepEPCompileError, DeepEPError, DeepEPInvalid, DeepEPTimeout, DeepEPTypeError
from .event import EventOverlap
from .jit import JitOptions

__all__ = ["Buffer", "Config", "EventOverlap", "JitOptions", "Settings", "settings",
           "DeepEPInvalid", "DeepEPTypeError", "DeepEPError", "DeepEPTimeout", "DeepEPCompileError",
           "__version__"]

__version__ = "0.1.0"
