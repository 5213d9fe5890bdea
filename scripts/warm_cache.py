#!/usr/bin/env python3
"""Compile every kernel into the disk cache ahead of time (no GPU needed), with progress.

    python scripts/warm_cache.py [--route nvrtc|nvcc|both] [--arch sm_90]

Useful before a job starts (each rank would otherwise compile on first use) and to check that
every kernel still compiles after an edit. The cache folder is deepep_cupy.settings.cache_dir
($DEEPEP_CUPY_CACHE_DIR).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> int:
    ap = argparse.ArgumentParser(description="compile every deepep_cupy kernel into the cache")
    ap.add_argument("--route", default="both", choices=("nvrtc", "nvcc", "both"))
    ap.add_argument("--arch", default="sm_90")
    args = ap.parse_args()
    import deepep_cupy as ep
    from deepep_cupy import jit, kernels
    routes = ("nvrtc", "nvcc") if args.route == "both" else (args.route,)
    specs = kernels.all_specs()
    total = len(specs) * len(routes)
    t_all = time.perf_counter()
    for i, (spec, route) in enumerate(((s, r) for s in specs for r in routes), 1):
        t0 = time.perf_counter()
        compiled = jit.build(spec, jit.JitOptions(arch=args.arch, route=route))
        state = "cached" if compiled.from_cache else f"compiled in {time.perf_counter() - t0:.1f} s"
        print(f"[{i}/{total}] {spec.source} {dict(spec.defines)} ({route}, {args.arch}): {state}", flush=True)
    print(f"done in {time.perf_counter() - t_all:.1f} s; cache: {ep.settings.cache_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
