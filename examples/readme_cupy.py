# mpiexec -n 2 python3 examples/readme_cupy.py  (CuPy on GPUs; numpy on the CPU reference backend)
import numpy as np, ml_dtypes
from mpi4py import MPI
import deepep_cupy as ep

comm, T, H, E = MPI.COMM_WORLD, 128, 1024, 32                  # tokens, hidden, experts
with ep.Buffer(comm, num_nvl_bytes=ep.Buffer.get_intranode_size_hint(T, H, comm.Get_size(), 4)) as buf:
    xp = __import__("cupy") if buf.backend_name == "gpu" else np
    rng = np.random.default_rng(comm.Get_rank())
    x = xp.asarray(rng.standard_normal((T, H)).astype(ml_dtypes.bfloat16))
    topk_idx = xp.asarray(np.argsort(rng.random((T, E)), axis=1)[:, :4].copy())   # top-4 of 32, int64
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_idx, E)
    recv_x, recv_idx, _, counts, handle, _ = buf.dispatch(x, topk_idx=topk_idx, num_tokens_per_rank=per_rank,
                                                          num_tokens_per_expert=per_expert, is_token_in_rank=in_rank)
    y, _, _ = buf.combine(recv_x, handle)                   # each token back, summed over the ranks it went to
    print(f"rank {comm.Get_rank()}: received {recv_x.shape[0]} rows, per local expert {counts}, combined {y.shape}")
