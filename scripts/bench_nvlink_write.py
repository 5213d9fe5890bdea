#!/usr/bin/env python3
"""NVLink write throughput between two GPUs of one process: SM stores vs TMA bulk stores vs the
copy engine; prints a table.

    python scripts/bench_nvlink_write.py [--sizes-mib 7,64] [--iters 50]

Why: the low-latency combine and the intranode kernels are bound by how fast SMs push bytes into a
peer's memory (about 230-280 GB/s with 16-byte stores on 2 x H200, against 394 GB/s for the copy
engine; docs/performance.md). This probe measures the candidates on the same bytes, one direction
(GPU 0 -> GPU 1) and both directions at once (as in a combine), so the next kernel change can be
chosen from numbers. Kernels: cuda_src/nvlink_probe.cu, through the package's JIT.
"""

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

PROBE = ("nvlink_probe.cu", ("probe_stores", "probe_tma"))


def probe_spec():
    """The JIT instance of cuda_src/nvlink_probe.cu."""
    from deepep_cupy import jit
    return jit.KernelSpec.make(PROBE[0], PROBE[1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mib", default="7,64", help="comma-separated sizes in MiB")
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()

    import cupy as cp
    from deepep_cupy import jit

    if cp.cuda.runtime.getDeviceCount() < 2:
        print("needs 2 GPUs in one process; skipped")
        return 0
    devices = (0, 1)
    for d in devices:
        with cp.cuda.Device(d):
            cp.cuda.runtime.deviceEnablePeerAccess(1 - d)
    mods, streams, sms = {}, {}, {}
    for d in devices:
        with cp.cuda.Device(d):
            mods[d] = jit.load(probe_spec())
            streams[d] = cp.cuda.Stream(non_blocking=True)
            sms[d] = cp.cuda.Device(d).attributes["MultiProcessorCount"]
    print(f"compiled; {sms[0]} SMs per GPU", flush=True)

    def make_buffers(nbytes):
        bufs = {}
        for d in devices:
            with cp.cuda.Device(d):
                pattern = ((cp.arange(nbytes, dtype=cp.int64) * 7 + 13 * d) % 251).astype(cp.uint8)
                bufs[d] = (pattern, cp.zeros(nbytes, dtype=cp.uint8))
        return bufs

    def launcher(method, d, src, dst, nbytes, blocks_per_sm, chunk):
        m = mods[d]
        if method == "stores":
            return lambda: m["probe_stores"]((sms[d] * blocks_per_sm,), (512,), (src, dst, cp.int64(nbytes)))
        if method == "tma":
            return lambda: m["probe_tma"]((sms[d] * blocks_per_sm,), (256,),
                                         (src, dst, cp.int64(nbytes), cp.int32(chunk)))
        return lambda: cp.cuda.runtime.memcpyPeerAsync(dst.data.ptr, 1 - d, src.data.ptr, d, nbytes,
                                                        streams[d].ptr)

    def timed(fns):
        """Median seconds of launching every fn (one per device) together."""
        samples = []
        for it in range(args.iters + 5):
            starts, ends = {}, {}
            for d, fn in fns.items():
                with cp.cuda.Device(d), streams[d]:
                    starts[d] = streams[d].record()
                    fn()
                    ends[d] = streams[d].record()
            for d in fns:
                ends[d].synchronize()
            if it >= 5:
                samples.append(max(cp.cuda.get_elapsed_time(starts[d], ends[d]) for d in fns) / 1e3)
        return statistics.median(samples)

    variants = [("stores", 1, 0), ("stores", 2, 0), ("tma", 1, 2048), ("tma", 2, 2048), ("tma", 4, 2048),
                ("tma", 4, 1024), ("copy engine", 0, 0)]
    print(f"{'size':>8} {'method':>12} {'blocks/SM':>9} {'chunk':>6} {'one way GB/s':>13} {'both ways GB/s':>15}")
    for mib in (float(v) for v in args.sizes_mib.split(",")):
        nbytes = int(mib * (1 << 20)) // 4096 * 4096
        bufs = make_buffers(nbytes)
        for method, bps, chunk in variants:
            with cp.cuda.Device(0):
                one = timed({0: launcher(method, 0, bufs[0][0], bufs[1][1], nbytes, bps, chunk)})
            both = timed({d: launcher(method, d, bufs[d][0], bufs[1 - d][1], nbytes, bps, chunk) for d in devices})
            ok = bool((cp.asnumpy(bufs[1][1]) == cp.asnumpy(bufs[0][0])).all())   # the peer received the bytes
            print(f"{mib:7.1f}M {method:>12} {bps:>9} {chunk:>6} {nbytes / one / 1e9:13.1f} "
                  f"{nbytes / both / 1e9:15.1f}{'' if ok else '  WRONG DATA'}", flush=True)
            with cp.cuda.Device(1):
                bufs[1][1].fill(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
