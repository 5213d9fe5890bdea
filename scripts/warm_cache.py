#!/usr/bin/env python3
"""Compile every kernel into the disk cache ahead of time (no GPU needed), several at once, with progress.

    python scripts/warm_cache.py [--route nvrtc|nvcc|both] [--arch sm_90] [--jobs N]

Useful before a job starts (each rank would otherwise compile on first use) and to check that
every kernel still compiles after an edit. The cache folder is deepep_cupy.settings.cache_dir
($DEEPEP_CUPY_CACHE_DIR). Kernels already in the cache are reported as "cached" and not rebuilt.
"""

import argparse
import concurrent.futures
import logging
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> int:
    ap = argparse.ArgumentParser(description="compile every deepep_cupy kernel into the cache")
    ap.add_argument("--route", default="both", choices=("nvrtc", "nvcc", "both"))
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--jobs", type=int, default=0, help="compiles at once (default: CPUs, at most 8)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)   # this script prints the progress itself
    import deepep_cupy as ep
    from deepep_cupy import jit, kernels
    routes = ("nvrtc", "nvcc") if args.route == "both" else (args.route,)
    jobs = [(spec, jit.JitOptions(arch=args.arch, route=route)) for spec in kernels.all_specs() for route in routes]
    t_all = time.perf_counter()
    failed = 0
    with jit.BuildSet(jobs, workers=args.jobs or None) as builds:
        print(f"{len(builds.jobs)} kernels for {args.arch}, {builds.workers} at a time, into {ep.settings.cache_dir}",
              flush=True)
        job_of = {future: job for job, future in builds.futures.items()}
        for i, future in enumerate(concurrent.futures.as_completed(job_of), 1):
            spec, opts = job_of[future]
            name = f"{spec.source} {dict(spec.defines)} ({opts.route}, {args.arch})"
            try:
                compiled = future.result()
            except ep.DeepEPCompileError as e:
                failed += 1
                print(f"[{i}/{len(job_of)}] {name}: FAILED\n{e}", flush=True)
                continue
            state = "cached" if compiled.from_cache else f"compiled in {compiled.compile_seconds:.1f} s"
            print(f"[{i}/{len(job_of)}] {name}: {state}", flush=True)
    print(f"done in {time.perf_counter() - t_all:.1f} s ({builds.compiler_seconds():.0f} s of compile time); "
          f"{failed} failed; cache: {ep.settings.cache_dir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
