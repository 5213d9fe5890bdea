"""The registry of JIT instances: every kernel the package can build, for the CPU compile tests
and for warming the cache (scripts/warm_cache.py)."""

from __future__ import annotations

from typing import List

from . import jit
from .checks import CHECKS_SPEC
from .internode import internode_spec
from .intranode import intranode_spec
from .layout import LayoutKernel
from .low_latency import low_latency_spec
from .selftest import SELFTEST_SPEC

__all__ = ["all_specs"]


def all_specs(rank_counts=(2, 4, 8), ranks_per_node=8) -> List[jit.KernelSpec]:
    """One spec per kernel source and configuration that a run on up to 8 GPUs per node needs."""
    specs = [SELFTEST_SPEC, CHECKS_SPEC]
    for r in rank_counts:
        specs.append(LayoutKernel.spec_for(r, min(r, ranks_per_node)))
    specs.append(LayoutKernel.spec_for(16, ranks_per_node))      # two nodes of eight
    specs.append(LayoutKernel.spec_for(128, ranks_per_node))     # the generic (> 64 ranks) path
    specs += [intranode_spec(r) for r in rank_counts]
    specs += [intranode_spec(n, puts=True) for n in (2, 4)]       # the internode path's RDMA stage
    specs.append(internode_spec())
    specs += [low_latency_spec(r) for r in rank_counts]
    return specs
