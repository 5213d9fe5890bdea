#!/usr/bin/env python3
"""The harness of the DeepEP-style test scripts: tests/test_intranode.py, test_internode.py,
test_low_latency.py, test_fp8.py and test_inference.py.

Each of those files is both a pytest module and a script that behaves like DeepEP's test of the same
name (flags ``--num-processes``, ``--num-tokens``, ``--hidden``, ``--num-topk``, ``--num-experts``):

    python tests/test_intranode.py                      # relaunches itself: mpiexec -n <GPUs, or 2>
    python tests/test_intranode.py --num-processes 4
    mpirun -n 2 python tests/test_intranode.py          # or under a launcher of your own

On one GPU shared by 2 ranks, start CUDA MPS and set ``DEEPEP_CUPY_SHARE_GPUS=1`` first (as
scripts/gpu_machine.sh does with NUM_RANKS=2); the default is then 2 ranks.

It checks every result against the numpy oracle (``deepep_cupy.reference``, bit for bit, as
tests/dispatch_cases.py does), prints a timing table with DeepEP's metrics from rank 0 (CUDA events on
the GPU, ``time.perf_counter`` on the CPU reference backend), and exits 1 on a mismatch on any rank.
The last line says ``<name>: PASSED`` or ``FAILED``.

This module holds what the five share: the relaunch under mpiexec, the backend-neutral array movers
(``Ctx``), the inputs and the dispatch/combine check, timing, the table, the verdict, and the pytest
side (``run_in_process``; ``check_under_mpiexec``, which runs all five under ONE ``mpiexec -n 2``,
cached for the session, so the CPU tier pays the MPI and import start-up once: under the CPU tier's
conftest that launch is the run ``seed_scripts`` of the shared 2-rank pytest session,
testutil.MpiSessions, which also runs tests/multirank and the examples). Run as a script it is that
single launch:

    mpiexec -n 2 python tests/seed_scripts.py [--backend reference] [test_intranode ...]

Environment: ``DEEPEP_CUPY_SEED_BACKEND`` (default ``reference``) picks the backend of the shared
mpiexec launch under pytest (the in-process runs always use the reference backend); the scripts
themselves default to ``--backend auto`` (GPU where there is one).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# From a checkout: started as a script from tests/ (or with no deepep_cupy installed), import the
# package of this checkout, as scripts/*.py do.
_SCRIPT_MODE = bool(sys.argv and sys.argv[0]) and os.path.abspath(sys.argv[0]).startswith(HERE + os.sep)
if os.path.isdir(os.path.join(ROOT, "deepep_cupy")) and ROOT not in sys.path and (
        _SCRIPT_MODE or importlib.util.find_spec("deepep_cupy") is None):
    sys.path.insert(0, ROOT)

try:   # the scripts run without pytest (a CPU-only install has none); its marks are then no-ops
    import pytest
    mark = pytest.mark
except ImportError:  # pragma: no cover - only as a script
    pytest = None

    class _NoMark:
        def __getattr__(self, name):
            return self

        def __call__(self, *args, **kwargs):
            if len(args) == 1 and callable(args[0]) and not kwargs:
                return args[0]
            return self

    mark = _NoMark()

SCRIPTS = ("test_intranode", "test_internode", "test_low_latency", "test_fp8", "test_inference")
# what launchers export (Open MPI, MPICH's hydra / PMI, PMIx, Intel MPI)
_LAUNCHER_VARS = ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_SIZE", "PMI_RANK", "PMIX_RANK",
                  "MPI_LOCALNRANKS", "HYDI_CONTROL_FD")
VERDICT_RE = re.compile(r"^(test_\w+): (PASSED|FAILED)\b", re.MULTILINE)


# ------------------------------------------------------------------------------------------ launching
def launched_by_mpi() -> bool:
    """True when mpiexec/mpirun started this process (its environment says so), or when mpi4py is
    already up in a world of more than one rank."""
    if any(v in os.environ for v in _LAUNCHER_VARS):
        return True
    mpi = sys.modules.get("mpi4py.MPI")
    return mpi is not None and mpi.COMM_WORLD.Get_size() > 1


def find_mpiexec():
    """mpiexec next to this interpreter (pip's mpich puts one there) or on PATH; None if none."""
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.path.isfile(here) and os.access(here, os.X_OK):
        return here
    return shutil.which("mpiexec") or shutil.which("mpirun")


def mpiexec_command(mpiexec: str, num_ranks: int, argv) -> list:
    """``mpiexec -n N argv...``; Open MPI also gets --oversubscribe (more ranks than cores on a
    small CPU machine) and, as root, --allow-run-as-root."""
    cmd = [mpiexec, "-n", str(num_ranks), *argv]
    try:
        version = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    if "Open MPI" in version or "OpenRTE" in version:
        cmd[1:1] = ["--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    return cmd


def child_env(**extra) -> dict:
    """The environment of a launched child: this checkout importable, unbuffered output."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
    if os.path.isdir(os.path.join(ROOT, "deepep_cupy")):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    return env


def visible_gpus() -> int:
    """GPUs the CUDA driver shows this process (CUDA_VISIBLE_DEVICES applies); 0 without a driver.
    Asks libcuda directly: importing CuPy just to count would cost seconds before the relaunch."""
    import ctypes
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        count = ctypes.c_int(0)
        if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return int(count.value)
    except (OSError, AttributeError):
        return 0


def default_num_processes() -> int:
    """One rank per visible GPU, or 2 on a machine without GPUs (the reference backend); at least 2
    where ranks may share a GPU (``DEEPEP_CUPY_SHARE_GPUS=1`` under CUDA MPS, as
    scripts/gpu_machine.sh sets up on a one-GPU machine)."""
    share = os.environ.get("DEEPEP_CUPY_SHARE_GPUS", "").strip().lower() not in ("", "0", "false", "no", "off")
    gpus = visible_gpus()
    return max(gpus, 2) if share or not gpus else gpus


def relaunch_if_alone(script: str, argv, num_processes) -> "int | None":
    """Started alone (no launcher) with more than one process wanted: run ``script argv`` under
    ``mpiexec -n num_processes`` and return its exit status. None: go on in this process."""
    if launched_by_mpi():
        return None
    n = default_num_processes() if num_processes is None else num_processes
    if n <= 1:
        return None
    mpiexec = find_mpiexec()
    if mpiexec is None:
        print(f"{os.path.basename(script)}: no mpiexec found (pip install mpich); running on 1 rank", flush=True)
        return None
    cmd = mpiexec_command(mpiexec, n, [sys.executable, os.path.abspath(script), *argv])
    print(f"{os.path.basename(script)}: launching {' '.join(cmd)}", flush=True)
    return subprocess.call(cmd, env=child_env())


# ------------------------------------------------------------------------------------ command line
def parser(description: str, *, num_tokens=None, hidden=None, num_topk: int, num_experts: int,
           tokens_help: str = "tokens per rank") -> argparse.ArgumentParser:
    """DeepEP's flags with DeepEP's defaults for this test, plus ours (--backend, --num-tests, --seed).
    ``num_tokens``/``hidden`` None: no --num-tokens/--hidden (the script has flags of its own)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--num-processes", type=int, default=None,
                    help="ranks to launch when started alone (default: one per GPU, at least 2 with "
                         "DEEPEP_CUPY_SHARE_GPUS=1 (MPS); 2 on a CPU machine)")
    if num_tokens is not None:
        ap.add_argument("--num-tokens", type=int, default=num_tokens, help=f"{tokens_help} (default: {num_tokens})")
    if hidden is not None:
        ap.add_argument("--hidden", type=int, default=hidden, help=f"hidden size (default: {hidden})")
    ap.add_argument("--num-topk", type=int, default=num_topk, help=f"experts per token (default: {num_topk})")
    ap.add_argument("--num-experts", type=int, default=num_experts,
                    help=f"experts in all, rounded down to a multiple of the rank count (default: {num_experts})")
    ap.add_argument("--backend", default="auto", choices=("auto", "gpu", "reference"),
                    help="GPU kernels, or the CPU reference backend (numpy across the ranks); auto: GPU if present")
    ap.add_argument("--num-tests", type=int, default=None,
                    help="timed calls per operation (default: 30 on the GPU, 3 on the reference backend)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the inputs (default: 1)")
    return ap


def resolve_backend(name: str) -> str:
    if name != "auto":
        return name
    from deepep_cupy import discovery
    return "gpu" if discovery.gpu_count() > 0 else "reference"


# --------------------------------------------------------------------------------------- context
class Ctx:
    """One run's communicator and backend, with array movers that work on either backend: ``dev``
    (numpy -> what the backend takes: CuPy on the GPU, FP8 as its uint8 storage; numpy as it is on
    the reference backend) and ``host`` (back to numpy)."""

    def __init__(self, comm, backend: str, args=None):
        self.comm = comm
        self.rank, self.num_ranks = comm.Get_rank(), comm.Get_size()
        self.backend = resolve_backend(backend)
        self.gpu = self.backend == "gpu"
        tests = getattr(args, "num_tests", None)
        self.num_tests = tests if tests is not None else (30 if self.gpu else 3)
        self.num_warmups = 5 if self.gpu else 1

    def say(self, *parts, **kwargs) -> None:
        if self.rank == 0:
            print(*parts, flush=True, **kwargs)

    def dev(self, a):
        if a is None or not self.gpu:
            return a
        import cupy
        import numpy as np
        from deepep_cupy import reference
        return cupy.asarray(a.view(np.uint8) if a.dtype == reference.FP8 else a)

    def host(self, a):
        import numpy as np
        if a is None:
            return None
        if self.gpu:
            import cupy
            return cupy.asnumpy(a)
        return np.asarray(a)

    def experts(self, requested: int) -> int:
        """``requested`` rounded down to a multiple of the rank count (DeepEP: (256 // R) * R)."""
        e = max(self.num_ranks, requested - requested % self.num_ranks)
        if e != requested:
            self.say(f"[config] --num-experts {requested} rounded down to {e} (a multiple of {self.num_ranks} ranks)")
        return e

    def sync(self) -> None:
        if self.gpu:
            import cupy
            cupy.cuda.Device().synchronize()
        self.comm.Barrier()


# ----------------------------------------------------------------------------------------- inputs
def world_inputs(seed: int, num_ranks: int, tokens: int, hidden: int, num_topk: int, num_experts: int,
                 kind: str = "random", weights: bool = True, uneven: bool = True, route=None):
    """Every rank's (x bf16 [T_r, H], topk_idx int64 [T_r, K], topk_weights float32 or None), built
    from a shared seed, so each rank can compute the reference result of all of them. ``kind``: a
    routing of tests/dispatch_cases.py; ``route(rng, T)``: a routing of one's own. ``uneven``: odd
    ranks get a few tokens fewer (as dispatch_cases does)."""
    import numpy as np
    from dispatch_cases import BF16, routing
    xs, idxs, ws = [], [], []
    for r in range(num_ranks):
        rng = np.random.default_rng(seed * 1000 + r)
        t = max(0, tokens - 3 * (r % 3)) if uneven and r % 2 else tokens
        xs.append((rng.standard_normal((t, hidden), dtype=np.float32) * (1 + r)).astype(BF16))
        idxs.append(route(rng, t) if route is not None else routing(kind, t, num_topk, num_experts, num_ranks, rng))
        ws.append(rng.random((t, num_topk), dtype=np.float32) if weights else None)
    return xs, idxs, (ws if weights else None)


def fp8_pairs(xs):
    """Each rank's bf16 ``x`` cast to the FP8 pair (e4m3 [T, H], float32 scales [T, H/128])."""
    from deepep_cupy import reference
    pairs = [reference.per_token_cast_to_fp8(x) for x in xs]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def bias_pairs(xs):
    """Every rank's combine bias pair (bf16, the shape of its ``x``): ones, and a small pattern over
    the channels (DeepEP's internode test adds a bias pair too)."""
    import numpy as np
    from dispatch_cases import BF16
    pairs = []
    for x in xs:
        t, h = x.shape
        pattern = np.broadcast_to((np.arange(h, dtype=np.float32) % 7) / 8 - 0.25, (t, h))
        pairs.append((np.ones((t, h), BF16), np.ascontiguousarray(pattern).astype(BF16)))
    return pairs


def grouped_route(num_topk: int, num_experts: int, num_nodes: int, num_groups: int):
    """DeepEP's internode routing: score every expert, keep the ``num_groups`` nodes with the best
    scores, take the top-k experts on those nodes only (``--num-topk-groups``)."""
    import numpy as np

    def route(rng, t):
        scores = rng.random((t, num_experts)) + 1.0
        if num_nodes > 1 and num_groups < num_nodes:
            per_node = scores.reshape(t, num_nodes, -1).max(axis=2)
            keep = np.argsort(-per_node, axis=1)[:, :num_groups]
            mask = np.zeros((t, num_nodes), dtype=bool)
            mask[np.arange(t)[:, None], keep] = True
            scores = np.where(np.repeat(mask, num_experts // num_nodes, axis=1), scores, 0.0)
        return np.argsort(-scores, axis=1)[:, :num_topk].astype(np.int64)
    return route


# ------------------------------------------------------------------------------ combine oracles
def rank_order_oracle(ys, results, weights, bias, me):
    """The combine of one rounding: every copy summed in float32 in rank order after the biases
    (intranode kernels, and the reference backend on any path)."""
    from dispatch_cases import rank_order_combine
    return rank_order_combine(ys, results, weights, bias, me)


def two_level_oracle(ranks_per_node: int):
    """The combine of the GPU's hierarchical path: each node's copies summed and rounded to bf16,
    then the biases and the node sums in node order, rounded once more (tests/gpu/test_internode_gpu.py)."""
    import numpy as np
    from deepep_cupy import reference
    from dispatch_cases import BF16

    def oracle(ys, results, weights, bias, me):
        num_nodes = len(results) // ranks_per_node
        acc = None
        for n in range(num_nodes):
            masked = [y if r // ranks_per_node == n else np.zeros_like(y) for r, y in enumerate(ys)]
            part = reference.combine(masked, results)[me][0].astype(np.float32)
            if acc is None:
                acc = np.zeros_like(part)
                for b in (bias[me] if bias is not None else ()):
                    if b is not None:
                        acc = acc + b.astype(np.float32)
            acc = acc + part
        want_w = None if weights is None else reference.combine(ys, results, topk_weights=weights)[me][1]
        return acc.astype(BF16), want_w
    return oracle


# ------------------------------------------------------------------------ high-throughput check
def bits(a):
    """Raw bits of an array (bit-exact comparisons, the sign of zero included)."""
    import numpy as np
    a = np.ascontiguousarray(a)
    return a.view(np.dtype(f"u{a.dtype.itemsize}")) if a.dtype.itemsize in (1, 2, 4, 8) else a


def same_bits(a, b) -> bool:
    import numpy as np
    return a.shape == b.shape and np.array_equal(bits(a), bits(b))


def dispatch_round(ctx: Ctx, buf, tag: str, xs, idxs, ws, num_experts: int, scales=None, alignment: int = 1,
                   bias=None, oracle=rank_order_oracle, cached: bool = True) -> tuple:
    """One layout + dispatch (+ combine for BF16, + a cached dispatch of other data) through ``buf``,
    checked bit for bit against ``deepep_cupy.reference`` as tests/dispatch_cases.run_case does.

    ``xs``/``scales``/``idxs``/``ws``/``bias``: every rank's inputs (numpy; ``scales`` for FP8).
    Returns ``(problems, state)``; ``state`` holds this rank's device inputs, the layout, the
    handle and the outputs, for timing the same calls afterwards."""
    import numpy as np
    from deepep_cupy import reference
    R, me = ctx.num_ranks, ctx.rank
    fp8 = scales is not None
    problems = []
    per_node = buf.ranks_per_node if buf.num_nodes > 1 else None
    results = reference.dispatch(xs, idxs, ws, num_experts, expert_alignment=alignment, x_scales=scales)
    ref = results[me]
    x_in = (ctx.dev(xs[me]), ctx.dev(scales[me])) if fp8 else ctx.dev(xs[me])
    idx, w = ctx.dev(idxs[me]), ctx.dev(ws[me]) if ws is not None else None

    layout = buf.get_dispatch_layout(idx, num_experts)[:4]
    want_layout = reference.get_dispatch_layout(idxs[me], num_experts, R, per_node)
    for name, got, want in zip(("num_tokens_per_rank", "num_tokens_per_rdma_rank", "num_tokens_per_expert",
                                "is_token_in_rank"), layout, want_layout):
        if (got is None) != (want is None) or (want is not None and not np.array_equal(ctx.host(got), want)):
            problems.append(f"{tag}: layout {name} differs")
    per_rank, per_rdma, per_expert, in_rank = layout
    kwargs = dict(topk_idx=idx, topk_weights=w, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma,
                  is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, expert_alignment=alignment)
    recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(x_in, **kwargs)
    n = ref.num_recv_tokens
    got_x = ctx.host(recv_x[0] if fp8 else recv_x)
    if not same_bits(got_x, ref.recv_x):
        problems.append(f"{tag}: recv_x differs (shape {got_x.shape}, expected {ref.recv_x.shape})")
    if fp8 and not same_bits(ctx.host(recv_x[1]), ref.recv_x_scales):
        problems.append(f"{tag}: received FP8 scales differ")
    if not np.array_equal(ctx.host(recv_idx), ref.recv_topk_idx):
        problems.append(f"{tag}: recv_topk_idx differs")
    if ws is not None and not same_bits(ctx.host(recv_w), ref.recv_topk_weights):
        problems.append(f"{tag}: recv_topk_weights differ")
    if list(counts) != list(ref.num_recv_tokens_per_expert_list):
        problems.append(f"{tag}: num_recv_tokens_per_expert_list {list(counts)[:4]}... != "
                        f"{list(ref.num_recv_tokens_per_expert_list)[:4]}...")
    src = getattr(handle, "recv_src_idx", None)
    if src is not None and not np.array_equal(ctx.host(src)[:n], ref.recv_src_idx[:n]):
        problems.append(f"{tag}: the handle's recv_src_idx differs")
    state = dict(x=x_in, kwargs=kwargs, handle=handle, recv_x=recv_x, recv_w=recv_w, num_recv=n,
                 results=results)

    if not fp8:   # combine the received rows, as if every expert returned its input
        ys = [r.recv_x for r in results]
        ref_w = [r.recv_topk_weights for r in results] if ws is not None else None
        want, want_w = oracle(ys, results, ref_w, bias, me)
        b = None if bias is None else tuple(ctx.dev(t) for t in bias[me])
        got, got_w, _ = buf.combine(recv_x, handle, topk_weights=recv_w, bias=b)
        if not same_bits(ctx.host(got), want):
            diff = float(np.abs(ctx.host(got).astype(np.float32) - want.astype(np.float32)).max()) if want.size else 0
            problems.append(f"{tag}: combine differs (max abs {diff:.3g})")
        if ws is not None and not same_bits(ctx.host(got_w), want_w):
            problems.append(f"{tag}: combined topk_weights differ")

    if cached:   # the same routing, new data, no layout work
        if fp8:
            from dispatch_cases import BF16
            q2, s2 = fp8_pairs([(reference.fp8_to_float(q, s) * 2 - 1).astype(BF16) for q, s in zip(xs, scales)])
            want2 = reference.dispatch(q2, idxs, None, num_experts, x_scales=s2)[me]
            x2 = (ctx.dev(q2[me]), ctx.dev(s2[me]))
        else:
            from dispatch_cases import BF16
            xs2 = [(x.astype(np.float32) * 2 - 1).astype(BF16) for x in xs]
            want2 = reference.dispatch(xs2, idxs, None, num_experts)[me]
            x2 = ctx.dev(xs2[me])
        out2 = buf.dispatch(x2, handle=handle)
        if out2[1] is not None or out2[2] is not None or out2[3] is not None:
            problems.append(f"{tag}: cached dispatch returned top-k outputs")
        got2 = ctx.host(out2[0][0] if fp8 else out2[0])
        if not same_bits(got2, want2.recv_x) or (fp8 and not same_bits(ctx.host(out2[0][1]), want2.recv_x_scales)):
            problems.append(f"{tag}: cached dispatch differs")
        state["x_cached"] = x2
    return problems, state


def rank_mask_round(ctx: Ctx, buf, tag: str, xs, idxs, num_experts: int, oracle=rank_order_oracle) -> list:
    """Dispatch routed by ``is_token_in_rank`` alone (DeepEP's "without top-k") and its combine."""
    from deepep_cupy import reference
    me = ctx.rank
    idx = ctx.dev(idxs[me])
    per_rank, _, _, in_rank, _ = buf.get_dispatch_layout(idx, num_experts)
    recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(ctx.dev(xs[me]), num_tokens_per_rank=per_rank,
                                                               is_token_in_rank=in_rank)
    res = reference.dispatch(xs, idxs, None, num_experts)
    problems = []
    if recv_idx is not None or recv_w is not None or list(counts) != []:
        problems.append(f"{tag}: top-k outputs returned without topk_idx")
    if not same_bits(ctx.host(recv_x), res[me].recv_x):
        problems.append(f"{tag}: dispatch without top-k differs")
    got, _, _ = buf.combine(recv_x, handle)
    want, _ = oracle([r.recv_x for r in res], res, None, None, me)
    if not same_bits(ctx.host(got), want):
        problems.append(f"{tag}: combine after a dispatch without top-k differs")
    return problems


# ---------------------------------------------------------------------------- low-latency check
def ll_inputs(seed, num_ranks, tokens, hidden, num_topk, num_experts):
    """Every rank's (x bf16 [T, H], topk_idx [T, K] of distinct experts with up to ten slots masked
    to -1, weights > 0), as DeepEP's low-latency test builds them, from a shared seed."""
    import numpy as np
    from dispatch_cases import BF16
    xs, idxs, ws = [], [], []
    for r in range(num_ranks):
        rng = np.random.default_rng(seed * 1000 + r)
        xs.append(rng.standard_normal((tokens, hidden), dtype=np.float32).astype(BF16))
        scores = rng.random((tokens, num_experts)) + 1.0
        idx = np.argsort(-scores, axis=1)[:, :num_topk].astype(np.int64)
        for _ in range(min(10, tokens * num_topk // 8)):   # DeepEP masks 10 slots (of 128 x 8)
            idx[rng.integers(tokens), rng.integers(num_topk)] = -1
        idxs.append(idx)
        ws.append(np.abs(rng.standard_normal((tokens, num_topk), dtype=np.float32)))
    return xs, idxs, ws


def simulated_gemm(result):
    """What the experts return in the tests (DeepEP's "simulated GEMM"): the received rows, dequantized
    to bf16; from the reference's result, so that slots past the counts, which the GPU leaves
    uninitialised, do not matter. Dequantized expert by expert, over the used slots only (the rest
    stays zero, as in the reference's result): no float32 copy of the whole receive buffer."""
    import numpy as np
    from dispatch_cases import BF16
    if not result.use_fp8:
        return result.recv_x
    out = np.zeros(result.recv_x.shape, BF16)
    for l, n in enumerate(result.recv_count):
        if n:
            out[l, :n] = dequantized(result.recv_x[l, :n], result.recv_x_scales[l, :n], result.use_ue8m0)
    return out


def dequantized(x, scales, use_ue8m0: bool = False):
    """bf16 rows: FP8 rows with their scales dequantized (``reference.fp8_to_float``), bf16 as they are."""
    from deepep_cupy import reference
    from dispatch_cases import BF16
    if scales is None:
        return x
    return reference.fp8_to_float(x, scales, use_ue8m0=use_ue8m0).astype(BF16)


def ll_reference(xs, idxs, ws, me: int, num_max_dispatch_tokens_per_rank: int, num_experts: int,
                 use_fp8: bool = True, round_scale: bool = False, use_ue8m0: bool = False) -> tuple:
    """This rank's reference low-latency dispatch result, and the combine it must get back when every
    expert returns the rows it received, dequantized (``simulated_gemm``).

    Built from the reference's per-rank pieces (docs/reference_model.md, "Per-rank building
    blocks"): every source's ``low_latency_pack``, this rank's ``low_latency_unpack``, and for the
    combine the rows this rank sent to each owner (what the owner's experts return, in the owner's
    ``low_latency_combine_pack`` order) into ``low_latency_combine_reduce``. So only this rank's receive
    side is held, where ``reference.low_latency_dispatch`` would hold every rank's (ranks x experts x
    ranks x M x hidden: gigabytes at DeepEP's sizes on 8 ranks). Returns (result, bf16 [T, H])."""
    from deepep_cupy import reference
    R, H = len(xs), xs[me].shape[1]
    sent = [reference.low_latency_pack(xs[s], idxs[s], num_experts, R, use_fp8, round_scale, use_ue8m0)
            for s in range(R)]
    mine = reference.low_latency_unpack([sent[s][me] for s in range(R)], rank=me, num_experts=num_experts,
                                        num_max_dispatch_tokens_per_rank=num_max_dispatch_tokens_per_rank,
                                        hidden=H, use_fp8=use_fp8, use_ue8m0=use_ue8m0)
    back = [dequantized(p.x, p.x_scales if use_fp8 else None, use_ue8m0) for p in sent[me]]
    want = reference.low_latency_combine_reduce(back, idxs[me], ws[me], num_experts, H)
    return mine, want


def ll_dispatch_problems(ctx, tag, got, want, use_fp8):
    """Bit-exact comparison of one rank's dispatch outputs with its reference result (slots below the
    counts; the GPU leaves the others uninitialised)."""
    import numpy as np
    recv, count, handle = got
    counts = ctx.host(count)
    if not np.array_equal(counts, want.recv_count):
        return [f"{tag}: recv_count {counts[:6]} != {want.recv_count[:6]}"]
    data = ctx.host(recv[0] if use_fp8 else recv)
    scales = ctx.host(recv[1]) if use_fp8 else None
    src = ctx.host(handle.recv_src_info)
    for l, n in enumerate(counts):
        if not same_bits(data[l, :n], want.recv_x[l, :n]):
            return [f"{tag}: expert {l}: received rows differ"]
        if use_fp8 and not same_bits(scales[l, :n], want.recv_x_scales[l, :n]):
            return [f"{tag}: expert {l}: received scales differ"]
        if not np.array_equal(src[l, :n], want.recv_src_info[l, :n]):
            return [f"{tag}: expert {l}: source indices differ"]
    if not (np.array_equal(ctx.host(handle.layout_begin), want.layout_begin)
            and np.array_equal(ctx.host(handle.layout_count), want.layout_count)):
        return [f"{tag}: layout ranges differ"]
    return []


def fp8_error(got, want) -> tuple:
    """FP8 against BF16, per 128-channel block: ``|dequantized - bf16|`` max over the block / the
    block's max ``|bf16|`` (blocks of zeros skipped). ``got``/``want``: float32 ``[..., H]``.
    Returns (max over blocks, mean over blocks, DeepEP's ``calc_diff``: 1 - 2 sum(xy) / sum(xx + yy))."""
    import numpy as np
    hidden = want.shape[-1]
    got, want = got.reshape(-1, hidden), want.reshape(-1, hidden)
    worst, total, blocks, xy, xx_yy = 0.0, 0.0, 0, 0.0, 0.0
    for i in range(0, want.shape[0], 1024):      # in slices of rows: bounded memory at any size
        g = got[i:i + 1024].astype(np.float32).reshape(-1, hidden // 128, 128)
        w = want[i:i + 1024].astype(np.float32).reshape(g.shape)
        amax = np.abs(w).max(axis=-1)
        rel = (np.abs(g - w).max(axis=-1)[amax > 0] / amax[amax > 0]).astype(np.float64)
        if rel.size:
            worst, total, blocks = max(worst, float(rel.max())), total + float(rel.sum()), blocks + rel.size
        xy += float((g.astype(np.float64) * w).sum())
        xx_yy += float((g.astype(np.float64) ** 2 + w.astype(np.float64) ** 2).sum())
    diff = 1.0 - 2.0 * xy / xx_yy if xx_yy else 0.0
    return worst, (total / blocks if blocks else 0.0), diff


# ---------------------------------------------------------------------------------------- timing
def bench(ctx: Ctx, fn, before=None, after=None, num_tests=None) -> list:
    """Per-call times in microseconds of the collective ``fn`` (every rank calls it as often).

    GPU: scripts/benchutil.time_calls (DeepEP's method: L2 flushed, CUDA events around each call);
    reference backend: ``time.perf_counter`` around each call. ``before``/``after`` run untimed
    around every call (a send before a timed receive, the receive after a timed send)."""
    n = num_tests or ctx.num_tests
    ctx.sync()
    if ctx.gpu:
        scripts = os.path.join(ROOT, "scripts")
        if scripts not in sys.path:
            sys.path.insert(0, scripts)
        from benchutil import time_calls
        return time_calls(fn, num_warmups=ctx.num_warmups, num_tests=n, before=before, after=after)
    for _ in range(ctx.num_warmups):
        if before:
            before()
        fn()
        if after:
            after()
    samples = []
    for _ in range(n):
        if before:
            before()
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
        if after:
            after()
    return samples


def avg_min_max(samples) -> tuple:
    """DeepEP's ``bench`` figures: (average, minimum, maximum)."""
    return statistics.fmean(samples), min(samples), max(samples)


def gbps(num_bytes: float, us: float) -> float:
    return num_bytes / us / 1e3 if us > 0 else float("nan")


def table(ctx: Ctx, header, rows, title: str = "") -> None:
    """Print a table from rank 0: ``header`` names, ``rows`` of values (floats get 2 decimals)."""
    cells = [[f"{v:.2f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    if title:
        ctx.say(title)
    fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    ctx.say(fmt(header))
    ctx.say("  ".join("-" * w for w in widths))
    for row in cells:
        ctx.say(fmt(row))


def backend_note(ctx: Ctx) -> str:
    if ctx.gpu:
        return "GPU kernels; times from CUDA events around each call (L2 flushed), eager (no CUDA graph)"
    return ("CPU reference backend (numpy, MPI messages): times are host times per call, for the record; "
            "they say nothing about GPU speed")


# ---------------------------------------------------------------------------------------- verdict
def finish(ctx: Ctx, name: str, problems, seconds: float) -> int:
    """Gather every rank's problems to rank 0, print them and the verdict line; 0 or 1 on every rank."""
    everyone = ctx.comm.gather(list(problems), root=0)
    ok = None
    if ctx.rank == 0:
        bad = [(r, p) for r, ps in enumerate(everyone) for p in ps]
        for r, p in bad[:30]:
            print(f"  MISMATCH rank {r}: {p}", flush=True)
        if len(bad) > 30:
            print(f"  ... and {len(bad) - 30} more", flush=True)
        ok = not bad
        print(f"{name}: {'PASSED' if ok else 'FAILED'} on {ctx.num_ranks} rank(s), {ctx.backend} backend, "
              f"{seconds:.1f} s" + ("" if ok else f" ({len(bad)} mismatches)"), flush=True)
    ok = ctx.comm.bcast(ok, root=0)
    return 0 if ok else 1


def run_script(module, args, comm) -> int:
    """``module.run(args, ctx)`` on ``comm`` with the verdict; an exception on a rank is a failure
    (its traceback goes to stderr). Returns the exit status, the same on every rank."""
    t0 = time.perf_counter()
    name = module.__name__ if module.__name__ != "__main__" else os.path.splitext(os.path.basename(module.__file__))[0]
    try:
        ctx = Ctx(comm, args.backend, args)
    except Exception as e:  # noqa: BLE001 - no backend at all: report it like a mismatch
        print(f"{name}: rank {comm.Get_rank()}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    try:
        problems = list(module.run(args, ctx))
    except Exception as e:  # noqa: BLE001 - reported as this rank's failure
        traceback.print_exc()
        problems = [f"{type(e).__name__}: {e}"]
    return finish(ctx, name, problems, time.perf_counter() - t0)


def script_main(module, argv=None) -> int:
    """The ``__main__`` of a seed script: parse, relaunch under mpiexec when alone, run, verdict."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = module.build_parser().parse_args(argv)
    rc = relaunch_if_alone(module.__file__, argv, args.num_processes)
    if rc is not None:
        return rc
    from deepep_cupy import mpienv
    MPI = mpienv.import_mpi()
    comm = MPI.COMM_WORLD
    mpienv.check_world(comm)
    if args.num_processes is not None and args.num_processes != comm.Get_size() and comm.Get_rank() == 0:
        print(f"[config] running on the launcher's {comm.Get_size()} rank(s), not --num-processes "
              f"{args.num_processes}", flush=True)
    return run_script(module, args, comm)


# ------------------------------------------------------------------------------------ pytest side
def pytest_backend() -> str:
    return os.environ.get("DEEPEP_CUPY_SEED_BACKEND", "reference")


def run_in_process(module) -> None:
    """Pytest: the script's main logic on a world of one (``MPI.COMM_SELF``) with its small sizes,
    on the reference backend; fails on any mismatch."""
    from mpi4py import MPI
    args = module.build_parser().parse_args(list(module.SMALL) + ["--backend", "reference"])
    assert run_script(module, args, MPI.COMM_SELF) == 0, f"{module.__name__} failed on one rank (output above)"


@functools.lru_cache(maxsize=None)
def launch_all(num_ranks: int = 2):
    """Every seed script's small case in ONE ``mpiexec -n num_ranks`` (this file as a script), once
    per pytest session. Returns (exit status, output, {name: "PASSED"/"FAILED"}, command).

    At 2 ranks under the CPU tier without GPUs, that launch is the run ``seed_scripts`` of the shared
    ``mpiexec -n 2`` pytest session (testutil.SESSION_RUNS, tests/session_runs.py: every rank runs
    this file as ``__main__``), which also runs tests/multirank and the examples, so the ranks start
    once; otherwise (GPUs, another rank count, or run without pytest's conftest) its own launch."""
    testutil = sys.modules.get("testutil")
    if (testutil is not None and "seed_scripts" in testutil.SESSION_RUNS.get(num_ranks, {})
            and testutil.scripts_in_process()):
        res = testutil.SESSIONS.result(num_ranks)
        if res.skip:
            pytest.skip(res.skip)
        rec = res.record("seed_scripts")
        assert rec["script"] == "tests/seed_scripts.py" and rec["args"] == ["--backend", pytest_backend()], rec
        rc = next((c for c in rec["returncodes"] if c), 0)
        return rc, rec["output"], dict(VERDICT_RE.findall(rec["output"])), f"{res.cmd} (run seed_scripts)"
    mpiexec = find_mpiexec()
    cmd = mpiexec_command(mpiexec, num_ranks, [sys.executable, os.path.abspath(__file__),
                                               "--backend", pytest_backend()])
    env = child_env(DEEPEP_CUPY_TIMEOUT_S=os.environ.get("DEEPEP_CUPY_TIMEOUT_S", "60"))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=HERE)
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = f"{e.stdout or ''}{e.stderr or ''}\n(timed out after 600 s)", -1
        out = out if isinstance(out, str) else out.decode(errors="replace")
    return rc, out, dict(VERDICT_RE.findall(out)), " ".join(cmd)


def section(out: str, name: str) -> str:
    """The part of the combined output that belongs to one script."""
    start = out.find(f"===== {name} =====")
    if start < 0:
        return out[-6000:]
    end = out.find("===== test_", start + 1)
    return out[start:end if end > 0 else None][-8000:]


def check_under_mpiexec(name: str, num_ranks: int = 2) -> None:
    """Pytest: ``name``'s small case passed in the shared ``mpiexec -n 2`` launch (``launch_all``)."""
    if launched_by_mpi():
        pytest.skip("already running under mpiexec (no nested launch)")
    if find_mpiexec() is None:
        pytest.skip("no mpiexec (pip install mpich)")
    rc, out, verdicts, cmd = launch_all(num_ranks)
    assert verdicts.get(name) == "PASSED", (
        f"{name} under `{cmd}`: {verdicts.get(name, 'no verdict')} (exit {rc}):\n{section(out, name)}")


# --------------------------------------------------------------------- this file as the launcher
def main(argv=None) -> int:
    """Every seed script's small case (its ``SMALL`` flags) one after another, in one MPI job."""
    ap = argparse.ArgumentParser(description="run the DeepEP-style test scripts' small cases in one MPI job")
    ap.add_argument("names", nargs="*", default=list(SCRIPTS), help=f"which (default: all of {', '.join(SCRIPTS)})")
    ap.add_argument("--backend", default="reference", choices=("auto", "gpu", "reference"))
    ap.add_argument("--num-processes", type=int, default=2)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    rc = relaunch_if_alone(__file__, argv, args.num_processes)
    if rc is not None:
        return rc
    from deepep_cupy import mpienv
    MPI = mpienv.import_mpi()
    comm = MPI.COMM_WORLD
    failed = []
    for name in args.names:
        if comm.Get_rank() == 0:
            print(f"===== {name} =====", flush=True)
        module = importlib.import_module(name)
        margs = module.build_parser().parse_args(list(module.SMALL) + ["--backend", args.backend])
        if run_script(module, margs, comm):
            failed.append(name)
    if comm.Get_rank() == 0:
        print(f"seed scripts: {len(args.names) - len(failed)} of {len(args.names)} passed"
              + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
