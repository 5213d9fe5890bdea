#!/usr/bin/env python3
"""Where the time of a non-cached dispatch goes, host and GPU side (a diagnostic, not a benchmark).

    mpirun -n 2 python scripts/trace_dispatch.py [--tokens 4096 --hidden 7168 --iters 30] [--inputs bf16,fp8]

Wraps IntranodeKernels.notify and the data-kernel launch with host timers and prints, per input
(BF16, FP8), dispatch kernel (direct, staged), L2 flush (off, on) and rank, the median host microseconds
of: the front end before notify is launched, the notify launch, from there to the data kernel's
launch (staged: the poll for the receive count and the allocation; direct: the data kernel is
queued before the poll), the rest (direct: the poll), and after the poll's return; beside the GPU
time of the whole call (events) and where the GPU reached notify and the data kernel (events
recorded on the communication stream at each launch, timed from the call's start event, which the
GPU passes once the flush is done). "gpu@notify" above zero: the GPU, done with the flush, waited for
the host to launch notify; "gpu@data" above gpu@notify plus notify's own time: it waited for the data
kernel's launch. Either way the benchmark's figure for that call is partly host time, not kernel
time (2026-12-07: FP8 non-cached on the H200). "data gpu" is the data kernel's own span (an event
recorded after its launch). By default each call is synchronized before the next; ``--back-to-back``
times them as bench_intranode does (no synchronize: the host's poll then waits for the GPU to finish
the previous call and the flush). Where the host time goes by Python function: scripts/profile_host.py.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--sms", type=int, default=24)
    ap.add_argument("--inputs", default="bf16,fp8", help="bf16, fp8 or both (comma-separated)")
    ap.add_argument("--back-to-back", action="store_true",
                    help="no synchronize between calls, as bench_intranode times them (the host then waits "
                         "in its poll for the GPU's previous call and flush)")
    ap.add_argument("--kinds", default="direct,staged", help="dispatch kernels: direct, staged or both")
    args = ap.parse_args()
    if args.iters < 1:
        ap.error("--iters: at least 1")
    for name in args.inputs.split(","):
        if name not in ("bf16", "fp8"):
            ap.error(f"--inputs: expected bf16 and/or fp8, got {name!r}")
    from mpi4py import MPI
    import cupy as cp
    import deepep_cupy as ep
    from deepep_cupy import intranode
    from benchutil import intranode_case, summarize

    comm = MPI.COMM_WORLD
    case = intranode_case(comm, args.tokens, args.hidden)
    buf, idx, w = case.buf, case.idx, case.w
    per_rank, per_expert, in_rank = case.per_rank, case.per_expert, case.in_rank
    inputs = {"bf16": case.x, "fp8": case.fp8}
    cfg = ep.Config(num_sms=args.sms)
    ep.settings.check_values = False

    marks = {}

    def stream_of(a, k):
        """The stream argument of a launcher (positional or keyword)."""
        for v in list(a) + list(k.values()):
            if isinstance(v, (cp.cuda.Stream, cp.cuda.ExternalStream)):
                return v
        return None

    def wrap(name, enter=None, leave=None, gpu_mark=None, gpu_mark_after=None):
        orig = getattr(intranode.IntranodeKernels, name)

        def timed(self, *a, **k):
            if enter:
                marks[enter] = time.perf_counter()
            if gpu_mark:   # where the GPU gets to this launch on its stream
                ev = cp.cuda.Event()
                ev.record(stream_of(a, k))
                marks[gpu_mark] = ev
            out = orig(self, *a, **k)
            if gpu_mark_after:   # where the GPU is done with this launch
                ev = cp.cuda.Event()
                ev.record(stream_of(a, k))
                marks[gpu_mark_after] = ev
            if leave:
                marks[leave] = time.perf_counter()
            return out
        setattr(intranode.IntranodeKernels, name, timed)

    wrap("_launch_notify", enter="notify_in", leave="notify_out", gpu_mark="gpu_notify")
    launch_notify = intranode.IntranodeKernels._launch_notify

    def launch_notify_marking_poll(self, *a, **k):   # the poll's return, marked
        send_pos, recv_info, poll = launch_notify(self, *a, **k)

        def timed_poll():
            out = poll()
            marks["poll_done"] = time.perf_counter()
            return out
        return send_pos, recv_info, timed_poll
    intranode.IntranodeKernels._launch_notify = launch_notify_marking_poll
    wrap("_launch_direct", leave="data_out", gpu_mark="gpu_data", gpu_mark_after="gpu_data_end")   # direct kernel (queued before or after the poll)
    wrap("dispatch", leave="data_out", gpu_mark="gpu_data")         # the staged kernel's launcher
    flush = cp.empty(256_000_000 // 4, dtype=cp.int32)   # DeepEP's flush: a 256 MB memset
    for input_name in args.inputs.split(","):
        for kind in args.kinds.split(","):
            ep.settings.intranode_dispatch = kind
            for flushed in (False, True):
                calls = []   # per call: (t0, t1, start event, end event, marks)
                for i in range(args.iters + 5):
                    if flushed:
                        flush.fill(0)
                    start, end = cp.cuda.Event(), cp.cuda.Event()
                    marks.clear()
                    start.record()
                    t0 = time.perf_counter()
                    buf.dispatch(inputs[input_name], topk_idx=idx, topk_weights=w, num_tokens_per_rank=per_rank,
                                 is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, config=cfg)
                    t1 = time.perf_counter()
                    end.record()
                    if not args.back_to_back:
                        end.synchronize()
                    if i >= 5:
                        calls.append((t0, t1, start, end, dict(marks)))
                cp.cuda.Device().synchronize()
                rows = {k: [] for k in ("front", "notify launch", "data launch", "poll+rest", "after poll",
                                        "host total", "gpu", "gpu@notify", "gpu@data", "data gpu")}
                ahead = []
                for t0, t1, start, end, m in calls:
                    gpu_at = lambda name: cp.cuda.get_elapsed_time(start, m[name]) / 1e3
                    rows["front"].append(m["notify_in"] - t0)
                    rows["notify launch"].append(m["notify_out"] - m["notify_in"])
                    rows["data launch"].append(m["data_out"] - m["notify_out"])   # staged: includes the poll
                    rows["poll+rest"].append(t1 - m["data_out"])
                    rows["after poll"].append(t1 - m["poll_done"])
                    rows["host total"].append(t1 - t0)
                    rows["gpu"].append(cp.cuda.get_elapsed_time(start, end) / 1e3)
                    rows["gpu@notify"].append(gpu_at("gpu_notify"))
                    rows["gpu@data"].append(gpu_at("gpu_data"))
                    # the data kernel's own span (from the GPU reaching it to its end)
                    rows["data gpu"].append(gpu_at("gpu_data_end") - gpu_at("gpu_data") if "gpu_data_end" in m
                                            else float("nan"))
                    # the direct path queues its data kernel before the poll; after it, the arena was full
                    # (or the staged kernel ran) and the GPU waited for the host's poll and allocation
                    ahead.append(m["data_out"] < m["poll_done"])
                # every rank's medians: a rank whose host is late holds its peers' direct kernels
                # (they wait for its direct_info entries), so the ranks are shown side by side
                medians = {k: statistics.median(v) * 1e6 for k, v in rows.items()}
                medians["gpu p90"] = summarize(rows["gpu"])[2] * 1e6   # a bimodal row shows here
                medians["queued before poll %"] = 100.0 * sum(ahead) / max(1, len(ahead))
                mode = "back-to-back" if args.back_to_back else "synced"
                for r, med in enumerate(comm.gather(medians, root=0) or []):
                    cells = "  ".join(f"{k} {v:7.1f}" for k, v in med.items())
                    print(f"{input_name:4s} {kind:7s} flush={int(flushed)} {mode} rank {r}  {cells}  "
                          f"(us, medians of {args.iters})", flush=True)
                comm.Barrier()
    buf.destroy()


if __name__ == "__main__":
    main()
