#!/usr/bin/env python3
"""Re-tune the SM budget of the intranode kernels on this machine and store it as data.

    mpirun -n <ranks> python scripts/tune_intranode.py [--sms 8,16,20,24,32] [--write]

For every candidate SM count it times cached BF16 dispatch and BF16 combine at DeepEP's shape
(4096 tokens per rank, hidden 7168, top-8 of 256 experts; flags change it), prints progress and a
table, and with --write stores the fastest count per operation for this rank count in
deepep_cupy/tuned_configs.json (settings.tuned_configs_path), which Buffer.get_dispatch_config and
get_combine_config read.
"""

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description="tune the intranode SM budget")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--sms", default="8,16,20,24,32")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--write", action="store_true", help="store the winners in the tuned table")
    args = ap.parse_args()

    from mpi4py import MPI
    import cupy as cp
    import ml_dtypes
    import numpy as np
    import deepep_cupy as ep
    from benchutil import summarize, time_calls

    comm = MPI.COMM_WORLD
    rank, R = comm.Get_rank(), comm.Get_size()
    say = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    T, H, K, E = args.tokens, args.hidden, args.topk, args.experts
    buf = ep.Buffer(comm, num_nvl_bytes=ep.Buffer.get_intranode_size_hint(T, H, R, K), backend="gpu")
    ep.settings.check_values = False
    rng = np.random.default_rng(rank)
    idx = cp.asarray(np.argsort(rng.random((T, E)), axis=1)[:, :K].astype(np.int64))
    x = cp.asarray(rng.standard_normal((T, H), dtype=np.float32).astype(ml_dtypes.bfloat16))
    per_expert = buf.get_dispatch_layout(idx, E)[2]
    results = {"dispatch": {}, "combine": {}}
    candidates = [int(s) for s in args.sms.split(",")]
    for i, sms in enumerate(candidates, 1):
        cfg = ep.Config(num_sms=sms)
        recv_x, _, _, _, handle, _ = buf.dispatch(x, topk_idx=idx, num_tokens_per_expert=per_expert, config=cfg)
        d = summarize(time_calls(lambda: buf.dispatch(x, handle=handle, config=cfg), num_tests=args.iters))[0]
        c = summarize(time_calls(lambda: buf.combine(recv_x, handle, config=cfg), num_tests=args.iters))[0]
        results["dispatch"][sms], results["combine"][sms] = d, c
        say(f"[{i}/{len(candidates)}] num_sms={sms:3d}: cached dispatch {d:8.1f} us, combine {c:8.1f} us")
    buf.destroy()
    if rank != 0:
        return
    stamp = datetime.date.today().isoformat()
    path = Path(ep.settings.tuned_configs_path)
    table = json.loads(path.read_text()) if path.is_file() else {}
    for kind, times in results.items():
        best = min(times, key=times.get)
        say(f"best {kind}: {best} SMs ({times[best]:.1f} us)")
        swept = "/".join(str(s) for s in candidates)
        table.setdefault(kind, {})[str(R)] = {
            "num_sms": best,
            "measured": f"{stamp}, {R} ranks, {T} tokens x {H}: {swept} SMs swept, {best} fastest ({times[best]:.0f} us)"}
    if args.write:
        path.write_text(json.dumps(table, indent=2) + "\n")
        say(f"wrote {path}")
    else:
        say("(dry run: pass --write to store these)")


if __name__ == "__main__":
    main()
