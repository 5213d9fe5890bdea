"""The main job: a dispatch/combine demo with a check, on the GPUs when present, else on the CPU.

    deepep-cupy-demo                    # installed entry point; launches itself under mpiexec
                                        # (one rank per GPU, or 2 on CPUs)
    python -m deepep_cupy.demo --ranks 3
    mpirun -n 2 deepep-cupy-demo        # or under a launcher of your own
    python scripts/demo.py              # the same from a checkout

On every rank it routes a batch of tokens to top-k experts and checks the dispatch layout against
the numpy reference model, then dispatches and combines and checks that every token comes back as
the sum of its copies with its weights intact, then runs a low-latency FP8 dispatch and BF16
combine checked bit for bit against the reference. On the GPUs it first runs the symmetric-memory
exchange (NVSHMEM puts + NVLink stores between all ranks).

Output: the settings once, then one block per rank in rank order (each rank's lines are gathered
to rank 0, so they never interleave), then a line that starts with "DEMO". Exit code 0 only if
every check passed on every rank; 2 for bad arguments, with a one-line error (from one rank).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from typing import NoReturn

PROG = "deepep-cupy-demo"
# the environment variables launchers set: the rank (to print usage errors once) and "under MPI"
_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
_LAUNCHER_VARS = _RANK_VARS + ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MPI_LOCALNRANKS", "HYDI_CONTROL_FD")
MASKED_FRACTION = 0.1     # top-k slots set to -1 (no expert), as real routers' padding does
SEED = 1234


def _env_rank():
    for var in _RANK_VARS:
        value = os.environ.get(var, "").strip()
        if value.isdigit():
            return int(value)
    return None


def launched_by_mpi() -> bool:
    """True when a launcher (mpiexec/mpirun) started this process."""
    return any(k in os.environ for k in _LAUNCHER_VARS)


def usage_error(message: str) -> NoReturn:
    """One line on stderr (from the first rank only when launched), exit status 2."""
    if _env_rank() in (None, 0):
        print(f"{PROG}: error: {message} (see {PROG} --help)", file=sys.stderr, flush=True)
    sys.exit(2)


class _Parser(argparse.ArgumentParser):
    def error(self, message):   # argparse prints the usage and exits on every rank; one line instead
        usage_error(message)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, with the checks that do not depend on the rank count."""
    ap = _Parser(prog=PROG, description="deepep_cupy dispatch/combine demo and check "
                                        "(GPU backend where there are GPUs, else the CPU reference backend)")
    ap.add_argument("--tokens", type=int, default=512, help="tokens per rank (default 512)")
    ap.add_argument("--hidden", type=int, default=2048,
                    help="hidden size, a multiple of 128 up to 8192 (default 2048)")
    ap.add_argument("--topk", type=int, default=8, help="experts per token (default 8)")
    ap.add_argument("--experts", type=int, default=64,
                    help="experts in all, rounded down to a multiple of the rank count (default 64)")
    ap.add_argument("--backend", default="auto", choices=("auto", "gpu", "reference"))
    ap.add_argument("--ranks", type=int, default=0,
                    help="ranks when it launches itself (default: one per GPU, or 2 without GPUs)")
    ap.add_argument("--ranks-per-node", type=int, default=None,
                    help="fewer than the rank count makes one host act as several nodes, so dispatch and "
                         "combine take the hierarchical (internode) path")
    args = ap.parse_args(argv)
    from .low_latency import MAX_HIDDEN, MAX_TOPK
    if args.tokens < 1:
        usage_error(f"--tokens: expected at least 1, got {args.tokens}")
    if args.hidden < 128 or args.hidden % 128 or args.hidden > MAX_HIDDEN:
        usage_error(f"--hidden: expected a multiple of 128 up to {MAX_HIDDEN}, got {args.hidden}")
    if not 1 <= args.topk <= MAX_TOPK:
        usage_error(f"--topk: expected 1 to {MAX_TOPK}, got {args.topk}")
    if args.experts < args.topk:
        usage_error(f"--experts: expected at least --topk ({args.topk}), got {args.experts}")
    if args.ranks < 0:
        usage_error(f"--ranks: expected 0 (automatic) or more, got {args.ranks}")
    if args.ranks_per_node is not None and args.ranks_per_node < 1:
        usage_error(f"--ranks-per-node: expected at least 1, got {args.ranks_per_node}")
    return args


def find_mpiexec():
    """The mpiexec next to this interpreter (pip's mpich puts one there), else one on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.path.isfile(here) and os.access(here, os.X_OK):
        return here
    return shutil.which("mpiexec") or shutil.which("mpirun")


def relaunch(num_ranks: int, argv) -> int:
    """Run this demo under mpiexec with ``num_ranks`` ranks (as ``python -m deepep_cupy.demo``,
    which works from a checkout and from an installed package alike); -1 if there is no mpiexec."""
    mpiexec = find_mpiexec()
    if mpiexec is None:
        print(f"{PROG}: no mpiexec found (pip install mpich), running on 1 rank", flush=True)
        return -1
    cmd = [mpiexec, "-n", str(num_ranks), sys.executable, "-m", "deepep_cupy.demo", *argv]
    try:
        version = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    if "Open MPI" in version or "OpenRTE" in version:   # Open MPI refuses root and tight slots
        cmd[1:1] = ["--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    # from a checkout (not installed), the child imports the package from the checkout too
    env = dict(os.environ)
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(pkg_parent, "pyproject.toml")):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, os.environ.get("PYTHONPATH")) if p)
    print(f"{PROG}: launching {' '.join(cmd)}", flush=True)
    return subprocess.call(cmd, env=env)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def run(args, comm, lines: list, checks: list) -> dict:
    """The demo on one rank: appends its report to ``lines`` and ``(name, ok)`` to ``checks``;
    returns the settings that rank 0 prints."""
    import ml_dtypes
    import numpy as np

    import deepep_cupy as ep
    from deepep_cupy import reference

    rank, num_ranks = comm.Get_rank(), comm.Get_size()
    experts = args.experts - args.experts % num_ranks or num_ranks
    if args.topk > experts:
        raise ep.DeepEPInvalid(f"--topk {args.topk} is more than the {experts} experts left after rounding "
                               f"--experts {args.experts} down to a multiple of {num_ranks} ranks")
    per_node = args.ranks_per_node
    internode = per_node is not None and per_node < num_ranks   # the hierarchical path needs both regions
    if internode:
        nvl_bytes, rdma_bytes = ep.Buffer.get_internode_size_hint(args.tokens, args.hidden, num_ranks, per_node,
                                                                  args.topk)
    else:
        nvl_bytes = max(8 << 20, ep.Buffer.get_intranode_size_hint(args.tokens, args.hidden, num_ranks, args.topk))
        rdma_bytes = 0
    ll_tokens = min(128, args.tokens)
    ll_bytes = ep.Buffer.get_low_latency_rdma_size_hint(ll_tokens, args.hidden, num_ranks, experts)
    settings = {}
    # two buffers, as with DeepEP: high-throughput, and low-latency (whose RDMA region is its own)
    with ep.Buffer(comm, num_nvl_bytes=nvl_bytes, num_rdma_bytes=rdma_bytes, ranks_per_node=per_node,
                   backend=args.backend) as buf, \
            ep.Buffer(comm, num_rdma_bytes=ll_bytes, low_latency_mode=True, backend=args.backend) as ll_buf:
        path = "internode" if buf.num_nodes > 1 else "intranode"
        settings = {
            "ranks": f"{num_ranks} ({buf.num_nodes} node(s) x {buf.ranks_per_node} ranks, {path} path)",
            "backend": f"{args.backend} -> {buf.backend_name}"
                       + (" (CUDA kernels)" if buf.backend_name == "gpu" else " (numpy on the CPU, no GPU used)"),
            "tokens": f"{args.tokens} per rank, hidden {args.hidden}, bf16",
            "routing": f"top-{args.topk} of {experts} experts ({experts // num_ranks} per rank), "
                       f"{MASKED_FRACTION:.0%} of the top-k slots masked (-1), seed {SEED} + rank",
            "buffers": f"high-throughput {_mib(nvl_bytes)} NVLink + {_mib(rdma_bytes)} RDMA; "
                       f"low-latency {_mib(ll_bytes)} RDMA ({ll_tokens} tokens per rank)",
        }
        if buf.backend_name == "gpu":
            from deepep_cupy import selftest
            report = selftest.symmetric_exchange(buf, num_bytes=2 << 20)
            lines.append(f"symmetric exchange: {report}")
            checks.append(("symmetric exchange", report.ok))

        rng = np.random.default_rng(SEED + rank)
        topk_idx = np.argsort(rng.random((args.tokens, experts)), axis=1)[:, :args.topk].astype(np.int64)
        topk_idx[rng.random(topk_idx.shape) < MASKED_FRACTION] = -1
        if buf.backend_name == "gpu":
            import cupy as cp
            to_dev, to_host = cp.asarray, cp.asnumpy
        else:
            to_dev = to_host = (lambda a: a)
        outs = buf.get_dispatch_layout(to_dev(topk_idx), experts)
        outs = [None if o is None else to_host(o) for o in outs[:4]]
        want = reference.get_dispatch_layout(topk_idx, experts, num_ranks,
                                             buf.ranks_per_node if buf.num_nodes > 1 else None)
        ok = all((a is None and b is None) or np.array_equal(a, b) for a, b in zip(outs, want))
        lines.append(f"layout: tokens to each rank {outs[0].tolist()} -> {'OK' if ok else 'MISMATCH'}")
        checks.append(("layout", ok))

        # dispatch + combine: every token comes back as the sum of its copies, i.e. x times the number
        # of ranks it went to, rounded to bf16; weights come back whole
        x = rng.standard_normal((args.tokens, args.hidden)).astype(np.float32).astype(ml_dtypes.bfloat16)
        weights = rng.random(topk_idx.shape).astype(np.float32)
        recv_x, recv_idx, recv_w, per_expert, handle, _ = buf.dispatch(
            to_dev(x), topk_idx=to_dev(topk_idx), topk_weights=to_dev(weights),
            num_tokens_per_rank=to_dev(want[0]), is_token_in_rank=to_dev(want[3]),
            num_tokens_per_expert=to_dev(want[2]))
        combined, combined_w, _ = buf.combine(recv_x, handle, topk_weights=recv_w)
        combined, combined_w = to_host(combined), to_host(combined_w)
        copies = want[3].sum(axis=1, keepdims=True).astype(np.float32)
        exact = x.astype(np.float32) * copies
        diff = np.abs(combined.astype(np.float32) - exact)
        err = float(diff.max()) if diff.size else 0.0
        nonzero = exact != 0
        rel = float((diff[nonzero] / np.abs(exact[nonzero])).max()) if nonzero.any() else 0.0
        limit = 0.05 * max(1.0, float(np.abs(exact).max()) if exact.size else 0.0)
        valid = topk_idx >= 0
        ok = err <= limit and np.allclose(combined_w[valid], weights[valid], rtol=1e-6)
        per_expert = [int(n) for n in per_expert]      # a list of ints (DeepEP's num_recv_tokens_per_expert_list)
        lines.append(f"dispatch/combine: received {len(recv_x)} tokens, per local expert "
                     f"{per_expert[:8]}{'...' if len(per_expert) > 8 else ''}; combine max err {err:.3g} "
                     f"(at most {rel:.2%} of a value; limit {limit:.3g}) -> {'OK' if ok else 'MISMATCH'}")
        checks.append(("dispatch/combine", ok))

        # low-latency (decode) round trip with the receive hook: FP8 dispatch, the "experts" return
        # what they received (dequantized), weighted BF16 combine; checked bit for bit against the
        # reference model gathered from every rank
        ll_x, ll_idx, ll_w = x[:ll_tokens], topk_idx[:ll_tokens], weights[:ll_tokens]
        recv, count, ll_handle, _, hook = ll_buf.low_latency_dispatch(
            to_dev(ll_x), to_dev(ll_idx), ll_tokens, experts, use_fp8=True, return_recv_hook=True)
        hook()                                   # compute could run between the sends and this
        everyone = comm.allgather((ll_x, ll_idx, ll_w))
        ref = reference.low_latency_dispatch([e[0] for e in everyone], [e[1] for e in everyone], ll_tokens,
                                             experts, use_fp8=True)
        mine = ref[rank]
        q, scales, n = to_host(recv[0]), to_host(recv[1]), to_host(count)
        ok = np.array_equal(n, mine.recv_count) and all(
            np.array_equal(q[e, :c].view(np.uint8), mine.recv_x[e, :c].view(np.uint8))
            and np.array_equal(scales[e, :c], mine.recv_x_scales[e, :c]) for e, c in enumerate(n))
        ys = [reference.fp8_to_float(r.recv_x, r.recv_x_scales).astype(ml_dtypes.bfloat16) for r in ref]
        out, _, _ = ll_buf.low_latency_combine(to_dev(ys[rank]), to_dev(ll_idx), to_dev(ll_w), ll_handle)
        want_ll = reference.low_latency_combine(ys, [e[1] for e in everyone], [e[2] for e in everyone], ref)[rank]
        ok = ok and np.array_equal(to_host(out).view(np.uint16), want_ll.view(np.uint16))
        lines.append(f"low-latency FP8 dispatch + BF16 combine ({ll_tokens} tokens, receive hook): "
                     f"{int(n.sum())} expert entries received, bit-exact against the reference -> "
                     f"{'OK' if ok else 'MISMATCH'}")
        checks.append(("low-latency", ok))
    return settings


MAX_ERR_NOTE = (
    "max err: the largest |combined - copies * x|, where copies is the number of ranks a token was "
    "sent to. The combine adds a token's copies in float32 and rounds the sum to bf16, which keeps 8 "
    "significant bits, so a result can be off by up to 2^-8 (0.39 %) of its value ({path}). "
    "A token with 1, 2, 4 or 8 copies comes back exact (x times a power of two), hence 0 on 2 ranks. "
    "The check allows 5 % of the largest value.")


def main(argv=None) -> int:
    """Entry point (``deepep-cupy-demo``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)

    if not launched_by_mpi():
        from deepep_cupy import discovery
        n = args.ranks or discovery.gpu_count() or 2
        if n > 1:
            rc = relaunch(n, argv)
            if rc >= 0:
                return rc

    from deepep_cupy import mpienv
    from deepep_cupy.errors import DeepEPError, DeepEPInvalid
    MPI = mpienv.import_mpi()
    comm = MPI.COMM_WORLD
    rank, num_ranks = comm.Get_rank(), comm.Get_size()
    mpienv.check_world(comm)

    lines, checks, settings, error = [], [], {}, None
    try:
        settings = run(args, comm, lines, checks)
    except DeepEPInvalid as e:           # bad settings for this rank count: the same on every rank
        error = f"invalid settings: {e}"
    except DeepEPError as e:             # a timeout, a compile error, a missing toolchain
        error = f"{type(e).__name__}: {e}"
    if error:
        lines.append(error)
        checks.append(("run", False))

    # every rank's report to rank 0, printed in rank order: no interleaving; one exit status for all
    reports = comm.gather((lines, checks, error), root=0)
    rc = _report(reports, settings, num_ranks) if rank == 0 else None
    return comm.bcast(rc, root=0)


def _report(reports, settings: dict, num_ranks: int) -> int:
    """Rank 0: print the settings, each rank's block, the max-err note and the DEMO line."""
    errors = {e for _, _, e in reports if e}
    if settings:
        print(f"deepep_cupy demo on {num_ranks} rank(s)")
        for key, value in settings.items():
            print(f"  {key + ':':9} {value}")
    prefix = "invalid settings: "
    if len(errors) == 1 and all(e and e.startswith(prefix) for _, _, e in reports):
        print(f"{PROG}: error: {errors.pop()[len(prefix):]}", file=sys.stderr, flush=True)
        print(f"DEMO FAILED: invalid settings for {num_ranks} rank(s)", flush=True)
        return 2
    for r, (rank_lines, _, _) in enumerate(reports):
        print(f"[rank {r}/{num_ranks}]")
        for line in rank_lines:
            print(f"  {line}")
    if settings:
        path = ("internode path: rounded once per node and once more, so about twice that"
                if "internode" in settings.get("ranks", "") else "one rounding on this path")
        print(MAX_ERR_NOTE.format(path=path))
    bad = {r: [name for name, ok in c if not ok] for r, (_, c, _) in enumerate(reports)}
    bad = {r: names for r, names in bad.items() if names}
    num_checks = max(len(c) for _, c, _ in reports)
    print(f"DEMO {'PASSED' if not bad else 'FAILED'}: {num_checks} checks on each of {num_ranks} "
          f"rank(s){'' if not bad else f'; failures {bad}'}", flush=True)
    return 0 if not bad else 1

if __name__ == "__main__":
    sys.exit(main())
