"""Debug: the many-operations jaxep program on the GPU, per rank: HLO custom-call order, executed order, results."""
import os, sys
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, "tests/multirank")
import numpy as np
from mpi4py import MPI
import jax, jax.numpy as jnp
import deepep_cupy as ep
import deepep_cupy.jaxep as epj
from deepep_cupy import reference as ref
from test_jax_multirank import make_inputs, MAX_TOKENS, HIDDEN, BF16

comm = MPI.COMM_WORLD
r, n = comm.Get_rank(), comm.Get_size()
nvl = ep.Buffer.get_intranode_size_hint(4 * MAX_TOKENS, 2 * HIDDEN, n, 4)
buf = ep.Buffer(comm, num_nvl_bytes=nvl, backend="gpu")
device = next(d for d in jax.devices("gpu") if d.id == buf._backend.device_id)
print(f"rank {r} jax {jax.__version__} trace state fn {epj._get_trace_state}", flush=True)
for zero_rank in (1, -1):
    xs, idx, ws, e = make_inputs(n, 70, zero_rank=zero_rank)
    x2s = [(x.astype(np.float32) * 3).astype(BF16) for x in xs]
    worst = sum(x.shape[0] for x in xs)
    want = ref.dispatch(xs, idx, None, e, num_worst_tokens=worst)
    want2 = ref.dispatch(x2s, idx, None, e, num_worst_tokens=worst)
    traces = []

    def f(x, x2, i):
        traces.append(epj._current_trace())
        a = epj.dispatch(buf, x, i, num_experts=e, num_worst_tokens=worst)[0]
        b = epj.dispatch(buf, x2, i, num_experts=e, num_worst_tokens=worst)[0]
        c = epj.dispatch(buf, x2[::-1], i[::-1], num_experts=e, num_worst_tokens=worst)[0]
        return a, b, c
    args = (jax.device_put(xs[r], device), jax.device_put(x2s[r], device), jax.device_put(idx[r].astype(np.int32), device))
    jf = jax.jit(f)
    lowered = jf.lower(*args)
    txt = lowered.as_text()
    ccalls = [l.strip()[:200] for l in txt.splitlines() if "custom_call" in l or "stablehlo.custom_call" in l]
    comp = lowered.compile().as_text()
    cc2 = [l.strip()[:240] for l in comp.splitlines() if "custom-call" in l]
    ops = epj._OPS.get(buf)
    ops.executed.clear()
    a, b, c = jf(*args)
    jax.block_until_ready((a, b, c))
    names = {args[0].unsafe_buffer_pointer(): "x", args[1].unsafe_buffer_pointer(): "x2"}
    def match(got):
        g = np.asarray(got).view(np.uint16)
        return [nm for nm, w in (("want_a", want[r].recv_x), ("want_b", want2[r].recv_x)) if np.array_equal(g, w.view(np.uint16))]
    for q in range(n):
        comm.Barrier()
        if q == r:
            print(f"--- zero_rank {zero_rank} rank {r} tokens {xs[r].shape[0]} traces {traces}")
            print(" lowered custom calls:", *ccalls, sep="\n   ")
            print(" compiled custom calls:", *cc2, sep="\n   ")
            print(" executed:", [(op, names.get(p, hex(p))) for op, p in ops.executed])
            print(" a matches", match(a), " b matches", match(b), flush=True)
buf.destroy()
