"""Train a JAX mixture-of-experts layer under ``jax.jit`` across MPI ranks with deepep_cupy.jaxep.

Run it (one process per rank; the CPU reference backend where there is no GPU, one GPU per rank
where there are GPUs):

    python3 examples/jax_moe_train.py                      # one rank
    mpiexec -n 2 python3 examples/jax_moe_train.py
    mpiexec -n 3 python3 examples/jax_moe_train.py --steps 20

The layer: a router (linear, softmax, top-k, renormalised weights), ``jaxep.dispatch`` of the tokens
to the ranks holding their experts, one two-layer GELU FFN per expert, ``jaxep.combine`` back.
Every rank holds ``E / R`` experts and a slice of the global batch; the router is replicated, so its
gradient is summed over the ranks (an MPI all-reduce inside the jitted step); the experts' gradients
need no all-reduce: the backward of ``combine`` (a cached dispatch) brings every rank's cotangents to
the experts' rank, so each rank's expert gradient is already that of the global loss.

The global problem (tokens, experts, data, initial weights) does not depend on the rank count, so
the loss curve is the same at 1, 2 or 3 ranks up to float32 rounding. At the initial weights (the
first step's loss and gradients, before any update is applied), rank by rank, the distributed loss
and every gradient are checked against the same model computed densely in one process (all tokens,
all experts, no communication). The training step is one jitted program that returns the loss and
gradients with the updated weights, so it compiles once.

Output (rank 0): one line per step, then ``LOSSES <json list>``; exit status 1 if the dense check
or the loss decrease fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # leave GPU memory to NVSHMEM

import numpy as np  # noqa: E402
from mpi4py import MPI  # noqa: E402

import deepep_cupy as ep  # noqa: E402
import deepep_cupy.jaxep as epj  # noqa: E402

epj.use_local_gpu()          # JAX on this rank's GPU (before JAX touches a device); no-op on CPUs

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import io_callback  # noqa: E402

# float32 matmuls in float32 on the GPU too (not TF32), so the dense check holds to float32 rounding
jax.config.update("jax_default_matmul_precision", "highest")


def mpi_sum(comm, x):
    """Sum of ``x`` over the ranks, inside jit: an ordered io_callback (the same order on every rank,
    interleaved with deepep_cupy's own ordered callbacks)."""
    def host(a):
        a = np.array(a)                 # a C-contiguous copy (keeps 0-d arrays 0-d)
        out = np.empty_like(a)
        comm.Allreduce(a, out, op=MPI.SUM)
        return out
    return io_callback(host, jax.ShapeDtypeStruct(x.shape, x.dtype), x, ordered=True)


def init_problem(seed, num_tokens, hidden, ffn, num_experts):
    """The global data and weights: identical on every rank, whatever the rank count."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_tokens, hidden)).astype(np.float32)
    mix = rng.standard_normal((hidden, hidden)).astype(np.float32) / np.sqrt(hidden)
    target = np.tanh(x @ mix).astype(np.float32)
    params = {
        "router": (rng.standard_normal((hidden, num_experts)) / np.sqrt(hidden)).astype(np.float32),
        "w1": (rng.standard_normal((num_experts, hidden, ffn)) / np.sqrt(hidden)).astype(np.float32),
        "w2": (rng.standard_normal((num_experts, ffn, hidden)) / np.sqrt(ffn)).astype(np.float32),
    }
    return x, target, params


def route(router, x, topk):
    """Softmax router and top-k: (topk_idx int32 [T, K], renormalised weights float32 [T, K])."""
    probs = jax.nn.softmax(x @ router, axis=-1)
    weights, idx = jax.lax.top_k(probs, topk)
    return idx.astype(jnp.int32), weights / jnp.sum(weights, axis=-1, keepdims=True)


def experts(w1, w2, x):
    """Every expert of ``w1``/``w2`` on every row: [E, N, H]."""
    return jnp.einsum("enf,efh->enh", jax.nn.gelu(jnp.einsum("nh,ehf->enf", x, w1)), w2)


def moe_layer(buf, params, x, num_experts, topk):
    """The distributed layer: ``params`` holds the router and this rank's experts only."""
    num_local = num_experts // buf.num_ranks
    idx, weights = route(params["router"], x, topk)
    recv_x, recv_idx, recv_w, _, handle = epj.dispatch(buf, x, idx, weights, num_experts=num_experts)
    # weight of each received row for each local expert (0 for padding rows, whose recv_idx is -1)
    gate = jnp.sum(jnp.where(recv_idx[:, :, None] == jnp.arange(num_local), recv_w[:, :, None], 0.0), axis=1)
    y = jnp.einsum("nl,lnh->nh", gate, experts(params["w1"], params["w2"], recv_x))
    out, _ = epj.combine(buf, y, handle)
    return out


def dense_layer(params, x, num_experts, topk):
    """The same layer in one process: all tokens, all experts, no communication."""
    idx, weights = route(params["router"], x, topk)
    gate = jnp.sum(jnp.where(idx[:, :, None] == jnp.arange(num_experts), weights[:, :, None], 0.0), axis=1)
    return jnp.einsum("ne,enh->nh", gate, experts(params["w1"], params["w2"], x))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--tokens", type=int, default=48, help="global batch (a multiple of the rank count)")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--ffn", type=int, default=64)
    p.add_argument("--experts", type=int, default=6, help="a multiple of the rank count")
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    comm = MPI.COMM_WORLD
    rank, num_ranks = comm.Get_rank(), comm.Get_size()
    if args.steps < 1:
        raise SystemExit(f"--steps {args.steps}: at least 1 (the first step's gradients are the dense check's)")
    if args.tokens % num_ranks or args.experts % num_ranks:
        raise SystemExit(f"--tokens {args.tokens} and --experts {args.experts} must be multiples of {num_ranks} ranks")
    t, num_local = args.tokens // num_ranks, args.experts // num_ranks
    x_all, y_all, full = init_problem(args.seed, args.tokens, args.hidden, args.ffn, args.experts)
    mine = slice(rank * t, (rank + 1) * t)
    experts_mine = slice(rank * num_local, (rank + 1) * num_local)
    x, y = jnp.asarray(x_all[mine]), jnp.asarray(y_all[mine])
    params = {"router": jnp.asarray(full["router"]), "w1": jnp.asarray(full["w1"][experts_mine]),
              "w2": jnp.asarray(full["w2"][experts_mine])}

    # float32 rows: size the GPU staging as for bf16 rows of twice the hidden size
    nvl_bytes = ep.Buffer.get_intranode_size_hint(t, 2 * args.hidden, num_ranks, args.topk)
    with ep.Buffer(comm, num_nvl_bytes=nvl_bytes) as buf:
        def local_loss(params, x, y):
            # this rank's share of the global mean squared error
            out = moe_layer(buf, params, x, args.experts, args.topk)
            return jnp.sum((out - y) ** 2) / args.tokens

        @jax.jit
        def train_step(params, x, y):
            """One SGD step; also returns the loss and the gradients at ``params`` (one compiled
            program serves the dense check, on the first step, and the training)."""
            loss, grads = jax.value_and_grad(local_loss)(params, x, y)
            grads = dict(grads, router=mpi_sum(comm, grads["router"]))   # replicated: sum over ranks
            new = jax.tree_util.tree_map(lambda w, g: w - args.lr * g, params, grads)
            return new, mpi_sum(comm, loss), grads

        # the dense model's loss and gradients, in one process
        def dense_loss(params):
            return jnp.sum((dense_layer(params, jnp.asarray(x_all), args.experts, args.topk) - y_all) ** 2) / args.tokens
        want_loss, want = jax.jit(jax.value_and_grad(dense_loss))(jax.tree_util.tree_map(jnp.asarray, full))

        losses = []
        for step in range(args.steps):
            new_params, loss, grads = train_step(params, x, y)
            if step == 0:   # the initial weights: distributed against dense, before any update is used
                errors = {"loss": _rel(loss, want_loss), "router": _rel(grads["router"], want["router"]),
                          "w1": _rel(grads["w1"], want["w1"][experts_mine]),
                          "w2": _rel(grads["w2"], want["w2"][experts_mine])}
                ok = all(e < 1e-5 for e in errors.values())
                everyone = comm.allgather((ok, errors))
                if rank == 0:
                    for r, (ok_r, err) in enumerate(everyone):
                        print(f"rank {r}: distributed vs dense, max relative error "
                              + ", ".join(f"{k} {v:.1e}" for k, v in err.items()) + ("" if ok_r else "  <-- FAIL"))
                dense_ok = all(o for o, _ in everyone)
            params = new_params
            losses.append(float(loss))
            if rank == 0:
                print(f"step {step:3d}  loss {losses[-1]:.7f}")
        decreasing = all(b < a for a, b in zip(losses, losses[1:]))
        if rank == 0:
            print("LOSSES " + json.dumps(losses))
            print(f"backend {buf.backend_name}, {num_ranks} rank(s): dense check {'ok' if dense_ok else 'FAILED'}, "
                  f"loss {'decreases every step' if decreasing else 'does NOT decrease every step'}")
    return 0 if dense_ok and decreasing else 1


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


if __name__ == "__main__":
    sys.exit(main())
