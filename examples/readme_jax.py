# mpiexec -n 2 python3 examples/readme_jax.py  (inside jax.jit; the CPU reference backend without GPUs)
import jax, jax.numpy as jnp
from mpi4py import MPI
import deepep_cupy as ep, deepep_cupy.jaxep as epj

comm, T, H, E = MPI.COMM_WORLD, 64, 256, 16                    # tokens, hidden, experts
buf = ep.Buffer(comm, num_nvl_bytes=ep.Buffer.get_intranode_size_hint(T, H, comm.Get_size(), 2))

@jax.jit
def send_and_bring_back(x, topk_idx):                          # fixed shapes: num_worst_tokens rows
    recv_x, recv_idx, _, per_expert, handle = epj.dispatch(buf, x, topk_idx, num_experts=E)
    return epj.combine(buf, recv_x * 2, handle)[0], per_expert  # (an expert FFN would go here)

x = jax.random.normal(jax.random.PRNGKey(comm.Get_rank()), (T, H), jnp.bfloat16)   # the size hint counts bf16 rows
y, per_expert = send_and_bring_back(x, jax.random.randint(jax.random.PRNGKey(1), (T, 2), 0, E))
print(f"rank {comm.Get_rank()}: local experts got {per_expert}, output {y.shape} {y.dtype}")
buf.destroy()
