// The hierarchical (internode) dispatch's last step: put the received rows in the API's order.
//
// The two stages (see deepep_cupy/internode.py) deliver a rank's rows grouped by forwarder (the
// node-local rank l' that received them over RDMA), and inside each forwarder's block by source node
// m, then source token. Every row carries a tag = (global source rank g = m * L + l') << kTokenBits
// | source token. The API orders rows by g, then token; rows of one g are contiguous and already in
// token order in the stage order, so a row's final place is
//     dest = (rows of sources before g) + (its index - the index of g's first row).
// Padding rows (num_worst_tokens mode) carry tag -1, follow every real row in both orders, and stay.
//
// One block: counts and first indices per source in shared memory (dynamic, 3 * num_ranks ints).
#include "common/utils.cuh"

extern "C" __global__ void __launch_bounds__(1024, 1)
internode_final_order(const int* __restrict__ tags, int num_rows, int num_ranks, int token_bits,
                      int* __restrict__ dest, int* __restrict__ perm, int* __restrict__ src_idx) {
    extern __shared__ int smem[];
    int* count = smem;                  // rows per global source rank
    int* first = smem + num_ranks;      // index (stage order) of the source's first row
    int* offset = smem + 2 * num_ranks; // exclusive scan of count
    for (int g = threadIdx.x; g < num_ranks; g += blockDim.x) count[g] = 0, first[g] = 0x7fffffff;
    __syncthreads();
    for (int i = threadIdx.x; i < num_rows; i += blockDim.x) {
        const int tag = tags[i];
        if (tag < 0) continue;
        const int g = tag >> token_bits;
        atomicAdd(count + g, 1);
        atomicMin(first + g, i);
    }
    __syncthreads();
    if (threadIdx.x == 0) {   // num_ranks is small: a serial scan
        int acc = 0;
        for (int g = 0; g < num_ranks; ++g) offset[g] = acc, acc += count[g];
    }
    __syncthreads();
    const int mask = (1 << token_bits) - 1;
    for (int i = threadIdx.x; i < num_rows; i += blockDim.x) {
        const int tag = tags[i];
        int d = i, src = -1;
        if (tag >= 0) {
            const int g = tag >> token_bits;
            d = offset[g] + (i - first[g]);
            src = tag & mask;
        }
        dest[i] = d;
        perm[d] = i;
        src_idx[d] = src;
    }
}
